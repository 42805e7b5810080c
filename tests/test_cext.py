"""The C++ engine (csrc/, fastpixel/sampling/engines/cext.py): each pixel op against its Triton kernel
file's float64 reference, whole samplings (which also run the row ops) against the PyTorch
cached sampler, and a CPU path that never imports Triton. Its builds: tests/test_cext_builds.py."""
import importlib.util
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import fastpixel
from fastpixel.backend import choose
from fastpixel.sampling.engines.cext import _PRODUCT, OpList, engine_call, engine_filter, load_engine, pack_op
from fastpixel.kernels.ops import Column, ColumnConv, ColumnCopy, SamplePixel
from tests.conftest import assert_differences_lie_on_bin_edges, cached_run, tiny_model, torch_threads

if shutil.which(os.environ.get("CXX", "c++")) is None:
    pytest.skip("no C++ compiler to build the engine with", allow_module_level=True)

CPU = "cpu"
# the pixel ops' references live beside their Triton kernels, which import Triton
with_references = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")


def in_engine(launch) -> None:
    dtype = next(a.dtype for a in launch.args if isinstance(a, torch.Tensor) and a.is_floating_point())
    engine_call([launch], dtype)()


# --------------------------------------------------------------------------- op descriptors
def test_an_op_descriptor_holds_its_kind_then_each_argument_as_the_engine_reads_it():
    """Tensors as their addresses, None as 0, ints and bools as they are; an int64 position
    and more arguments than the engine's slots are refused before the engine sees them."""
    t, position = torch.zeros(3), torch.zeros(1, dtype=torch.int32)
    op = pack_op(_PRODUCT, [position, None, 7, True, False, t[1:], -2], 12)
    assert op.dtype == np.int64 and op.tolist() == [_PRODUCT, position.data_ptr(), 0, 7, 1, 0,
                                                    t.data_ptr() + t.element_size(), -2, 0, 0, 0, 0]
    with pytest.raises(ValueError, match="int32"):
        pack_op(_PRODUCT, [torch.zeros(1, dtype=torch.int64)], 12)
    with pytest.raises(ValueError, match="more than the engine's 11"):
        pack_op(_PRODUCT, list(range(12)), 12)


# --------------------------------------------------------------------------- products
@pytest.mark.parametrize("panel", [1, 3, 16, 24, 32, 64, 100, 300])
@pytest.mark.parametrize("m", [1, 7, 30])
def test_a_product_reads_its_filter_in_panels_of_any_width(panel, m):
    """The engine lays filters out in panels of its tiles' width, and reads whatever width an
    op says: a call recorded on another machine (tests/test_cext_builds.py's ARM64 replay)
    brings that machine's. One row (a pixel at batch 1), a few (a batch's pixel) and many
    (a row), each shared among threads (k x n past the engine's threshold)."""
    torch.manual_seed(0)
    k, n = 60, 300
    a, w = torch.randn(m, k, dtype=torch.float64), torch.randn(k, n, dtype=torch.float64)
    out, position = torch.empty(m, n, dtype=torch.float64), torch.zeros(1, dtype=torch.int32)
    filter_ = engine_filter(w, panel)
    run, slots = load_engine(torch.float64)
    runs_a, no_init, runs_out = [a, k, 0, 1, k, k], [None, 0, 0, 0, 0, 0], [out, n, 0, 1, n, n]
    op = pack_op(_PRODUCT, [position, 1, m, *runs_a, False, filter_, n, *no_init, None, 0, *runs_out, panel], slots)
    with torch_threads(2):
        OpList(run, [op], [a, filter_, out, position])()
    torch.testing.assert_close(out, a @ w, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------- pixel ops
@with_references
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", [
    dict(batch=3, n=7, x_raw=7, kw=2, nonlinearity="concat_elu", skip=(7, "concat_elu")),   # block input, with skip
    dict(batch=5, n=20, x_raw=20, kw=2, gate=True, width=7, p=20, nonlinearity="elu"),       # gated output, odd sizes
    dict(batch=17, n=40, x_raw=40, kw=2, gate=True, nonlinearity="relu"),                    # tiles and their edges
    dict(batch=2, n=6, x_raw=6, kw=2, stride=2, level=1, fresh=False, p=70),                 # downsampling
    dict(batch=2, n=9, x_raw=3, kw=1, col_shift=-1, fresh=False, p=24),                      # left of the image: zeros
    dict(batch=4, n=11, x_raw=8, kw=1, store=False, nonlinearity="elu", per_column_term=False),  # 1x1 with a bias
])
def test_column_conv_op_matches_reference(case, dtype, monkeypatch):
    from tests import test_kernel_column_conv
    monkeypatch.setattr(test_kernel_column_conv, "DEVICE", CPU)
    test_kernel_column_conv.run(**case, dtype=dtype, call=in_engine)


@pytest.mark.parametrize("dtype, ulps", [(torch.float32, 2.0 ** -21), (torch.float64, 2.0 ** -50)])
def test_engine_elu_and_gate_stay_within_a_few_ulps_far_from_zero(dtype, ulps):
    """The engine's own e^x and e^x - 1 (csrc/step.cpp), where plain randn inputs never go."""
    magnitudes = torch.logspace(-12, 3, 200, dtype=torch.float64)
    x = torch.cat([-magnitudes, magnitudes, torch.zeros(1, dtype=torch.float64)]).to(dtype)[None]
    n, position = x.shape[1], torch.zeros(1, dtype=torch.int32)
    elu = torch.empty_like(x)
    in_engine(ColumnConv(position, None, torch.eye(n, dtype=dtype), torch.zeros(n, dtype=dtype), elu,
                          width=1, kw=1, x=x, nonlinearity="elu"))
    expected = torch.nn.functional.elu(x.double())
    assert ((elu.double() - expected).abs() <= ulps * expected.abs()).all()
    gated = torch.empty_like(x)  # 0 + 1 * sigmoid(x): the gate's a is its term, its b is x
    weight = torch.cat([torch.zeros(n, n, dtype=dtype), torch.eye(n, dtype=dtype)], dim=1)
    term = torch.cat([torch.ones(n, dtype=dtype), torch.zeros(n, dtype=dtype)])
    in_engine(ColumnConv(position, None, weight, term, gated, width=1, kw=1, x=x,
                          residual=torch.zeros_like(x)))
    expected = torch.sigmoid(x.double())
    tiny = torch.finfo(dtype).tiny  # where e^-x is clamped, sigmoid is below the normal numbers
    assert ((gated.double() - expected).abs() <= ulps * expected.abs() + tiny).all()


@with_references
@pytest.mark.parametrize("position", [0, 47])
@pytest.mark.parametrize("src_at, dst_at, count", [
    (Column(), Column(scale=1, offset=1), 5),
    (Column(level=1, scale=1, row_mask=1, row_columns=6), Column(), 7),
    (Column(scale=1, row_mask=-1, row_columns=12), Column(level=1, scale=2, offset=12), 3),
])
def test_column_copy_op_matches_reference(position, src_at, dst_at, count):
    from fastpixel.kernels import column_copy
    src, dst = torch.randn(3, 64, 7, dtype=torch.float64), torch.randn(3, 30, 5, dtype=torch.float64)
    expected = dst.clone()
    column_copy.reference(src, expected, position, count, width=12, src_at=src_at, dst_at=dst_at)
    pos = torch.tensor([position], dtype=torch.int32)
    in_engine(ColumnCopy(pos, src, dst, count, width=12, src_at=src_at, dst_at=dst_at))
    assert torch.equal(dst, expected)


def engine_sample(params, noise, channels):
    """mixture_sample.sample with the engine: one draw per row."""
    out = torch.empty(params.shape[0], channels, dtype=params.dtype)
    position = torch.zeros(1, dtype=torch.int32)
    in_engine(SamplePixel(params, noise[:, :, None], position, channels, out))
    return out


@with_references
@pytest.mark.parametrize("channels, nr_mix", [(1, 1), (1, 5), (3, 10)])
def test_mixture_draw_equals_mixture_sample_exactly_in_float64(channels, nr_mix, monkeypatch):
    from tests import test_kernel_mixture_sample
    monkeypatch.setattr(test_kernel_mixture_sample, "DEVICE", CPU)
    params, noise = test_kernel_mixture_sample.random_inputs(1000, nr_mix, channels, torch.float64, seed=channels)
    params[:3, 1 % nr_mix] = float("nan")  # a NaN logit is chosen, as torch.argmax chooses it
    expected = test_kernel_mixture_sample.mixture_sample.reference(params, noise, channels)
    assert torch.equal(engine_sample(params, noise, channels), expected)


@with_references
@pytest.mark.parametrize("channels, nr_mix", [(1, 5), (3, 10)])
def test_mixture_draw_in_float32_differs_only_rarely_and_at_bin_edges(channels, nr_mix, monkeypatch):
    from tests import test_kernel_mixture_sample
    monkeypatch.setattr(test_kernel_mixture_sample, "DEVICE", CPU)
    params, noise = test_kernel_mixture_sample.random_inputs(2000, nr_mix, channels, torch.float32, seed=7)
    got = engine_sample(params, noise, channels)
    expected = test_kernel_mixture_sample.mixture_sample.reference(params, noise, channels)
    assert test_kernel_mixture_sample._unexplained(params, noise, channels, got, expected) == []
    assert (got != expected).any(dim=1).double().mean() <= 0.005


# --------------------------------------------------------------------------- samplers
OPTIONS = [
    dict(channels=3, num_classes=3, coordconv=True, nonlocal_block=True),
    dict(channels=1, nr_resnet=2, nonlocal_block=True, resnet_nonlinearity="elu", image_size=(12, 8)),
    dict(channels=1, coordconv=True, resnet_nonlinearity="relu", nr_logistic_mix=1, image_size=(4, 8)),
    dict(channels=3, num_classes=2, nr_filters=20, image_size=(8, 16)),
]


@pytest.mark.parametrize("options", OPTIONS)
def test_cext_steps_match_torch_steps_and_a_forward_pass_float64(options):
    model = tiny_model(**{"image_size": (8, 8), **options})
    x_torch, params_torch = cached_run(model, 3, 7, "torch")
    x_cext, params_cext = cached_run(model, 3, 7, "cext")
    assert (params_cext - params_torch).abs().max() <= 1e-10
    assert torch.equal(x_cext, x_torch)
    labels = None if model.config.num_classes is None else torch.arange(3) % model.config.num_classes
    with torch.no_grad():  # causal: a pixel's parameters depend only on the final values before it
        assert (model(x_cext, labels) - params_cext).abs().max() <= 1e-10


@pytest.mark.parametrize("options", OPTIONS[:2])
def test_a_batch_shared_among_threads_gives_one_threads_bits(options):
    """Nine images on two threads, wide enough layers that every call is shared: each thread
    runs every op of a row or a pixel on its own images (csrc/step.cpp `run`), 4 and 5 of
    them; on one thread, one runs all nine."""
    model = tiny_model(**{"image_size": (8, 8), **options, "nr_filters": 64})
    with torch_threads(1):
        x_one, params_one = cached_run(model, 9, 4, "cext")
    with torch_threads(2):
        x_two, params_two = cached_run(model, 9, 4, "cext")
    x_torch, params_torch = cached_run(model, 9, 4, "torch")
    assert torch.equal(x_two, x_one) and torch.equal(params_two, params_one)
    assert torch.equal(x_two, x_torch) and (params_two - params_torch).abs().max() <= 1e-10


@pytest.mark.parametrize("options", OPTIONS[:2])
def test_cext_steps_in_float32_differ_only_where_a_draw_lies_on_a_bin_edge(options):
    model = tiny_model(**{"image_size": (8, 8), **options, "dtype": torch.float32})
    n, seed = 4, 1
    x_torch, params_torch = cached_run(model, n, seed, "torch")
    x_cext, params_cext = cached_run(model, n, seed, "cext")
    assert (params_cext - params_torch).abs().max() <= 1e-4
    assert_differences_lie_on_bin_edges(model, seed, x_cext, x_torch, params_torch)


def test_sample_picks_cext_on_the_cpu_and_draws_the_naive_samplers_images():
    model = tiny_model(channels=3, num_classes=2, image_size=(4, 8))
    assert choose(CPU, dtype=torch.float64) == choose(CPU, dtype=torch.float32) == "cext"
    assert choose(CPU, dtype=torch.bfloat16) == "torch"
    assert torch.equal(fastpixel.sample(model, 3, seed=5), fastpixel.sample(model, 3, fast=False, seed=5))


_WITHOUT_TRITON = """
import sys
sys.modules["triton"] = None  # as on a machine without Triton: importing it fails
import torch
import fastpixel
from fastpixel import backend
from tests.conftest import tiny_model
model = tiny_model(channels=3, nonlocal_block=True, image_size=(4, 8))  # float64: equal images
assert backend.choose("cpu", dtype=torch.float64) == "cext"
assert torch.equal(fastpixel.sample(model, 2, fast=True, seed=1), fastpixel.sample(model, 2, fast=True, seed=1, backend="torch"))
"""


def test_cext_sampling_runs_without_triton():
    env = {k: v for k, v in os.environ.items() if k != "FASTPIXEL_BACKEND"}
    result = subprocess.run([sys.executable, "-c", _WITHOUT_TRITON], capture_output=True, text=True, env=env,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
