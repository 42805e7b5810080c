"""PixelCNN++'s shifted convolutions for training, with what surrounds them fused: forward
and backward.

In PyTorch a gated residual block is a dozen launches: concat_elu (a cat, a negation and
an ELU) before each convolution, the padding, the convolution, the bias, the skip
input's own concat_elu and 1x1 layer, the class bias, the chunk, the sigmoid, the product
and the residual sum, and autograd keeps most of their outputs. Here the block is two
launches, each an implicit GEMM over output pixels x output channels:

- `conv`: nl(x) padded and convolved, + bias, + a 1x1 layer of nl(skip) (the same
  accumulator: a second stretch of the reduction), the nonlinearity applied to the input
  as it is loaded (concat_elu's channel k < C is elu(x_k), channel C + k is elu(-x_k));
- `gated_conv`: the same with 2N outputs, + a per-image class bias, then
  `residual + a * sigmoid(b)` in registers; the pre-gate (a, b) is kept for the backward.

The backward is three kernels: the gate's derivative (elementwise, from the kept pre-gate),
the input gradient (the transposed convolution, with the nonlinearity's derivative applied
as it is stored: concat_elu's two halves meet in one program), and the weight gradient
(recomputing nl(x) instead of keeping it). Bias gradients are PyTorch sums.

Every program reads whole weight tiles, so the launchers pass weights tap-major, (KH, KW,
in, out) or (KH, KW, out, in), with the tile's wide axis contiguous: in PyTorch's
(out, in, KH, KW) order each value of a tile sits in a different 32-byte sector.

Padding is (left, right, top, bottom) as `fastpixel.models.pixelcnnpp.layers.ShiftedConv2d.padding`; the
output has (H + top - KH) // stride + 1 rows. Tensors are NCHW and contiguous. float32
products use TF32 where PyTorch's own convolutions would (torch.backends.cudnn.allow_tf32);
float64 and the interpreter compute exactly.

Which backend runs a training convolution is `fastpixel.backend.choose_conv`'s decision.
These kernels have not been timed on a GPU against cuDNN yet, so the automatic choice keeps
cuDNN everywhere; `FASTPIXEL_BACKEND=triton` selects them (benchmarks/gpu_suite.sh times both).
Dropout between a block's two convolutions (training with `dropout > 0`) keeps PyTorch.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .column_conv import _nl, _nl_source
from .ops import NONLINEARITIES, Op, check, triton_interpreted

_FLOAT_TYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_DOT_TYPES = {torch.float32: tl.float32, torch.float64: tl.float64, torch.bfloat16: tl.bfloat16,
              torch.float16: tl.float16}


# --------------------------------------------------------------------------- reference
def nl_reference(x: torch.Tensor, nonlinearity: str) -> torch.Tensor:
    if nonlinearity == "concat_elu":
        return F.elu(torch.cat([x, -x], dim=1))
    return {"identity": lambda t: t, "elu": F.elu, "relu": F.relu}[nonlinearity](x)


def reference(x, weight, bias, padding, stride=1, nonlinearity="identity", skip=None, class_bias=None,
              residual=None):
    """What `conv` (residual None) or `gated_conv` computes, in plain PyTorch (differentiable).
    skip: (input (B, S, Ho, Wo), 1x1 weight (N, S'), nonlinearity); class_bias (B, N_OUT)."""
    out = F.conv2d(F.pad(nl_reference(x, nonlinearity), padding), weight, bias, stride=stride)
    if skip is not None:
        s, s_weight, s_nl = skip
        out = out + F.conv2d(nl_reference(s, s_nl), s_weight[:, :, None, None])
    if class_bias is not None:
        out = out + class_bias[:, :, None, None]
    if residual is None:
        return out
    a, b = out.chunk(2, dim=1)
    return residual + a * torch.sigmoid(b)


# --------------------------------------------------------------------------- kernels
@triton.jit
def _nl_tile(ptr, image_offset, pixel, pixel_ok, k, k_ok, C, HW, NL: tl.constexpr, COMPUTE: tl.constexpr):
    """nl(x) at (pixels, nl-channels k), (BLOCK_M, BLOCK_K); concat_elu's k >= C reads -x[k - C]."""
    raw, negative = _nl_source(k, C, NL)
    v = tl.load(ptr + image_offset[:, None] + raw[None, :].to(tl.int64) * HW + pixel[:, None],
                mask=pixel_ok[:, None] & k_ok[None, :], other=0.0).to(COMPUTE)
    return _nl(tl.where(negative[None, :], -v, v), NL)


@triton.jit
def _nl_derivative(x, NL: tl.constexpr):
    """d nl / dx of elu, relu or identity at x (ELU's is e^x at and below 0, as PyTorch's)."""
    if NL == 1 or NL == 3:
        return tl.where(x > 0, 1.0, tl.exp(x))
    elif NL == 2:
        return tl.where(x > 0, 1.0, 0.0)
    else:
        return tl.full(x.shape, 1.0, x.dtype)


@triton.jit
def _tile(M, N, HEIGHT, WIDTH, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's pixels m (flat over (B, HEIGHT, WIDTH)) and channels n, which exist, and
    each pixel's image, row and column."""
    m = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    return m, n, m < M, n < N, m // (HEIGHT * WIDTH), (m // WIDTH) % HEIGHT, m % WIDTH


@triton.jit
def _conv_kernel(
    # pointers: x (B, C, H, W); weight (KH, KW, CIN, N_OUT); bias (N_OUT,); skip (B, S, HO, WO) and its
    # weight (SIN, N); class bias (B, N_OUT); residual (B, N, HO, WO); out (B, N, HO, WO); pre-gate (B, 2N, HO, WO)
    x_ptr, w_ptr, bias_ptr, s_ptr, sw_ptr, cb_ptr, r_ptr, out_ptr, pre_ptr,
    # sizes: N is the output's channels (a gated conv computes 2N before the gate)
    C, H, W, HO, WO, N, S, M, PAD_T, PAD_L,
    KH: tl.constexpr, KW: tl.constexpr, STRIDE: tl.constexpr, NL: tl.constexpr,
    HAS_SKIP: tl.constexpr, SKIP_NL: tl.constexpr, HAS_CB: tl.constexpr, GATE: tl.constexpr,
    COMPUTE: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    m, n, m_ok, n_ok, image, i, j = _tile(M, N, HO, WO, BLOCK_M, BLOCK_N)  # output pixels x output channels
    cin = 2 * C if NL == 3 else C
    n_out = 2 * N if GATE else N
    acc_a = tl.zeros((BLOCK_M, BLOCK_N), dtype=COMPUTE)
    acc_b = tl.zeros((BLOCK_M, BLOCK_N), dtype=COMPUTE)
    for dy in tl.static_range(KH):
        for dx in tl.static_range(KW):
            p, q = i * STRIDE + dy - PAD_T, j * STRIDE + dx - PAD_L
            at_ok = m_ok & (p >= 0) & (p < H) & (q >= 0) & (q < W)
            for k0 in range(0, cin, BLOCK_K):
                k = k0 + tl.arange(0, BLOCK_K)
                k_ok = k < cin
                v = _nl_tile(x_ptr, image * C * H * W, p * W + q, at_ok, k, k_ok, C, H * W, NL, COMPUTE).to(DOT)
                w_at = w_ptr + ((dy * KW + dx) * cin + k[:, None]) * n_out + n[None, :]
                w_ok = k_ok[:, None] & n_ok[None, :]
                acc_a += tl.dot(v, tl.load(w_at, mask=w_ok, other=0.0).to(DOT), input_precision=PRECISION,
                                out_dtype=COMPUTE)
                if GATE:
                    w = tl.load(w_at + N, mask=w_ok, other=0.0).to(DOT)
                    acc_b += tl.dot(v, w, input_precision=PRECISION, out_dtype=COMPUTE)
    if HAS_SKIP:  # + nl(skip) @ skip weight^T at the output pixel: a 1x1 layer in the same accumulator
        sin = 2 * S if SKIP_NL == 3 else S
        for k0 in range(0, sin, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            k_ok = k < sin
            v = _nl_tile(s_ptr, image * S * HO * WO, i * WO + j, m_ok, k, k_ok, S, HO * WO, SKIP_NL, COMPUTE).to(DOT)
            w = tl.load(sw_ptr + k[:, None] * N + n[None, :], mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            acc_a += tl.dot(v, w.to(DOT), input_precision=PRECISION, out_dtype=COMPUTE)
    ok = m_ok[:, None] & n_ok[None, :]
    acc_a += tl.load(bias_ptr + n, mask=n_ok, other=0.0).to(COMPUTE)[None, :]
    if HAS_CB:
        acc_a += tl.load(cb_ptr + image[:, None] * n_out + n[None, :], mask=ok, other=0.0).to(COMPUTE)
    at = image[:, None] * (N * HO * WO) + n[None, :] * (HO * WO) + (i * WO + j)[:, None]
    if GATE:
        acc_b += tl.load(bias_ptr + N + n, mask=n_ok, other=0.0).to(COMPUTE)[None, :]
        if HAS_CB:
            acc_b += tl.load(cb_ptr + image[:, None] * n_out + N + n[None, :], mask=ok, other=0.0).to(COMPUTE)
        pre_at = at + image[:, None] * (N * HO * WO)  # (B, 2N, HO, WO): image b's a at 2b * N * HO * WO
        tl.store(pre_ptr + pre_at, acc_a.to(pre_ptr.dtype.element_ty), mask=ok)
        tl.store(pre_ptr + pre_at + N * HO * WO, acc_b.to(pre_ptr.dtype.element_ty), mask=ok)
        acc_a = tl.load(r_ptr + at, mask=ok, other=0.0).to(COMPUTE) + acc_a * (1.0 / (1.0 + tl.exp(-acc_b)))
    tl.store(out_ptr + at, acc_a.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _gate_backward_kernel(
    # pointers: d out (B, N, HO, WO); pre-gate (B, 2N, HO, WO); d pre-gate (B, 2N, HO, WO)
    grad_ptr, pre_ptr, dpre_ptr,
    TOTAL, NHW, COMPUTE: tl.constexpr, BLOCK: tl.constexpr,
):
    """d/da = g * sigmoid(b), d/db = g * a * sigmoid(b) * (1 - sigmoid(b))."""
    e = (tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
    ok = e < TOTAL
    at = e + (e // NHW) * NHW  # the a half of image e // NHW
    g = tl.load(grad_ptr + e, mask=ok, other=0.0).to(COMPUTE)
    a = tl.load(pre_ptr + at, mask=ok, other=0.0).to(COMPUTE)
    gate = 1.0 / (1.0 + tl.exp(-tl.load(pre_ptr + at + NHW, mask=ok, other=0.0).to(COMPUTE)))
    tl.store(dpre_ptr + at, (g * gate).to(dpre_ptr.dtype.element_ty), mask=ok)
    tl.store(dpre_ptr + at + NHW, (g * a * gate * (1.0 - gate)).to(dpre_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _conv_input_grad_kernel(
    # pointers: d pre-activation output (B, N_OUT, HO, WO); weight (KH, KW, N_OUT, CIN); x (B, C, H, W); d x
    dy_ptr, w_ptr, x_ptr, dx_ptr,
    C, H, W, HO, WO, N_OUT, M, PAD_T, PAD_L,
    KH: tl.constexpr, KW: tl.constexpr, STRIDE: tl.constexpr, NL: tl.constexpr,
    COMPUTE: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """d x = nl'(x) * (the transposed convolution of d out); concat_elu's two halves combine here."""
    m, c, m_ok, c_ok, image, p, q = _tile(M, C, H, W, BLOCK_M, BLOCK_C)  # input pixels x input channels
    cin = 2 * C if NL == 3 else C
    acc_pos = tl.zeros((BLOCK_M, BLOCK_C), dtype=COMPUTE)
    acc_neg = tl.zeros((BLOCK_M, BLOCK_C), dtype=COMPUTE)
    for dy in tl.static_range(KH):
        for dx in tl.static_range(KW):
            # output (i, j) reads input (i * STRIDE + dy - PAD_T, j * STRIDE + dx - PAD_L)
            ii, jj = p + PAD_T - dy, q + PAD_L - dx
            i, j = tl.where(ii >= 0, ii, 0) // STRIDE, tl.where(jj >= 0, jj, 0) // STRIDE
            at_ok = m_ok & (ii >= 0) & (jj >= 0) & (ii % STRIDE == 0) & (jj % STRIDE == 0) & (i < HO) & (j < WO)
            for k0 in range(0, N_OUT, BLOCK_K):
                k = k0 + tl.arange(0, BLOCK_K)
                k_ok = k < N_OUT
                g = tl.load(dy_ptr + image[:, None] * (N_OUT * HO * WO) + k[None, :] * (HO * WO) + (i * WO + j)[:, None],
                            mask=at_ok[:, None] & k_ok[None, :], other=0.0).to(DOT)
                w_at = w_ptr + ((dy * KW + dx) * N_OUT + k[:, None]) * cin + c[None, :]
                w_ok = k_ok[:, None] & c_ok[None, :]
                acc_pos += tl.dot(g, tl.load(w_at, mask=w_ok, other=0.0).to(DOT), input_precision=PRECISION,
                                  out_dtype=COMPUTE)
                if NL == 3:
                    w = tl.load(w_at + C, mask=w_ok, other=0.0).to(DOT)
                    acc_neg += tl.dot(g, w, input_precision=PRECISION, out_dtype=COMPUTE)
    ok = m_ok[:, None] & c_ok[None, :]
    at = image[:, None] * (C * H * W) + c[None, :] * (H * W) + (p * W + q)[:, None]
    x = tl.load(x_ptr + at, mask=ok, other=0.0).to(COMPUTE)
    grad = acc_pos * _nl_derivative(x, NL)
    if NL == 3:
        grad = grad - acc_neg * _nl_derivative(-x, NL)
    tl.store(dx_ptr + at, grad.to(dx_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _conv_weight_grad_kernel(
    # pointers: d pre-activation output (B, N_OUT, HO, WO); x (B, C, H, W); d weight (N_OUT, CIN, KH, KW)
    dy_ptr, x_ptr, dw_ptr,
    C, H, W, HO, WO, N_OUT, M, PAD_T, PAD_L,
    KH: tl.constexpr, KW: tl.constexpr, STRIDE: tl.constexpr, NL: tl.constexpr,
    COMPUTE: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """d weight[:, :, dy, dx] = d out^T @ nl(x) shifted by the tap, summed over every output
    pixel; nl(x) is recomputed, not kept. Program axis 2 is the tap dy * KW + dx."""
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    tap = tl.program_id(2)
    dy, dx = tap // KW, tap % KW
    cin = 2 * C if NL == 3 else C
    n_ok, k_ok = n < N_OUT, k < cin
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=COMPUTE)
    for m0 in range(0, M, BLOCK_M):
        m = (m0 + tl.arange(0, BLOCK_M)).to(tl.int64)
        m_ok = m < M
        image, i, j = m // (HO * WO), (m // WO) % HO, m % WO
        g = tl.load(dy_ptr + image[None, :] * (N_OUT * HO * WO) + n[:, None] * (HO * WO) + (i * WO + j)[None, :],
                    mask=n_ok[:, None] & m_ok[None, :], other=0.0).to(DOT)
        p, q = i * STRIDE + dy - PAD_T, j * STRIDE + dx - PAD_L
        at_ok = m_ok & (p >= 0) & (p < H) & (q >= 0) & (q < W)
        v = _nl_tile(x_ptr, image * C * H * W, p * W + q, at_ok, k, k_ok, C, H * W, NL, COMPUTE).to(DOT)
        acc += tl.dot(g, v, input_precision=PRECISION, out_dtype=COMPUTE)
    at = n[:, None] * (cin * KH * KW) + k[None, :] * (KH * KW) + tap
    tl.store(dw_ptr + at, acc.to(dw_ptr.dtype.element_ty), mask=n_ok[:, None] & k_ok[None, :])


# --------------------------------------------------------------------------- launchers
def _precision(dtype: torch.dtype, device: torch.device) -> tuple:
    """(COMPUTE, DOT, PRECISION): accumulate in float64 for float64, else float32; TF32 products
    for float32 on a GPU where PyTorch's convolutions use them."""
    compute = tl.float64 if dtype == torch.float64 else tl.float32
    tf32 = dtype == torch.float32 and device.type != "cpu" and torch.backends.cudnn.allow_tf32  # meta: as on a GPU
    # The interpreter's 16-bit tl.dot multiplies garbage; products of 16-bit values are exact
    # in float32, so multiplying them there is the same arithmetic.
    dot = tl.float32 if dtype in (torch.bfloat16, torch.float16) and triton_interpreted() else _DOT_TYPES[dtype]
    return compute, dot, "tf32" if tf32 else "ieee"


def _geometry(x: torch.Tensor, kernel: tuple[int, int], padding, stride: int) -> tuple[int, int]:
    left, right, top, bottom = padding
    check(bottom == 0 and left >= 0 and right >= 0 and top >= 0, f"padding must be (left, right, top, 0), got {padding}")
    height, width = x.shape[2], x.shape[3]
    return (height + top - kernel[0]) // stride + 1, (width + left + right - kernel[1]) // stride + 1


class ConvOp(Op):
    """One launch of a shifted convolution's forward (`kind` "forward"), or of its backward's
    input gradient ("input_grad") or weight gradient ("weight_grad"), bound to its tensors."""

    family = "shifted_conv"

    def __init__(self, kind: str, x: torch.Tensor, weight: torch.Tensor, padding, stride: int, nonlinearity: str, *,
                 out: torch.Tensor, bias=None, skip=None, class_bias=None, residual=None, pre=None, grad=None):
        check(nonlinearity in NONLINEARITIES, f"nonlinearity must be one of {NONLINEARITIES}")
        check(x.dim() == 4 and x.dtype in _FLOAT_TYPES, f"x must be a floating-point (B, C, H, W) tensor, got {x.dtype}")
        batch, c, height, width = x.shape
        factor = 2 if nonlinearity == "concat_elu" else 1
        n_out, cin, kh, kw = weight.shape
        check(cin == factor * c and weight.dtype == x.dtype,
              f"weight must be ({n_out}, {factor * c}, KH, KW) of {x.dtype}, got {weight.dtype} {tuple(weight.shape)}")
        ho, wo = _geometry(x, (kh, kw), padding, stride)
        sizes = (c, height, width, ho, wo)
        compute, dot, precision = _precision(x.dtype, x.device)
        constexprs = dict(KH=kh, KW=kw, STRIDE=stride, NL=NONLINEARITIES.index(nonlinearity),
                          COMPUTE=compute, DOT=dot, PRECISION=precision)
        if kind == "forward":
            gate = residual is not None
            n = n_out // 2 if gate else n_out
            check(out.shape == (batch, n, ho, wo), f"out must be ({batch}, {n}, {ho}, {wo}), got {tuple(out.shape)}")
            check(bias is not None and bias.shape == (n_out,), f"bias must be ({n_out},)")
            s, s_weight, s_nl = skip if skip is not None else (out, out, "identity")  # dummies are never read
            if skip is not None:
                s_factor = 2 if s_nl == "concat_elu" else 1
                check(s.shape[0] == batch and s.shape[2:] == (ho, wo) and s_weight.shape == (n, s_factor * s.shape[1]),
                      f"skip must be (B, S, {ho}, {wo}) with a ({n}, factor * S) weight")
            if class_bias is not None:
                check(class_bias.shape == (batch, n_out), f"class_bias must be ({batch}, {n_out})")
            if gate:
                check(skip is None, "a gated conv takes no skip input (give it to the conv before)")
                check(residual.shape == out.shape and pre is not None and pre.shape == (batch, n_out, ho, wo),
                      "a gated conv needs a residual like out and a (B, 2N, HO, WO) pre-gate buffer")
            # weights tap-major with the tile's wide axis contiguous: (KH, KW, CIN, N_OUT), skip (SIN, N)
            args = (x, weight.permute(2, 3, 1, 0).contiguous(), bias, s, s_weight.t().contiguous() if skip is not None else out,
                    out if class_bias is None else class_bias,
                    out if residual is None else residual, out, out if pre is None else pre,
                    *sizes, n, s.shape[1], batch * ho * wo, padding[2], padding[0])
            constexprs |= dict(HAS_SKIP=skip is not None, SKIP_NL=NONLINEARITIES.index(s_nl),
                               HAS_CB=class_bias is not None, GATE=gate)
            self.rows, self.columns = batch * ho * wo, n
        else:
            check(grad is not None and grad.shape == (batch, n_out, ho, wo), f"grad must be ({batch}, {n_out}, {ho}, {wo})")
            if kind == "input_grad":
                check(out.shape == x.shape, "out must be shaped like x")
                args = (grad, weight.permute(2, 3, 0, 1).contiguous(), x, out, *sizes, n_out, batch * height * width,
                        padding[2], padding[0])  # weight as (KH, KW, N_OUT, CIN): the tile's wide axis contiguous
                self.rows, self.columns = batch * height * width, c
            else:
                check(kind == "weight_grad" and out.shape == weight.shape, "out must be shaped like weight")
                args = (grad, x, out, *sizes, n_out, batch * ho * wo, padding[2], padding[0])
                self.rows, self.columns, self.taps = n_out, cin, kh * kw
        tensors = [t for t in args if isinstance(t, torch.Tensor)]
        check(all(t.is_contiguous() for t in tensors), "every tensor must be contiguous")
        check(len({t.device for t in tensors}) == 1, "all tensors must be on one device")
        super().__init__(args, constexprs, batch, x.dtype)
        self.kind = kind


class GateBackwardOp(Op):
    """d pre-gate (B, 2N, HO, WO) from d out (B, N, HO, WO) and the pre-gate."""

    family = "shifted_conv"
    kind = "gate_backward"

    def __init__(self, grad: torch.Tensor, pre: torch.Tensor, out: torch.Tensor):
        batch, n, ho, wo = grad.shape
        check(pre.shape == (batch, 2 * n, ho, wo) and out.shape == pre.shape and out.dtype == pre.dtype,
              "pre and out must be (B, 2N, HO, WO) for a (B, N, HO, WO) grad")
        check(all(t.is_contiguous() for t in (grad, pre, out)), "every tensor must be contiguous")
        super().__init__((grad, pre, out, grad.numel(), n * ho * wo), dict(COMPUTE=_precision(pre.dtype, pre.device)[0]),
                         batch, pre.dtype)
        self.total = grad.numel()


def launch_config(op) -> tuple:
    """(kernel, grid, block sizes, options) of a bound ConvOp or GateBackwardOp."""
    if op.kind == "gate_backward":
        return _gate_backward_kernel, (triton.cdiv(op.total, 1024),), dict(BLOCK=1024), dict(num_warps=4)
    wide = op.dtype == torch.float64
    columns = min(max(triton.next_power_of_2(op.columns), 16), 32 if wide else 64)
    reduce = 16 if wide else 32
    pixels = 256 if triton_interpreted() else 32 if wide else 64  # the interpreter pays per program
    if op.kind == "forward":
        blocks = dict(BLOCK_M=pixels, BLOCK_N=columns, BLOCK_K=reduce)
        return _conv_kernel, (triton.cdiv(op.rows, blocks["BLOCK_M"]), triton.cdiv(op.columns, columns)), blocks, \
            dict(num_warps=4)
    if op.kind == "input_grad":
        blocks = dict(BLOCK_M=pixels, BLOCK_C=columns, BLOCK_K=reduce)
        return _conv_input_grad_kernel, (triton.cdiv(op.rows, blocks["BLOCK_M"]), triton.cdiv(op.columns, columns)), \
            blocks, dict(num_warps=4)
    rows = min(max(triton.next_power_of_2(op.rows), 16), 32 if wide else 64)
    blocks = dict(BLOCK_N=rows, BLOCK_K=columns, BLOCK_M=pixels)
    return _conv_weight_grad_kernel, (triton.cdiv(op.rows, rows), triton.cdiv(op.columns, columns), op.taps), blocks, \
        dict(num_warps=4)


def aot_specs(calls: list[tuple]) -> list[tuple]:
    """Every distinct launch that the layer calls `calls` make through these kernels, forward
    and backward, as (jit function, signature, constexprs, options) for `triton.compile`.
    `calls` are (layer, args, kwargs) of shifted convolutions and gated blocks called on meta
    tensors (fastpixel.models.pixelcnnpp.layers.fused_launch_specs records a training step's)."""
    specs = {}
    with torch.device("meta"):
        ops = [op for layer, args, kwargs in calls for op in _training_ops(layer, *args, **kwargs)]
    for op in ops:
        fn, signature, constexprs, options = op.aot_spec()
        specs.setdefault((fn.__name__, repr(sorted(constexprs.items())), repr(signature)), (fn, signature, constexprs, options))
    return list(specs.values())


def _training_ops(layer, x: torch.Tensor, skip: torch.Tensor | None = None, labels=None) -> list[Op]:
    """The launches of one layer's forward and backward on meta tensors like its inputs."""
    x, skip = x.contiguous(), None if skip is None else skip.contiguous()  # as `conv` passes them

    def conv_ops(conv, x, nl, out_channels, gate=False, skip=None, class_bias=None):
        weight = torch.empty(out_channels, conv.v.shape[1], *conv.kernel_size, dtype=x.dtype)
        ho, wo = _geometry(x, conv.kernel_size, conv.padding, conv.stride)
        grad = x.new_empty(x.shape[0], out_channels, ho, wo)
        out = x.new_empty(x.shape[0], out_channels // 2 if gate else out_channels, ho, wo)
        extra = dict(residual=out, pre=grad, class_bias=class_bias) if gate else dict(skip=skip)
        ops = [ConvOp("forward", x, weight, conv.padding, conv.stride, nl, out=out, bias=grad.new_empty(out_channels), **extra),
               ConvOp("weight_grad", x, weight, conv.padding, conv.stride, nl, out=torch.empty_like(weight), grad=grad)]
        if x.requires_grad:  # not the image
            ops.append(ConvOp("input_grad", x, weight, conv.padding, conv.stride, nl, out=torch.empty_like(x), grad=grad))
        if gate:
            ops.append(GateBackwardOp(out, grad, torch.empty_like(grad)))
        if skip is not None:
            w11 = skip[1][:, :, None, None]
            ops += [ConvOp("input_grad", skip[0], w11, (0, 0, 0, 0), 1, skip[2], out=torch.empty_like(skip[0]), grad=grad),
                    ConvOp("weight_grad", skip[0], w11, (0, 0, 0, 0), 1, skip[2], out=torch.empty_like(w11), grad=grad)]
        return ops, out

    if not hasattr(layer, "conv_in"):  # a plain ShiftedConv2d
        return conv_ops(layer, x, "identity", layer.v.shape[0])[0]
    nl, n = layer.nonlinearity_name, layer.conv_in.v.shape[0]
    skip_input = None if layer.skip is None else (skip, torch.empty(n, layer.skip.v.shape[1], dtype=x.dtype), nl)
    first, c = conv_ops(layer.conv_in, x, nl, n, skip=skip_input)
    class_bias = None if layer.class_bias is None else x.new_empty(x.shape[0], 2 * n)
    return first + conv_ops(layer.conv_out, c, nl, 2 * n, gate=True, class_bias=class_bias)[0]


def _run(op: Op, device: torch.device) -> None:
    # Triton launches on the current CUDA device: make it the tensors' (a no-op on the CPU)
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        op()


# --------------------------------------------------------------------------- autograd ops
@torch.library.custom_op("fastpixel::shifted_conv", mutates_args=())
def _conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, skip: torch.Tensor | None,
          skip_weight: torch.Tensor | None, class_bias: torch.Tensor | None, residual: torch.Tensor | None,
          padding: list[int], stride: int, nonlinearity: str, skip_nonlinearity: str) -> tuple[torch.Tensor, torch.Tensor]:
    out, pre = _empty_outputs(x, weight, padding, stride, residual is not None)
    if out.numel():
        skip_args = None if skip is None else (skip, skip_weight, skip_nonlinearity)
        _run(ConvOp("forward", x, weight, padding, stride, nonlinearity, out=out, bias=bias, skip=skip_args,
                    class_bias=class_bias, residual=residual, pre=pre if pre.numel() else None), x.device)
    return out, pre


def _empty_outputs(x, weight, padding, stride, gate):
    ho, wo = _geometry(x, weight.shape[2:], padding, stride)
    n = weight.shape[0] // 2 if gate else weight.shape[0]
    pre = x.new_empty(x.shape[0], weight.shape[0], ho, wo) if gate else x.new_empty(0)
    return x.new_empty(x.shape[0], n, ho, wo), pre


@_conv.register_fake
def _(x, weight, bias, skip, skip_weight, class_bias, residual, padding, stride, nonlinearity, skip_nonlinearity):
    return _empty_outputs(x, weight, padding, stride, residual is not None)


@torch.library.custom_op("fastpixel::shifted_conv_gate_backward", mutates_args=())
def _gate_backward(grad: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(pre)
    if out.numel():
        _run(GateBackwardOp(grad.to(pre.dtype).contiguous(), pre, out), pre.device)
    return out


@_gate_backward.register_fake
def _(grad, pre):
    return torch.empty_like(pre)


@torch.library.custom_op("fastpixel::shifted_conv_grad", mutates_args=())
def _conv_grad(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, padding: list[int], stride: int,
               nonlinearity: str, of_weight: bool) -> torch.Tensor:
    """d x (of_weight False) or d weight from d (conv + biases)."""
    out = torch.empty_like(weight if of_weight else x)
    if out.numel():
        kind = "weight_grad" if of_weight else "input_grad"
        _run(ConvOp(kind, x, weight, padding, stride, nonlinearity, out=out, grad=grad), x.device)
    return out


@_conv_grad.register_fake
def _(grad, x, weight, padding, stride, nonlinearity, of_weight):
    return torch.empty_like(weight if of_weight else x)


def _setup_context(ctx, inputs, output):
    x, weight, bias, skip, skip_weight, class_bias, residual, padding, stride, nonlinearity, skip_nonlinearity = inputs
    ctx.save_for_backward(x, weight, skip, skip_weight, output[1])
    ctx.geometry = padding, stride, nonlinearity, skip_nonlinearity
    ctx.has = class_bias is not None, residual is not None


def _backward(ctx, grad_out, grad_pre):
    x, weight, skip, skip_weight, pre = ctx.saved_tensors
    padding, stride, nonlinearity, skip_nonlinearity = ctx.geometry
    has_class_bias, gate = ctx.has
    grad_out = grad_out.contiguous()
    d_pre = _gate_backward(grad_out, pre) if gate else grad_out  # d (conv + biases), (B, N_OUT, HO, WO)
    needs = ctx.needs_input_grad
    d_x = _conv_grad(d_pre, x, weight, padding, stride, nonlinearity, False) if needs[0] else None
    d_weight = _conv_grad(d_pre, x, weight, padding, stride, nonlinearity, True) if needs[1] else None
    d_bias = d_pre.sum(dim=(0, 2, 3)) if needs[2] else None
    d_skip = d_skip_weight = None
    if skip is not None:
        w11 = skip_weight[:, :, None, None]
        if needs[3]:
            d_skip = _conv_grad(d_pre, skip, w11, [0, 0, 0, 0], 1, skip_nonlinearity, False)
        if needs[4]:
            d_skip_weight = _conv_grad(d_pre, skip, w11, [0, 0, 0, 0], 1, skip_nonlinearity, True).flatten(1)
    d_class_bias = d_pre.sum(dim=(2, 3)) if has_class_bias and needs[5] else None
    d_residual = grad_out if gate and needs[6] else None
    return d_x, d_weight, d_bias, d_skip, d_skip_weight, d_class_bias, d_residual, None, None, None, None


_conv.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------- public functions
def conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, padding, stride: int = 1,
         nonlinearity: str = "identity", skip=None) -> torch.Tensor:
    """conv2d(pad(nl(x), padding), weight, bias, stride) [+ 1x1 layer of nl_s(s)], differentiable.
    skip: (s (B, S, Ho, Wo), weight (N, S'), nonlinearity) or None."""
    s, s_weight, s_nl = skip if skip is not None else (None, None, "identity")
    out, _ = _conv(*_same_dtype(x, weight, bias, s, s_weight), None, None, list(padding), stride, nonlinearity, s_nl)
    return out


def gated_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, padding, residual: torch.Tensor,
               nonlinearity: str = "identity", class_bias: torch.Tensor | None = None) -> torch.Tensor:
    """residual + a * sigmoid(b), where (a, b) = conv2d(pad(nl(x)), weight, bias) [+ class_bias
    (B, 2N) per image] split in halves; differentiable."""
    x, weight, bias, class_bias, residual = _same_dtype(x, weight, bias, class_bias, residual)
    out, _ = _conv(x, weight, bias, None, None, class_bias, residual, list(padding), 1, nonlinearity, "identity")
    return out


def _same_dtype(x: torch.Tensor, *tensors):
    """x and the tensors, contiguous, in x's dtype (under autocast, its dtype)."""
    dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
    return tuple(None if t is None else t.to(dtype).contiguous() for t in (x, *tensors))
