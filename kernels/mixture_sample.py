"""One pixel drawn from the discretised logistic mixture, for a whole batch, in one launch.

At every step the cached sampler turns the pixel's mixture parameters into a pixel:
`fastpixel.mixture.sample` does it in about forty small PyTorch operations (unpack, clamp,
tanh, two logarithms per uniform, argmax, gathers, and per channel a coupled mean, a draw
and a snap to the grid), each a kernel launch on a GPU, so at one pixel per step they cost
more than the arithmetic. Here the same draw is one launch: a program per block of batch
rows holds all K components and C channels in registers.

The draw is the library's (`reference`, below, is `mixture.sample` itself, the plain-PyTorch twin in kernels/mixture.py): the
same uniforms, clamped and transformed in float64; the component by Gumbel-max with ties
to the first index; each channel's coupled mean, evaluated in the same order of operations,
plus scale times the logistic draw, snapped with round-half-to-even. The pixel index is
read from a device tensor, so a captured CUDA graph replays the same launch at every pixel.

Exactness: Triton has no tanh or log1p that its interpreter can run, so the kernel builds
them from exp and log (Kahan's expm1 and Goldberg's log1p, a few ulps in float64), and
takes float32's exp and tanh in float64 before rounding. A draw is snapped to a 256-level
grid, so a difference of a few ulps changes a sub-pixel only when its pre-snap value lies
that close to a bin edge: never seen in float64 (about 1e-13 of sub-pixels), rare in
float32, where PyTorch's own float32 exp and tanh are not always correctly rounded.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import mixture
from .ops import SamplePixel

_TINY = tl.constexpr(torch.finfo(torch.float64).tiny)
_BELOW_ONE = tl.constexpr(1.0 - 2.0 ** -53)  # used through tl.full(float64): typed float32, it would be 1


# --------------------------------------------------------------------------- reference
def reference(params: torch.Tensor, noise: torch.Tensor, channels: int) -> torch.Tensor:
    """What the kernel computes: `mixture.sample` on one pixel per row.
    params (B, P), noise (B, K + C) -> (B, C) in the compute dtype."""
    return mixture.sample(params[:, :, None, None], noise=noise[:, :, None, None], channels=channels)[:, :, 0, 0]


# --------------------------------------------------------------------------- kernel
@triton.jit
def _log1p_neg(u):
    """log(1 - u) in float64 to a few ulps (Goldberg): 1 - u rounds, but log(w) / (w - 1)
    is accurate at the rounded w, and -u / (w - 1) corrects for the rounding."""
    w = 1.0 - u
    exact = w == 1.0  # u under half an ulp of 1: log(1 - u) = -u to rounding
    return tl.where(exact, -u, tl.log(w) * (-u / tl.where(exact, -1.0, w - 1.0)))


@triton.jit
def _tanh(x):
    """tanh in float64 to a few ulps, as -expm1(-2|x|) / (2 + expm1(-2|x|)) with Kahan's
    expm1(y) = (e^y - 1) * y / log(e^y), which has no cancellation for small |x|."""
    a = tl.abs(x)
    a = tl.where(a > 20.0, 20.0, a)  # tanh(20) rounds to 1; where(), unlike minimum(), keeps NaN
    y = -2.0 * a
    e = tl.exp(y)
    small = e == 1.0
    m = tl.where(small, y, (e - 1.0) * y / tl.where(small, 1.0, tl.log(e)))
    t = -m / (2.0 + m)
    return tl.where(x < 0, -t, t)


@triton.jit
def _uniform(noise_ptr, mask):
    """Load uniforms and clamp them to [tiny, 1 - 2**-53], as the reference does (keeps NaN)."""
    u = tl.load(noise_ptr, mask=mask, other=0.5)
    low = tl.full(u.shape, _TINY, tl.float64)
    high = tl.full(u.shape, _BELOW_ONE, tl.float64)
    return tl.where(u < low, low, tl.where(u > high, high, u))


@triton.jit
def _snap(y, COMPUTE: tl.constexpr):
    """torch.round((y + 1) * 127.5).clamp(0, 255) / 127.5 - 1, with round-half-to-even
    built from floor (portable, and exact: clamping first changes nothing, as 0 and 255 are
    integers and rounding is monotonic, and keeps floor's remainder exact)."""
    z = (y + 1.0) * 127.5
    z = tl.where(z < 0.0, 0.0, tl.where(z > 255.0, 255.0, z))  # where() keeps NaN, as clamp does
    r = tl.floor(z)
    d = z - r
    odd = (r - 2.0 * tl.floor(r * 0.5)) == 1.0
    r = tl.where((d > 0.5) | ((d == 0.5) & odd), r + 1.0, r)
    if COMPUTE == tl.float32:
        r = tl.div_rn(r, 127.5)  # `/` is an approximate division for float32 on the GPU
    else:
        r = r / 127.5
    return r - 1.0


@triton.jit
def _channel(params_row, noise_row, comp, mask, c, nr_mix, num_pixels,
             CHANNELS: tl.constexpr, COMPUTE: tl.constexpr):
    """Channel c of the chosen component: its mean, scale (log-scale clamped at -7) and
    logistic draw (inverse CDF of its uniform, in float64 like the reference)."""
    mean = tl.load(params_row + nr_mix * (1 + c) + comp, mask=mask).to(COMPUTE)
    log_scale = tl.load(params_row + nr_mix * (1 + CHANNELS + c) + comp, mask=mask).to(COMPUTE)
    log_scale = tl.where(log_scale < -7.0, -7.0, log_scale)
    scale = tl.exp(log_scale.to(tl.float64)).to(COMPUTE)  # float32: rounded from float64, as exact as it gets
    u = _uniform(noise_row + (nr_mix + c) * num_pixels, mask)
    logistic = (tl.log(u) - _log1p_neg(u)).to(COMPUTE)
    return mean, scale, logistic


@triton.jit
def _coeff(params_row, comp, mask, i, nr_mix, COMPUTE: tl.constexpr):
    """Coupling coefficient i (alpha, beta, gamma) of the chosen component, through tanh."""
    raw = tl.load(params_row + nr_mix * (7 + i) + comp, mask=mask).to(COMPUTE)
    return _tanh(raw.to(tl.float64)).to(COMPUTE)


@triton.jit
def _stored(x, ptr):
    """x in ptr's element type, rounded to nearest even as PyTorch rounds it. bfloat16 by
    hand, on the float32 bits (as c10 does), because Triton's interpreter truncates there."""
    ty = ptr.dtype.element_ty
    if ty == tl.bfloat16:
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)  # now exact in bfloat16
    return x.to(ty)


@triton.jit
def _store(out_ptr, image_ptr, rows, mask, x, c, num_pixels, p,
           CHANNELS: tl.constexpr, HAS_IMAGE: tl.constexpr):
    tl.store(out_ptr + rows * CHANNELS + c, _stored(x, out_ptr), mask=mask)
    if HAS_IMAGE:
        tl.store(image_ptr + (rows * CHANNELS + c) * num_pixels + p, _stored(x, image_ptr), mask=mask)


@triton.jit
def _mixture_sample_kernel(
    # pointers: params (B, P); noise (B, K + C, N) float64; position (1,) int; out (B, C); image (B, C, N)
    params_ptr, noise_ptr, position_ptr, out_ptr, image_ptr,
    # sizes: B, K, N (pixels per image); every tensor is contiguous, so these are the strides too
    batch, nr_mix, num_pixels,
    # constexprs: C, BLOCK_B rows per program, BLOCK_K >= K (power of two), the compute dtype, image given
    CHANNELS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, COMPUTE: tl.constexpr,
    HAS_IMAGE: tl.constexpr,
):
    rows = (tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)
    row_ok = rows < batch
    ks = tl.arange(0, BLOCK_K)
    both_ok = row_ok[:, None] & (ks < nr_mix)[None, :]
    p = tl.load(position_ptr)
    params_row = params_ptr + rows * (nr_mix * (1 + 2 * CHANNELS + (3 if CHANNELS == 3 else 0)))
    noise_row = noise_ptr + rows * ((nr_mix + CHANNELS) * num_pixels) + p

    # Gumbel-max: the first index of the largest logit + gumbel, or of the first NaN, as torch.argmax.
    logits = tl.load(params_row[:, None] + ks[None, :], mask=both_ok, other=float("-inf")).to(COMPUTE)
    u = _uniform(noise_row[:, None] + ks[None, :] * num_pixels, both_ok)
    v = logits + (-tl.log(-tl.log(u))).to(COMPUTE)
    nan = v != v
    first_nan = tl.min(tl.where(nan, ks[None, :], BLOCK_K), axis=1)
    best = tl.max(tl.where(nan, float("-inf"), v), axis=1)
    first_best = tl.min(tl.where(v == best[:, None], ks[None, :], BLOCK_K), axis=1)
    comp = tl.where(first_nan < BLOCK_K, first_nan, first_best)

    # Channel by channel, each mean coupled to the snapped earlier channels, in the reference's order.
    mean, scale, logistic = _channel(params_row, noise_row, comp, row_ok, 0, nr_mix, num_pixels, CHANNELS, COMPUTE)
    x0 = _snap(mean + scale * logistic, COMPUTE)
    _store(out_ptr, image_ptr, rows, row_ok, x0, 0, num_pixels, p, CHANNELS, HAS_IMAGE)
    if CHANNELS == 3:
        mean, scale, logistic = _channel(params_row, noise_row, comp, row_ok, 1, nr_mix, num_pixels, CHANNELS, COMPUTE)
        alpha = _coeff(params_row, comp, row_ok, 0, nr_mix, COMPUTE)
        x1 = _snap((mean + alpha * x0) + scale * logistic, COMPUTE)
        _store(out_ptr, image_ptr, rows, row_ok, x1, 1, num_pixels, p, CHANNELS, HAS_IMAGE)
        mean, scale, logistic = _channel(params_row, noise_row, comp, row_ok, 2, nr_mix, num_pixels, CHANNELS, COMPUTE)
        beta = _coeff(params_row, comp, row_ok, 1, nr_mix, COMPUTE)
        gamma = _coeff(params_row, comp, row_ok, 2, nr_mix, COMPUTE)
        x2 = _snap(((mean + beta * x0) + gamma * x1) + scale * logistic, COMPUTE)
        _store(out_ptr, image_ptr, rows, row_ok, x2, 2, num_pixels, p, CHANNELS, HAS_IMAGE)


# --------------------------------------------------------------------------- launcher
def launch_config(op: SamplePixel) -> tuple:
    """(kernel, grid, block sizes, options) of a bound SamplePixel."""
    blocks = dict(BLOCK_B=min(triton.next_power_of_2(op.batch), 32), BLOCK_K=triton.next_power_of_2(op.nr_mix),
                  COMPUTE=tl.float64 if op.dtype == torch.float64 else tl.float32)
    # One warp: a few hundred values per program. No fused multiply-adds: they would round
    # mean + alpha * x0 and mean + scale * logistic differently from PyTorch's separate operations.
    return _mixture_sample_kernel, (triton.cdiv(op.batch, blocks["BLOCK_B"]),), blocks, dict(num_warps=1,
                                                                                            enable_fp_fusion=False)


# --------------------------------------------------------------------------- public functions
def sample_pixel(params: torch.Tensor, noise: torch.Tensor, position: torch.Tensor, channels: int,
                 out: torch.Tensor, image: torch.Tensor | None = None) -> None:
    """Draw pixel p = position[0] of every image: params (B, P) are its mixture parameters
    (any float dtype), noise (B, K + C, N) float64 the batch's uniforms for all N pixels
    (read at p), position an int32/int64 tensor (1,) on the device, 0 <= p < N (not checked:
    that would read the device). Writes the (B, C) sub-pixels into `out` and, if given, into
    `image` (B, C, N) at p, each in its own dtype. No allocation, no host synchronisation."""
    op = SamplePixel(params, noise, position, channels, out, image)
    if op.batch > 0:
        op()


def sample(params: torch.Tensor, noise: torch.Tensor, channels: int) -> torch.Tensor:
    """One draw per row: params (B, P), noise (B, K + C) float64 -> (B, C) on the grid, float64
    for float64 params, else float32 (the same as `reference`)."""
    if noise.dim() != 2:
        raise ValueError(f"noise must have shape (batch, K + C), got {tuple(noise.shape)}")
    out = torch.empty(params.shape[0], channels, device=params.device,
                      dtype=torch.float64 if params.dtype == torch.float64 else torch.float32)
    position = torch.zeros(1, dtype=torch.int32, device=noise.device)
    sample_pixel(params, noise.unsqueeze(-1), position, channels, out)
    return out
