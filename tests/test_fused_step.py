"""The Triton backend's pixel steps (fastpixel/fused_step.py) against the PyTorch cached
sampler and the naive sampler. Without a GPU the kernels run in Triton's interpreter, so
the images are small: every launch pattern still occurs (4 rows reach all three
resolutions), and 2 images exercise the batch."""
import pytest
import torch

import fastpixel
from fastpixel import cache
from fastpixel.sampling import image_noise
from tests.conftest import DEVICE, tiny_model

pytest.importorskip("triton")

OPTIONS = [
    dict(channels=3, num_classes=3, coordconv=True, nonlocal_block=True),
    dict(channels=1, nr_resnet=2, nonlocal_block=True, resnet_nonlinearity="elu", image_size=(8, 4)),
    dict(channels=1, coordconv=True, resnet_nonlinearity="relu", nr_logistic_mix=1),
    dict(channels=3, num_classes=2, image_size=(4, 12)),
]


def cached_run(model, n, seed, backend):
    """Images and the parameters at every step (B, P, H, W), from cache.sample_rows."""
    cfg = model.config
    param = next(model.parameters())
    labels = None if cfg.num_classes is None else (torch.arange(n) % cfg.num_classes).to(param.device)
    noise = torch.stack([image_noise(cfg, seed, i) for i in range(n)]).to(param.device)
    x = torch.zeros(n, cfg.channels, *cfg.shape, dtype=param.dtype, device=param.device)
    seen = torch.zeros(n, cfg.num_params_out, *cfg.shape, dtype=param.dtype, device=param.device)

    def keep(r, c, params):
        seen[:, :, r, c] = params

    with torch.no_grad():
        for _ in cache.sample_rows(model, x, noise, labels, on_params=keep, backend=backend):
            pass
    return x, seen


@pytest.mark.parametrize("options", OPTIONS)
def test_triton_steps_match_torch_steps_float64(options):
    model = tiny_model(**{"image_size": (4, 8), **options}).to(DEVICE)
    x_torch, params_torch = cached_run(model, 2, 7, "torch")
    x_triton, params_triton = cached_run(model, 2, 7, "triton")
    assert (params_triton - params_torch).abs().max() <= 1e-10
    assert torch.equal(x_triton, x_torch)


def test_triton_steps_in_float32_differ_at_most_by_a_bin_at_a_few_sub_pixels():
    model = tiny_model(dtype=torch.float32, channels=3, nonlocal_block=True, image_size=(4, 8)).to(DEVICE)
    x_torch, params_torch = cached_run(model, 3, 1, "torch")
    x_triton, params_triton = cached_run(model, 3, 1, "triton")
    assert (params_triton - params_torch).abs().max() <= 1e-4
    differ = x_triton != x_torch
    assert differ.sum() <= 3
    # a differing sub-pixel is a draw that fell within rounding of a bin edge: one level apart
    assert torch.allclose((x_triton - x_torch)[differ].abs(), torch.tensor(1 / 127.5), atol=1e-6)


def test_sample_with_triton_backend_equals_naive_sampling():
    model = tiny_model(num_classes=2, image_size=(4, 8)).to(DEVICE)
    expected = fastpixel.sample(model, 2, seed=5)
    assert torch.equal(fastpixel.sample(model, 2, fast=True, seed=5, backend="triton"), expected)
