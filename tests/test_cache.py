import itertools

import pytest
import torch

import fastpixel
from fastpixel.sampling.caches.pixelcnnpp import CachedNetwork
from fastpixel.sampling.engines import cached_rows
from fastpixel.sampling import image_noise
from tests.conftest import tiny_model

EVERY_OPTION = [dict(channels=c, coordconv=a, nonlocal_block=n, num_classes=k)
                for c, a, n, k in itertools.product([1, 3], [False, True], [False, True], [None, 3])]
ARCHITECTURES = [
    dict(nr_resnet=2, image_size=(12, 8)),
    dict(nr_resnet=1, image_size=(4, 16), nonlocal_block=True),
    dict(nr_resnet=2, image_size=8, resnet_nonlinearity="elu", channels=3),
    dict(nr_resnet=1, image_size=(8, 12), resnet_nonlinearity="relu", nr_logistic_mix=1),
    dict(nr_resnet=3, image_size=(16, 12), channels=3, num_classes=2, coordconv=True, nonlocal_block=True),
]


def record_cached_params(model, n, seed, labels=None):
    """Run the cached sampler on images 0..n-1 of `seed`, returning the images (float) and
    the parameters (B, P, H, W) it produced at every step."""
    cfg = model.config
    param = next(model.parameters())
    noise = torch.stack([image_noise(cfg, seed, i) for i in range(n)])
    x = torch.zeros(n, cfg.channels, *cfg.shape, dtype=param.dtype)
    seen = torch.full((n, cfg.num_params_out, *cfg.shape), float("nan"), dtype=param.dtype)

    def keep(r, c, params):
        seen[:, :, r, c] = params

    with torch.no_grad():
        for _ in cached_rows(model, x, noise, labels, on_step=keep):
            pass
    return x, seen


@pytest.mark.parametrize("options", EVERY_OPTION + ARCHITECTURES)
def test_cached_matches_naive_float64(options):
    model = tiny_model(**options)
    n = 3
    labels = None if model.config.num_classes is None else torch.arange(n) % model.config.num_classes
    naive = fastpixel.sample(model, n, fast=False, seed=11, labels=labels)
    assert torch.equal(fastpixel.sample(model, n, fast=True, seed=11, labels=labels), naive)
    # and image by image: batch size 1 and 2 give the same images
    assert torch.equal(fastpixel.sample(model, n, fast=True, seed=11, labels=labels, batch_size=2), naive)
    # the parameters at every step agree with one full pass on the finished images to 1e-10
    x, seen = record_cached_params(model, n, seed=11, labels=labels)
    with torch.no_grad():
        full = model(x, labels)
    assert (seen - full).abs().max() <= 1e-10


@pytest.mark.parametrize("options", [
    dict(channels=3, nr_filters=16, nr_logistic_mix=4),
    dict(channels=1, nr_resnet=2, nonlocal_block=True, coordconv=True, num_classes=4),
])
def test_cached_params_match_forward_on_partial_image_float32(options):
    """At every step, the cached parameters equal a full forward pass on the image as it was
    then: pixels before the step filled in, the rest still unknown (random here)."""
    model = tiny_model(dtype=torch.float32, **options)
    labels = None if model.config.num_classes is None else torch.tensor([1, 3])
    x, seen = record_cached_params(model, 2, seed=5, labels=labels)
    height, width = model.config.shape
    worst = 0.0
    with torch.no_grad():
        for p in range(height * width):
            partial = torch.rand_like(x) * 2 - 1
            partial.view(2, x.shape[1], -1)[:, :, :p] = x.view(2, x.shape[1], -1)[:, :, :p]
            r, c = divmod(p, width)
            worst = max(worst, float((model(partial, labels)[:, :, r, c] - seen[:, :, r, c]).abs().max()))
    assert worst <= 1e-4


def test_cache_memory_grows_with_width_not_height():
    def cache_numel(size):
        model = tiny_model(image_size=size, nonlocal_block=True)
        net = CachedNetwork(model, 2, None)
        with torch.no_grad():
            net.start_row(0)  # the per-row terms exist from here on
        return sum(t.numel() for t in net.state_tensors(include_nonlocal=False))

    assert cache_numel((8, 12)) == cache_numel((32, 12))
    assert cache_numel((8, 24)) > cache_numel((8, 12))
