import gzip
import math
import os
import struct
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch

# Without a GPU, Triton kernels run in Triton's interpreter on CPU tensors. It is chosen when
# a kernel module is first imported, so it is set here, before any test imports one.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import fastpixel
from fastpixel import mixture
from fastpixel.sampling.engines import cached_rows
from fastpixel.sampling import image_noise


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@contextmanager
def torch_threads(count: int):
    """torch's (and so the C++ engine's) thread count set to `count` for a while, whatever
    the machine's cores: the engine's shared batches run with two threads on one core too."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def tiny_model(dtype=torch.float64, **overrides) -> fastpixel.PixelCNNpp:
    """A small model in eval mode whose every path is active: weights are random, and every
    weight-norm scale and bias perturbed so that no layer starts as an exact identity."""
    options = dict(image_size=(8, 12), channels=1, nr_resnet=1, nr_filters=8, nr_logistic_mix=2, dropout=0.0)
    options.update(overrides)
    model = fastpixel.PixelCNNpp(fastpixel.ModelConfig(**options)).to(dtype).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".g"):
                p.uniform_(0.5, 1.5)
            elif name.endswith(".b"):
                p.normal_(0, 0.1)
    return model


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """A saved tiny class-conditional model (3 classes, float32), for the CLI tests."""
    path = tmp_path_factory.mktemp("model") / "model.safetensors"
    fastpixel.save(tiny_model(dtype=torch.float32, num_classes=3), path)
    return path


def random_images(model: fastpixel.PixelCNNpp, n: int) -> torch.Tensor:
    cfg = model.config
    return torch.randint(0, 256, (n, cfg.channels, *cfg.shape), dtype=torch.uint8)


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # where kernel tests put their tensors


def cached_run(model, n, seed, backend):
    """Images and the parameters at every step (B, P, H, W), from the cached sampler run by `backend`."""
    cfg = model.config
    param = next(model.parameters())
    labels = None if cfg.num_classes is None else (torch.arange(n) % cfg.num_classes).to(param.device)
    noise = torch.stack([image_noise(cfg, seed, i) for i in range(n)]).to(param.device)
    x = torch.zeros(n, cfg.channels, *cfg.shape, dtype=param.dtype, device=param.device)
    seen = torch.zeros(n, cfg.num_params_out, *cfg.shape, dtype=param.dtype, device=param.device)

    def keep(r, c, params):
        seen[:, :, r, c] = params

    with torch.no_grad():
        for _ in cached_rows(model, x, noise, labels, engine=backend, on_step=keep):
            pass
    return x, seen


def assert_differences_lie_on_bin_edges(model, seed, x, x_reference, params_reference):
    """Images drawn from parameters that agree to rounding may differ; after its first
    differing sub-pixel an image follows another path, so that first one must be a draw
    within rounding of a bin edge, or of a tie between two components."""
    channels, width = model.config.channels, model.config.shape[1]
    for i in (x != x_reference).flatten(1).any(dim=1).nonzero().flatten().tolist():
        first = (x[i] != x_reference[i]).permute(1, 2, 0).flatten().nonzero()[0].item()
        (r, c), channel = divmod(first // channels, width), first % channels
        assert on_an_edge(params_reference[i, :, r, c], image_noise(model.config, seed, i)[:, r, c],
                          x_reference[i, :channel, r, c], channel, channels)


def on_an_edge(params, uniforms, earlier, channel, channels) -> bool:
    """Whether this sub-pixel's draw (float64) lies within rounding of the edge between two
    bins, or its component choice within rounding of a tie (rounding of parameters that
    agree to 1e-4)."""
    logits, means, log_scales, coeffs = mixture._unpack(params.double().cpu()[None, :, None, None], channels)
    scores = (logits.flatten() - torch.log(-torch.log(uniforms[:-channels])))
    k = int(scores.argmax())
    if scores.numel() > 1 and float(scores.max() - scores.topk(2).values[1]) < 1e-3:
        return True
    x = earlier.double().cpu()
    mean = float(means[0, channel, k])
    if channel:
        alpha, beta, gamma = coeffs[0, :, k].flatten()
        mean += [0.0, alpha * x[0], beta * x[0] + gamma * x[-1]][channel]
    u = uniforms[-channels + channel]
    y = mean + float(log_scales[0, channel, k].exp() * (torch.log(u) - torch.log1p(-u)))
    grid = (y + 1) * 127.5  # bin edges are at half-integers
    return abs(grid - math.floor(grid) - 0.5) < 0.05


def idx_bytes(array: np.ndarray) -> bytes:
    """An IDX file holding a uint8 array: (n,) labels or (n, rows, cols) images."""
    magic = 2051 if array.ndim == 3 else 2049
    return struct.pack(f">{1 + array.ndim}I", magic, *array.shape) + array.astype(np.uint8).tobytes()


def write_idx(folder: Path, split: str, images: np.ndarray, labels: np.ndarray, gz: bool = True) -> list[Path]:
    """The split's two IDX files in folder, gzipped or not; returns [images file, labels file]."""
    prefix = "train" if split == "train" else "t10k"
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, array in ((f"{prefix}-images-idx3-ubyte", images), (f"{prefix}-labels-idx1-ubyte", labels)):
        raw = idx_bytes(array)
        path = folder / (name + ".gz" if gz else name)
        path.write_bytes(gzip.compress(raw) if gz else raw)
        paths.append(path)
    return paths


def write_random_mnist(folder: Path, train: int, test: int, seed: int = 0, blobs: bool = False) -> Path:
    """An MNIST-format folder of random 28x28 images (sparse blobs, like digits' dark backgrounds, or
    uniform noise) with labels 0..9."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", train), ("test", test)):
        images = (rng.random((n, 28, 28)) ** 4 * 255).astype(np.uint8) if blobs else rng.integers(0, 256, (n, 28, 28))
        write_idx(folder, split, images, rng.integers(0, 10, n))
    return folder


@pytest.fixture(scope="module")
def mnist_dir(tmp_path_factory) -> Path:
    """64 training and 20 test images in MNIST's IDX format: random blobs, labels 0..9."""
    return write_random_mnist(tmp_path_factory.mktemp("mnist"), 64, 20, blobs=True)
