"""The Triton backend's pixel steps (fastpixel/fused_step.py) against the PyTorch cached
sampler and the naive sampler. Without a GPU the kernels run in Triton's interpreter, so
the images are small: every launch pattern still occurs (4 rows reach all three
resolutions), and 2 images exercise the batch."""
import math

import pytest
import torch

import fastpixel
from fastpixel import cache, mixture
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


def test_triton_steps_in_float32_differ_only_where_a_draw_lies_on_a_bin_edge():
    model = tiny_model(dtype=torch.float32, channels=3, nonlocal_block=True, image_size=(4, 8)).to(DEVICE)
    n, seed = 4, 1
    x_torch, params_torch = cached_run(model, n, seed, "torch")
    x_triton, params_triton = cached_run(model, n, seed, "triton")
    assert (params_triton - params_torch).abs().max() <= 1e-4
    differing_images = (x_triton != x_torch).flatten(1).any(dim=1)
    assert differing_images.sum() <= 1
    for i in differing_images.nonzero().flatten().tolist():
        # After its first differing sub-pixel an image follows another path; that one must
        # be a draw within rounding of a bin edge, or of a tie between two components.
        first = (x_triton[i] != x_torch[i]).permute(1, 2, 0).flatten().nonzero()[0].item()
        (r, c), channel = divmod(first // 3, model.config.shape[1]), first % 3
        assert on_an_edge(params_torch[i, :, r, c], image_noise(model.config, seed, i)[:, r, c],
                          x_torch[i, :channel, r, c], channel)


def on_an_edge(params, uniforms, earlier, channel) -> bool:
    """Whether this sub-pixel's draw (float64) lies within rounding of the edge between two
    bins, or its component choice within rounding of a tie (rounding of parameters that
    agree to 1e-4)."""
    logits, means, log_scales, coeffs = mixture._unpack(params.double().cpu()[None, :, None, None], 3)
    scores = (logits.flatten() - torch.log(-torch.log(uniforms[:-3])))
    k = int(scores.argmax())
    if scores.numel() > 1 and float(scores.max() - scores.topk(2).values[1]) < 1e-3:
        return True
    alpha, beta, gamma = coeffs[0, :, k].flatten()
    x = earlier.double().cpu()
    mean = float(means[0, channel, k]) + [0.0, alpha * x[0] if channel else 0.0,
                                          beta * x[0] + gamma * x[-1] if channel == 2 else 0.0][channel]
    u = uniforms[-3 + channel]
    y = mean + float(log_scales[0, channel, k].exp() * (torch.log(u) - torch.log1p(-u)))
    grid = (y + 1) * 127.5  # bin edges are at half-integers
    return abs(grid - math.floor(grid) - 0.5) < 0.05


def test_sample_with_triton_backend_equals_naive_sampling():
    model = tiny_model(num_classes=2, image_size=(4, 8)).to(DEVICE)
    expected = fastpixel.sample(model, 2, seed=5)
    assert torch.equal(fastpixel.sample(model, 2, fast=True, seed=5, backend="triton"), expected)
