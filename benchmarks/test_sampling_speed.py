"""Naive against cached sampling (the PyTorch path and the C++ engine), side by side: same
model, same batch, same run; PixelCNN++ and the masked families (PixelCNN, Gated PixelCNN).

    pytest benchmarks/ --benchmark-only --benchmark-json benchmarks/results/cpu_cext.json
    python benchmarks/report.py benchmarks/results/cpu_cext.json

Naive sampling runs one full forward pass per pixel (per sub-pixel for the masked families),
so for the big models it is estimated as (one forward pass) x H*W (x C) and labelled so; it
is measured in full for the MNIST-size models at batch 1, which checks the estimate. The C++ engine is built before
anything is timed, and its cases are skipped where it cannot be. The bundled MNIST model
is timed too (cached only). FASTPIXEL_BENCH_QUICK=1 shrinks everything to a few seconds
(the test suite runs it that way).
"""
import os

import pytest
import torch

import fastpixel
from fastpixel import backend
from fastpixel.models.families import family_of
from fastpixel.sampling import resolve_backend
from machine import machine_line

QUICK = os.environ.get("FASTPIXEL_BENCH_QUICK") == "1"
if QUICK:
    MODELS = {"tiny": fastpixel.ModelConfig(image_size=8, channels=1, nr_resnet=1, nr_filters=8, nr_logistic_mix=2),
              "tiny-gated": fastpixel.GatedConfig(image_size=6, channels=3, hidden_fmaps=6, out_hidden_fmaps=6,
                                                  hidden_layers=1)}
    BATCHES = {"tiny": (1, 2), "tiny-gated": (2,)}
    MEASURE_NAIVE = {("tiny", 1), ("tiny-gated", 2)}
else:
    MODELS = {
        "mnist": fastpixel.ModelConfig(image_size=28, channels=1, nr_resnet=3, nr_filters=64, nr_logistic_mix=5),
        "cifar": fastpixel.ModelConfig(image_size=32, channels=3, nr_resnet=5, nr_filters=160, nr_logistic_mix=10),
        # the bundled mnist-gated model's configuration
        "gated-mnist": fastpixel.GatedConfig(hidden_fmaps=48, hidden_layers=7, hidden_ksize=5, out_hidden_fmaps=64),
        "pixelcnn-mnist": fastpixel.PixelCNNConfig(),
        "gated-rgb32": fastpixel.GatedConfig(image_size=32, channels=3, hidden_fmaps=48, hidden_layers=7, hidden_ksize=5,
                                             out_hidden_fmaps=48),
        "pixelcnn-rgb32": fastpixel.PixelCNNConfig(image_size=32, channels=3),
    }
    BATCHES = {"bundled": (1, 16), "mnist": (1, 16, 64), "cifar": (1, 16, 64), "gated-mnist": (1, 16),
               "pixelcnn-mnist": (1, 16), "gated-rgb32": (1, 16), "pixelcnn-rgb32": (1, 16)}
    MEASURE_NAIVE = {("mnist", 1), ("gated-mnist", 1)}
CASES = [(name, batch) for name in BATCHES for batch in BATCHES[name]]
ROUNDS = 1 if QUICK else 2
# the cached sampler's backends, and the method names report.py reads
CACHED = {"torch": "cached", "cext": "cached cext"}


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    built = {} if QUICK else {"bundled": fastpixel.load("mnist").eval()}
    for name, cfg in MODELS.items():
        if isinstance(cfg, fastpixel.ModelConfig):
            model = fastpixel.PixelCNNpp(cfg)
            height, width = cfg.shape
            model.data_init(torch.rand(8, cfg.channels, height, width) * 2 - 1)  # realistic activation scales
        else:
            model = (fastpixel.GatedPixelCNN if isinstance(cfg, fastpixel.GatedConfig) else fastpixel.PixelCNN)(cfg)
        built[name] = model.eval()
    return built


def passes_per_image(cfg) -> int:
    """Forward passes naive sampling runs: one per pixel, or per sub-pixel for the masked families."""
    height, width = cfg.shape
    return height * width * (1 if isinstance(cfg, fastpixel.ModelConfig) else cfg.channels)


@pytest.fixture(scope="module")
def cext_reason():
    """Why the C++ engine cannot run here (None: it can), built now so that no timing includes the build."""
    return backend.why_unavailable("cext", torch.device("cpu"), torch.float32)


def describe(benchmark, name, batch, method, multiplier=1, cfg=None):
    cfg = cfg or MODELS[name]
    benchmark.group = f"{name} batch {batch}"
    benchmark.extra_info.update(model=name, config=cfg.to_dict(), batch=batch, method=method,
                                multiplier=multiplier, torch=torch.__version__, threads=torch.get_num_threads(),
                                machine=machine_line())


@pytest.mark.parametrize("name, batch", CASES)
@pytest.mark.parametrize("engine", CACHED)
def test_cached(benchmark, models, cext_reason, name, batch, engine):
    if engine == "cext" and cext_reason is not None:
        pytest.skip(cext_reason)
    try:
        resolve_backend("cpu", True, engine, torch.float32, family_of(models[name]).name)
    except ValueError as err:
        pytest.skip(str(err))
    describe(benchmark, name, batch, CACHED[engine], cfg=models[name].config)
    images = benchmark.pedantic(fastpixel.sample, args=(models[name], batch),
                                kwargs=dict(fast=True, seed=0, backend=engine), rounds=ROUNDS, iterations=1)
    assert images.shape[0] == batch


@pytest.mark.parametrize("name, batch", [(name, batch) for name, batch in CASES if name in MODELS])
def test_naive_estimated(benchmark, models, name, batch):
    """One forward pass; naive sampling costs H*W (x C) of them (the report multiplies)."""
    cfg = MODELS[name]
    height, width = cfg.shape
    describe(benchmark, name, batch, "naive (estimated: forward pass x H*W)", multiplier=passes_per_image(cfg))
    x = torch.zeros(batch, cfg.channels, height, width)
    with torch.no_grad():
        benchmark.pedantic(models[name], args=(x,), rounds=3, iterations=1, warmup_rounds=1)


@pytest.mark.parametrize("name, batch", sorted(MEASURE_NAIVE))
def test_naive_measured(benchmark, models, name, batch):
    describe(benchmark, name, batch, "naive (measured)")
    benchmark.pedantic(fastpixel.sample, args=(models[name], batch), kwargs=dict(fast=False, seed=0), rounds=1, iterations=1)
