import itertools
import re

import pytest
import torch

import fastpixel
from fastpixel.models.pixelcnnpp.layers import Nin, ShiftedConv2d, ShiftedConvTranspose2d, _WeightNormed
from tests.conftest import tiny_model

OPTIONS = list(itertools.product([1, 3], [False, True], [False, True], [None, 3]))


@pytest.mark.parametrize("channels, coordconv, nonlocal_block, num_classes", OPTIONS)
def test_causal_invariant_through_autograd(channels, coordconv, nonlocal_block, num_classes):
    """The parameters at p have zero gradient w.r.t. every pixel at or after p, and a
    nonzero one w.r.t. the pixel to the left and the pixel above."""
    model = tiny_model(channels=channels, coordconv=coordconv, nonlocal_block=nonlocal_block,
                       num_classes=num_classes, image_size=(12, 8))
    assert_causal(model)


def assert_causal(model):
    """The invariant at every pixel p, checked in one backward pass: image p of a batch of
    H * W random images (labels cycling through the classes) asks about its pixel p."""
    height, width = model.config.shape
    n = height * width
    x = (torch.rand(n, model.config.channels, height, width, dtype=torch.float64) * 2 - 1).requires_grad_()
    labels = None if model.config.num_classes is None else torch.arange(n) % model.config.num_classes
    params = model(x, labels)
    rows, cols = torch.arange(n) // width, torch.arange(n) % width
    at_own_pixel = params[torch.arange(n), :, rows, cols]  # (n, P)
    (grad,) = torch.autograd.grad((at_own_pixel * torch.randn(at_own_pixel.shape, dtype=torch.float64)).sum(), x)
    per_pixel = grad.abs().sum(dim=1).flatten(1)  # (image p, raster order)
    for p in range(n):
        r, c = divmod(p, width)
        assert torch.all(per_pixel[p, p:] == 0), f"pixel {p} depends on itself or a later pixel"
        if c > 0:
            assert per_pixel[p, p - 1] > 0, f"pixel {p} ignores its left neighbour"
        if r > 0:
            assert per_pixel[p, p - width] > 0, f"pixel {p} ignores the pixel above"


@pytest.mark.parametrize("size, channels, mix", [(28, 1, 5), (32, 3, 10), ((8, 16), 3, 2), ((16, 8), 1, 3)])
def test_output_shape(size, channels, mix):
    cfg = fastpixel.ModelConfig(image_size=size, channels=channels, nr_resnet=1, nr_filters=8, nr_logistic_mix=mix)
    model = fastpixel.PixelCNNpp(cfg)
    height, width = cfg.shape
    out = model(torch.zeros(2, channels, height, width))
    assert out.shape == (2, (3 if channels == 1 else 10) * mix, height, width)


def _expected_parameter_count(cfg: fastpixel.ModelConfig) -> int:
    """Counted from the architecture: a weight-normalised layer holds its weight plus one
    scale and one bias per output; concat_elu doubles the inputs of the residual convolutions."""
    f, nr, k = cfg.nr_filters, cfg.nr_resnet, cfg.nr_logistic_mix
    c_in = cfg.channels + 1 + 2 * cfg.coordconv
    wn = lambda n_in, n_out, area: n_out * n_in * area + 2 * n_out  # noqa: E731
    block = lambda area, skip: (wn(2 * f, f, area) + (wn(2 * skip, f, 1) if skip else 0)  # noqa: E731
                                + wn(2 * f, 2 * f, area) + 2 * f * (cfg.num_classes or 0))
    total = wn(c_in, f, 6) + wn(c_in, f, 3) + wn(c_in, f, 2)
    total += 3 * nr * (block(6, 0) + block(4, f))
    total += (nr + 2 * (nr + 1)) * (block(6, f) + block(4, 2 * f))
    total += 2 * 2 * (wn(f, f, 6) + wn(f, f, 4))  # stride-2 convolutions down, transposed ones up
    total += wn(f, (1 + 2 * cfg.channels + 3 * (cfg.channels == 3)) * k, 1)
    if cfg.nonlocal_block:
        total += 3 * wn(f, f // 2, 1) + wn(f // 2, f, 1)
    return total


@pytest.mark.parametrize("cfg", [
    fastpixel.ModelConfig(image_size=32, channels=3, nr_resnet=5, nr_filters=160, nr_logistic_mix=10),
    fastpixel.ModelConfig(image_size=28, channels=1, nr_resnet=2, nr_filters=12, nr_logistic_mix=3,
                          num_classes=10, coordconv=True, nonlocal_block=True),
])
def test_parameter_count_matches_formula(cfg):
    count = sum(p.numel() for p in fastpixel.PixelCNNpp(cfg).parameters())
    print(f"{cfg}: {count:,} parameters")
    assert count == _expected_parameter_count(cfg)


def test_original_cifar_configuration_has_about_53_million_parameters():
    cfg = fastpixel.ModelConfig(image_size=32, channels=3, nr_resnet=5, nr_filters=160, nr_logistic_mix=10)
    assert 52e6 < sum(p.numel() for p in fastpixel.PixelCNNpp(cfg).parameters()) < 55e6


def test_data_dependent_init_normalises_preactivations_on_its_batch():
    model = fastpixel.PixelCNNpp(fastpixel.ModelConfig(
        image_size=8, channels=3, nr_resnet=1, nr_filters=16, nr_logistic_mix=2, num_classes=3,
        nonlocal_block=True, coordconv=True)).double().eval()
    x = torch.rand(16, 3, 8, 8, dtype=torch.float64) * 2 - 1
    labels = torch.randint(0, 3, (16,))
    model.data_init(x, labels)
    outputs = {}
    layers = [m for m in model.modules() if isinstance(m, _WeightNormed)]
    hooks = [m.register_forward_hook(lambda mod, inp, out: outputs.__setitem__(mod, out)) for m in layers]
    model(x, labels)
    for hook in hooks:
        hook.remove()
    assert {type(m) for m in layers} == {Nin, ShiftedConv2d, ShiftedConvTranspose2d}
    for layer in layers:
        out = outputs[layer]
        mean, std = out.mean(dim=(0, 2, 3)), out.std(dim=(0, 2, 3), unbiased=False)
        assert mean.abs().max() < 1e-8
        assert (std - layer.init_scale).abs().max() < 1e-6


@pytest.mark.parametrize("make_input, message", [
    (lambda: (torch.zeros(2, 3, 8, 12), None), "1 channel"),
    (lambda: (torch.zeros(2, 1, 8, 8), None), "8x12 images"),
    (lambda: (torch.zeros(1, 8, 12), None), "shape (batch, 1, 8, 12)"),
    (lambda: (torch.zeros(2, 1, 8, 12, dtype=torch.uint8), None), "floating-point"),
])
def test_forward_rejects_bad_images(make_input, message):
    model = tiny_model(dtype=torch.float32)
    x, labels = make_input()
    with pytest.raises(ValueError, match=re.escape(message)):
        model(x, labels)


def test_forward_rejects_bad_labels():
    cond = tiny_model(dtype=torch.float32, num_classes=4)
    x = torch.zeros(2, 1, 8, 12)
    with pytest.raises(ValueError, match="labels .* are required"):
        cond(x)
    with pytest.raises(ValueError, match=r"in 0\.\.3"):
        cond(x, torch.tensor([0, 4]))
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        cond(x, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="not class-conditional"):
        tiny_model(dtype=torch.float32)(x, torch.tensor([0, 1]))
    assert cond(x, torch.tensor([0, 3], dtype=torch.int32)).shape[0] == 2
