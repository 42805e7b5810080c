"""kernels/column_conv.py against its float64 reference, on random inputs (Triton's
interpreter on the CPU; the real device where there is one)."""
import pytest
import torch

from tests.conftest import DEVICE

column_conv = pytest.importorskip("fastpixel.kernels.column_conv")

TOLERANCE = {torch.float32: 2e-5, torch.float64: 1e-12}


def run(batch, n, x_raw, *, kw, stride=1, level=0, col_shift=0, fresh=True, store=True, nonlinearity="concat_elu",
        skip=None, gate=False, per_column_term=True, dtype=torch.float32, width=12, p=None, call=lambda launch: launch()):
    """Bind a ColumnConv on random inputs, run it with `call` (default: the Triton launch)
    and compare its output and its cache write with the float64 reference."""
    factor = 2 if nonlinearity == "concat_elu" else 1
    cin = factor * x_raw if fresh else x_raw
    out_width = (width >> level)
    padded = stride * out_width + kw + abs(col_shift)
    n_out = 2 * n if gate else n
    g = torch.Generator().manual_seed(batch * 1000 + n)

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype).to(DEVICE)

    cache, weight = rand(batch, padded, cin), rand(kw * cin, n_out) / cin
    term = rand(batch, out_width, n_out) if per_column_term else rand(n_out)
    x = rand(batch, x_raw) if fresh else None
    skip_args = None
    if skip is not None:
        s_raw, s_nl = skip
        skip_args = (rand(batch, s_raw), rand((2 if s_nl == "concat_elu" else 1) * s_raw, n), s_nl)
    residual = rand(batch, n) if gate else None
    p = (width * 3 + width - 1) if p is None else p
    position = torch.tensor([p], dtype=torch.int32, device=DEVICE)
    expected, fresh_column = column_conv.reference(cache, weight, term, p, width=width, kw=kw, stride=stride, level=level,
                                                   col_shift=col_shift, x=x, nonlinearity=nonlinearity,
                                                   skip=skip_args, residual=residual)
    before = cache.clone()
    out = torch.empty(batch, n, dtype=dtype, device=DEVICE)
    call(column_conv.ColumnConv(position, cache, weight, term, out, width=width, kw=kw, stride=stride, level=level,
                                col_shift=col_shift, x=x, nonlinearity=nonlinearity, store=store and fresh,
                                skip=skip_args, residual=residual))
    tol = TOLERANCE[dtype]
    assert (out.double() - expected).abs().max() <= tol * max(1.0, float(expected.abs().max()))
    at = stride * ((p % width) >> level) + col_shift + kw - 1
    if store and fresh:  # the fresh column, and nothing else, is written into the cache
        assert (cache[:, at].double() - fresh_column).abs().max() <= tol
        before[:, at] = cache[:, at]
    assert torch.equal(cache, before)


@pytest.mark.parametrize("nonlinearity", ["concat_elu", "elu", "relu", "identity"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_block_input_conv_with_skip_matches_reference(nonlinearity, dtype):
    run(3, 7, 7, kw=2, nonlinearity=nonlinearity, skip=(7, nonlinearity), dtype=dtype)


@pytest.mark.parametrize("batch, n, width", [(1, 5, 12), (5, 20, 7), (17, 3, 9)])
def test_gated_output_conv_matches_reference(batch, n, width):
    run(batch, n, n, kw=2, gate=True, width=width, p=3 * width - 1)  # the last column of a row


def test_strided_conv_at_half_resolution_reads_only_the_cache():
    run(2, 6, 6, kw=2, stride=2, level=1, fresh=False, width=12, p=12 * 5 + 10)


@pytest.mark.parametrize("p", [24, 29])  # column 0 reads the zero column left of the image, column 5 reads column 4
def test_previous_column_conv_with_shift_reads_zeros_left_of_the_image(p):
    run(2, 9, 3, kw=1, col_shift=-1, fresh=False, p=p)


def test_pointwise_layer_with_bias_and_elu_prologue():
    run(4, 11, 8, kw=1, store=False, nonlinearity="elu", per_column_term=False)


def test_bad_arguments_are_refused_with_a_reason():
    z = torch.zeros
    with pytest.raises(ValueError, match="weight must be contiguous"):
        column_conv.ColumnConv(z(1, dtype=torch.int32), z(2, 5, 4), z(3, 4), z(4), z(2, 4), width=4, kw=2)
    with pytest.raises(ValueError, match="position must be one integer"):
        column_conv.ColumnConv(z(1), z(2, 5, 4), z(8, 4), z(4), z(2, 4), width=4, kw=2)
