"""The Triton engine's pixel steps (fastpixel/sampling/engines/fused.py) against the PyTorch cached
sampler and the naive sampler. Without a GPU the kernels run in Triton's interpreter, so
the images are small: every launch pattern still occurs (4 rows reach all three
resolutions), and 2 images exercise the batch."""
import pytest
import torch

import fastpixel
from tests.conftest import DEVICE, assert_differences_lie_on_bin_edges, cached_run, tiny_model

pytest.importorskip("triton")

OPTIONS = [
    dict(channels=3, num_classes=3, coordconv=True, nonlocal_block=True),
    dict(channels=1, nr_resnet=2, nonlocal_block=True, resnet_nonlinearity="elu", image_size=(8, 4)),
    dict(channels=1, coordconv=True, resnet_nonlinearity="relu", nr_logistic_mix=1),
    dict(channels=3, num_classes=2, image_size=(4, 12)),
]


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
    assert (x_triton != x_torch).flatten(1).any(dim=1).sum() <= 1
    assert_differences_lie_on_bin_edges(model, seed, x_triton, x_torch, params_torch)


def test_sample_with_triton_backend_equals_naive_sampling():
    model = tiny_model(num_classes=2, image_size=(4, 8)).to(DEVICE)
    expected = fastpixel.sample(model, 2, fast=False, seed=5)
    assert torch.equal(fastpixel.sample(model, 2, fast=True, seed=5, backend="triton"), expected)


def test_an_automatic_triton_that_fails_at_run_time_falls_back_to_torch_with_the_same_images(monkeypatch):
    """The Triton path has never run on a GPU: where `auto` chose it and its first step fails
    (a compile error on the user's Triton, a capture or launch failure), one warning names the
    error and the PyTorch engine finishes the request; a forced Triton still fails loudly."""
    from fastpixel import backend
    from fastpixel.sampling.engines import fused

    model = tiny_model(image_size=(4, 8), num_classes=2).to(DEVICE)
    expected = fastpixel.sample(model, 3, seed=5, backend="torch", batch_size=2)

    def launch_fails(self, r, c, known=None):
        raise RuntimeError("simulated launch failure: invalid device function")

    monkeypatch.setattr(fused.FusedSteps, "step", launch_fails)
    monkeypatch.setattr(backend, "_automatic", lambda device, dtype: "triton")
    monkeypatch.delenv("FASTPIXEL_BACKEND", raising=False)
    with pytest.warns(RuntimeWarning, match="the Triton engine failed \\(RuntimeError: simulated launch failure"):
        images = fastpixel.sample(model, 3, seed=5, batch_size=2)
    assert torch.equal(images, expected)
    with pytest.raises(RuntimeError, match="simulated launch failure"):
        fastpixel.sample(model, 3, seed=5, backend="triton")
