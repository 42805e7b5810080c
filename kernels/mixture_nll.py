"""The discretised logistic mixture's negative log-likelihood, and its focal form, fused:
forward and backward, one launch each.

Training evaluates `fastpixel.mixture.nll` (or `focal_nll`) on every pixel of the batch:
in PyTorch that is a few dozen elementwise operations on (B, C, K, H, W) tensors, each
one a kernel launch, and autograd keeps most of them alive for the backward pass. Here a
program holds a block of pixels with all K components and C channels in registers and
writes one loss per pixel; the backward kernel recomputes the same terms from the
parameters and the image (nothing of size B x K x C x H x W is saved) and writes
d loss / d params directly.

The loss is the library's (`reference`, below): the same cancellation-free bin masses,
edge bins extended to -inf and +inf at x = -1 and x = 1, log-scales clamped at
MIN_LOG_SCALE, RGB means coupled through tanh coefficients to the actual grid values of
the earlier channels, and the focal weight (1 - P)^gamma clamped away from 0 as there.
Three formulas differ, each more exact than the reference and equal to it to rounding:
the bin's width in units of the scale, u - l, is 2 * HALF_BIN / scale (the reference
subtracts u and l, which loses up to 1e-4 of it in float32 when the scale is wide);
softplus is max(z, 0) + log1p(e^-|z|) (PyTorch's returns z above 20, a 2e-9 step that
would break a finite-difference check); and log1p and expm1 are built from exp and log
(Triton's interpreter has neither), to a few ulps. The gradients are the analytic ones,
arranged so that nothing cancels: for the middle bins d/d log-scale uses
(u - l) / expm1(u - l) in place of two large terms of opposite sign. The image x gets no
gradient: it is data on the grid.

`nll` and `focal_nll` in fastpixel.mixture call this on CUDA tensors (and on the CPU when
asked, under TRITON_INTERPRET=1); the op is a `torch.library.custom_op` with a fake
implementation and a registered backward, so torch.compile traces through it.
"""
from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from . import mixture
from .mixture_sample import _log1p_neg, _tanh
from .ops import Op, check

_MIN_LOG_SCALE = tl.constexpr(mixture.MIN_LOG_SCALE)
_HALF_BIN = tl.constexpr(mixture.HALF_BIN)  # used through tl.full(COMPUTE): a float32 1/255 would shift the bins
_TINY32 = tl.constexpr(torch.finfo(torch.float32).tiny)
_TINY64 = tl.constexpr(torch.finfo(torch.float64).tiny)
_FLOAT_TYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------- reference
def reference(params: torch.Tensor, x: torch.Tensor, gamma: float | None = None) -> torch.Tensor:
    """What the kernels compute, summed over each image: `mixture.nll` (gamma None)
    or `mixture.focal_nll`, the plain-PyTorch twin (kernels/mixture.py). params (B, P, H, W), x (B, C, H, W) -> (B,)."""
    if gamma is None:
        return mixture.nll(params, x)
    return mixture.focal_nll(params, x, gamma)


# --------------------------------------------------------------------------- kernels
@triton.jit
def _expm1(y):
    """e^y - 1 to a few ulps for any y: Kahan's (e^y - 1) * y / log(e^y) where e^y - 1 would cancel."""
    e = tl.exp(y)
    near = (tl.abs(y) < 0.5) & (e != 1.0)
    kahan = (e - 1.0) * y / tl.log(tl.where(near, e, 2.0))
    return tl.where(e == 1.0, y, tl.where(near, kahan, e - 1.0))


@triton.jit
def _softplus(z):
    """log(1 + e^z) with no overflow and no cancellation."""
    return tl.where(z > 0.0, z, 0.0) + _log1p_neg(-tl.exp(-tl.abs(z)))


@triton.jit
def _sigmoid(z):
    return 1.0 / (1.0 + tl.exp(-z))


@triton.jit
def _bin(x, mean, raw_log_scale, COMPUTE: tl.constexpr):
    """log P(bin of x) under logistic(mean, exp(log-scale)), the edge bins extended to
    -inf and +inf, with its derivatives by the mean and by the unclamped log-scale."""
    log_scale = tl.where(raw_log_scale < _MIN_LOG_SCALE, _MIN_LOG_SCALE, raw_log_scale)  # where() keeps NaN
    inv_scale = tl.exp(-log_scale)
    centred = x - mean
    half = tl.full(centred.shape, _HALF_BIN, COMPUTE)
    upper = inv_scale * (centred + half)
    lower = inv_scale * (centred - half)
    width = inv_scale * (half + half)  # u - l, without the cancellation of subtracting them (1e-4 in float32)
    # sigmoid(u) - sigmoid(l) = e^l (e^(u-l) - 1) / ((1 + e^u)(1 + e^l)): no difference of near-equal numbers
    middle = lower + tl.log(_expm1(width)) - _softplus(upper) - _softplus(lower)
    below_u = _sigmoid(-upper)  # d log sigmoid(u) / du
    above_l = _sigmoid(lower)  # -d log(1 - sigmoid(l)) / dl
    lowest = x < -0.999
    highest = x > 0.999
    mass = tl.where(lowest, -_softplus(-upper), tl.where(highest, -_softplus(lower), middle))
    # d/du and d/dl of each form; the middle's 1 / expm1(u - l) terms cancel in d/d mean and
    # are summed as (u - l) / expm1(u - l) in d/d log-scale
    d_mean = tl.where(lowest, -inv_scale * below_u,
                      tl.where(highest, inv_scale * above_l, -inv_scale * (below_u - above_l)))
    d_log_scale = tl.where(lowest, -upper * below_u,
                           tl.where(highest, lower * above_l,
                                    -(width / _expm1(width) + upper * below_u - lower * above_l)))
    d_log_scale = tl.where(raw_log_scale >= _MIN_LOG_SCALE, d_log_scale, 0.0)  # the clamp's gradient, as torch's
    return mass, d_mean, d_log_scale


@triton.jit
def _load(row, group, ks, ok, nr_mix, hw, COMPUTE: tl.constexpr):
    """Parameter group `group` (K values per pixel) of a block of pixels, (BLOCK_N, BLOCK_K)."""
    return tl.load(row[:, None] + (group * nr_mix + ks[None, :]) * hw, mask=ok, other=0.0).to(COMPUTE)


@triton.jit
def _masses(params_row, x_row, ks, n_ok, k_ok, nr_mix, hw, CHANNELS: tl.constexpr, COMPUTE: tl.constexpr):
    """Log mixture weights and, per channel, the bin masses and their derivatives by the
    (coupled) mean and by the log-scale; for RGB also the coefficients and earlier channels.
    Tiles are (BLOCK_N, BLOCK_K); unused channels' are zero."""
    ok = n_ok[:, None] & k_ok[None, :]
    logits = tl.where(k_ok[None, :], _load(params_row, 0, ks, ok, nr_mix, hw, COMPUTE), float("-inf"))
    shifted = logits - tl.max(logits, axis=1)[:, None]  # as log_softmax: the largest weight's log is exact
    log_weights = shifted - tl.log(tl.sum(tl.exp(shifted), axis=1))[:, None]
    x0 = tl.load(x_row, mask=n_ok).to(COMPUTE)[:, None]
    mass0, d_mean0, d_ls0 = _bin(x0, _load(params_row, 1, ks, ok, nr_mix, hw, COMPUTE),
                                 _load(params_row, 1 + CHANNELS, ks, ok, nr_mix, hw, COMPUTE), COMPUTE)
    zero = tl.zeros_like(mass0)
    x1, mass1, d_mean1, d_ls1, alpha = zero, zero, zero, zero, zero
    x2, mass2, d_mean2, d_ls2, beta, gamma = zero, zero, zero, zero, zero, zero
    if CHANNELS == 3:
        alpha = _tanh(_load(params_row, 7, ks, ok, nr_mix, hw, COMPUTE).to(tl.float64)).to(COMPUTE)
        beta = _tanh(_load(params_row, 8, ks, ok, nr_mix, hw, COMPUTE).to(tl.float64)).to(COMPUTE)
        gamma = _tanh(_load(params_row, 9, ks, ok, nr_mix, hw, COMPUTE).to(tl.float64)).to(COMPUTE)
        x1 = tl.load(x_row + hw, mask=n_ok).to(COMPUTE)[:, None]
        x2 = tl.load(x_row + 2 * hw, mask=n_ok).to(COMPUTE)[:, None]
        mass1, d_mean1, d_ls1 = _bin(x1, _load(params_row, 2, ks, ok, nr_mix, hw, COMPUTE) + alpha * x0,
                                     _load(params_row, 5, ks, ok, nr_mix, hw, COMPUTE), COMPUTE)
        mean2 = (_load(params_row, 3, ks, ok, nr_mix, hw, COMPUTE) + beta * x0) + gamma * x1
        mass2, d_mean2, d_ls2 = _bin(x2, mean2, _load(params_row, 6, ks, ok, nr_mix, hw, COMPUTE), COMPUTE)
    return (log_weights, mass0, mass1, mass2, d_mean0, d_mean1, d_mean2, d_ls0, d_ls1, d_ls2,
            alpha, beta, gamma, x0, x1)


@triton.jit
def _logsumexp(v):
    """log sum_k e^v (BLOCK_N,) and the softmax e^(v - that) (BLOCK_N, BLOCK_K)."""
    top = tl.max(v, axis=1)
    top = tl.where(top == float("-inf"), 0.0, top)
    total = top + tl.log(tl.sum(tl.exp(v - top[:, None]), axis=1))
    return total, tl.exp(v - total[:, None])


@triton.jit
def _focal(q, gamma, COMPUTE: tl.constexpr):
    """The focal term -(1 - P)^gamma log P of a conditional log P = q, and its derivative by q,
    (1 - P) clamped below at the smallest normal number as the reference clamps it."""
    if COMPUTE == tl.float64:
        tiny = tl.full(q.shape, _TINY64, COMPUTE)
    else:
        tiny = tl.full(q.shape, _TINY32, COMPUTE)
    miss = -_expm1(q)
    clamped = miss < tiny
    miss = tl.where(clamped, tiny, miss)
    weight = tl.exp(gamma * tl.log(miss))
    d_weight = tl.where(clamped, 0.0, -gamma * (weight / miss) * tl.exp(q))
    return -(weight * q), -(weight + q * d_weight)


@triton.jit
def _block(num_pixels, hw, nr_mix, CHANNELS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """This program's pixels n (flat over B, H, W) and components k, which of them exist, and
    the offsets of each pixel's first parameter and first sub-pixel."""
    n = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    ks = tl.arange(0, BLOCK_K)
    image, pixel = n // hw, n % hw
    per_image = hw * nr_mix * (1 + 2 * CHANNELS + (3 if CHANNELS == 3 else 0))
    return n, n < num_pixels, ks, ks < nr_mix, image * per_image + pixel, image * (hw * CHANNELS) + pixel


@triton.jit
def _joints(log_weights, mass0, mass1, mass2, CHANNELS: tl.constexpr):
    """log P(x_<=c) (BLOCK_N,) and the components' responsibilities given x_<=c, for c = 0, 1
    and the last channel (all three the same for one channel): mixtures of the running sums
    of the channels' log masses. The plain nll uses the last alone (the compiler drops the rest)."""
    joint0, resp0 = _logsumexp(log_weights + mass0)
    joint1, resp1, joint, resp = joint0, resp0, joint0, resp0
    if CHANNELS == 3:
        joint1, resp1 = _logsumexp(log_weights + (mass0 + mass1))
        joint, resp = _logsumexp(log_weights + ((mass0 + mass1) + mass2))
    return joint0, resp0, joint1, resp1, joint, resp


@triton.jit
def _mixture_nll_kernel(
    # pointers: params (B, P, H, W); x (B, C, H, W); gamma (1,) float64; loss (B, H, W)
    params_ptr, x_ptr, gamma_ptr, loss_ptr,
    # sizes: N = B * H * W pixels, H * W, K; every tensor is contiguous
    num_pixels, hw, nr_mix,
    # constexprs: C, focal form, BLOCK_N pixels per program, BLOCK_K >= K (power of two), compute dtype
    CHANNELS: tl.constexpr, FOCAL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    COMPUTE: tl.constexpr,
):
    """Per pixel: -log P(x) (nll), or the sum over its channels of the focal terms."""
    n, n_ok, ks, k_ok, offset, x_offset = _block(num_pixels, hw, nr_mix, CHANNELS, BLOCK_N, BLOCK_K)
    log_weights, mass0, mass1, mass2, _, _, _, _, _, _, _, _, _, _, _ = _masses(
        params_ptr + offset, x_ptr + x_offset, ks, n_ok, k_ok, nr_mix, hw, CHANNELS, COMPUTE)
    joint0, _, joint1, _, joint, _ = _joints(log_weights, mass0, mass1, mass2, CHANNELS)
    loss = -joint
    if FOCAL:
        gamma = tl.load(gamma_ptr).to(COMPUTE)
        loss, _ = _focal(joint0, gamma, COMPUTE)
        if CHANNELS == 3:  # the conditionals log P(x_c | x_<c) are differences of the joints
            term1, _ = _focal(joint1 - joint0, gamma, COMPUTE)
            term2, _ = _focal(joint - joint1, gamma, COMPUTE)
            loss = (loss + term1) + term2
    tl.store(loss_ptr + n, loss.to(loss_ptr.dtype.element_ty), mask=n_ok)


@triton.jit
def _mixture_nll_backward_kernel(
    # pointers: params (B, P, H, W); x (B, C, H, W); gamma (1,) float64; d loss (B, H, W); d params (B, P, H, W)
    params_ptr, x_ptr, gamma_ptr, grad_ptr, grad_params_ptr,
    # sizes and constexprs: as the forward kernel's
    num_pixels, hw, nr_mix,
    CHANNELS: tl.constexpr, FOCAL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    COMPUTE: tl.constexpr,
):
    """d loss / d params of every pixel, recomputed from params and x."""
    n, n_ok, ks, k_ok, offset, x_offset = _block(num_pixels, hw, nr_mix, CHANNELS, BLOCK_N, BLOCK_K)
    grad = tl.load(grad_ptr + n, mask=n_ok, other=0.0).to(COMPUTE)[:, None]
    (log_weights, mass0, mass1, mass2, d_mean0, d_mean1, d_mean2, d_ls0, d_ls1, d_ls2,
     alpha, beta, gamma, x0, x1) = _masses(params_ptr + offset, x_ptr + x_offset, ks, n_ok, k_ok, nr_mix, hw, CHANNELS,
                                           COMPUTE)
    joint0, resp0, joint1, resp1, joint, resp = _joints(log_weights, mass0, mass1, mass2, CHANNELS)
    # by_mass_c = d loss / d log-mass of channel c and component k: the sum over c' >= c of
    # (d loss / d log P(x_<=c')) * (responsibility of k given x_<=c')
    by_mass2 = -resp
    by_mass1 = by_mass2
    by_mass0 = by_mass2
    if FOCAL:
        focal_gamma = tl.load(gamma_ptr).to(COMPUTE)
        _, by_q0 = _focal(joint0, focal_gamma, COMPUTE)
        by_mass0 = by_q0[:, None] * resp0
        if CHANNELS == 3:
            _, by_q1 = _focal(joint1 - joint0, focal_gamma, COMPUTE)
            _, by_q2 = _focal(joint - joint1, focal_gamma, COMPUTE)
            by_mass2 = by_q2[:, None] * resp
            by_mass1 = by_mass2 + (by_q1 - by_q2)[:, None] * resp1
            by_mass0 = by_mass1 + (by_q0 - by_q1)[:, None] * resp0
    by_mass0 = by_mass0 * grad
    by_mass1 = by_mass1 * grad
    by_mass2 = by_mass2 * grad
    # log P(x) depends on the log-weights as on channel 0's masses; through log-softmax to the logits
    by_logits = by_mass0 - tl.exp(log_weights) * tl.sum(by_mass0, axis=1)[:, None]
    out_row = grad_params_ptr + offset
    ok = n_ok[:, None] & k_ok[None, :]
    out_ty = grad_params_ptr.dtype.element_ty
    groups = ks[None, :] * hw
    tl.store(out_row[:, None] + groups, by_logits.to(out_ty), mask=ok)
    tl.store(out_row[:, None] + (1 * nr_mix) * hw + groups, (by_mass0 * d_mean0).to(out_ty), mask=ok)
    tl.store(out_row[:, None] + ((1 + CHANNELS) * nr_mix) * hw + groups, (by_mass0 * d_ls0).to(out_ty), mask=ok)
    if CHANNELS == 3:
        by_mean1 = by_mass1 * d_mean1
        by_mean2 = by_mass2 * d_mean2
        tl.store(out_row[:, None] + (2 * nr_mix) * hw + groups, by_mean1.to(out_ty), mask=ok)
        tl.store(out_row[:, None] + (3 * nr_mix) * hw + groups, by_mean2.to(out_ty), mask=ok)
        tl.store(out_row[:, None] + (5 * nr_mix) * hw + groups, (by_mass1 * d_ls1).to(out_ty), mask=ok)
        tl.store(out_row[:, None] + (6 * nr_mix) * hw + groups, (by_mass2 * d_ls2).to(out_ty), mask=ok)
        # the coefficients enter through tanh: d tanh = 1 - tanh^2
        tl.store(out_row[:, None] + (7 * nr_mix) * hw + groups,
                 (by_mean1 * x0 * (1.0 - alpha * alpha)).to(out_ty), mask=ok)
        tl.store(out_row[:, None] + (8 * nr_mix) * hw + groups,
                 (by_mean2 * x0 * (1.0 - beta * beta)).to(out_ty), mask=ok)
        tl.store(out_row[:, None] + (9 * nr_mix) * hw + groups,
                 (by_mean2 * x1 * (1.0 - gamma * gamma)).to(out_ty), mask=ok)


# --------------------------------------------------------------------------- launcher
class MixtureNll(Op):
    """One launch of the loss (backward=False: per-pixel loss into `out` (B, H, W)) or of its
    gradient (backward=True: d params into `out` (B, P, H, W), from d loss per pixel `grad`)."""

    family = "mixture_nll"

    def __init__(self, params: torch.Tensor, x: torch.Tensor, gamma: torch.Tensor, out: torch.Tensor,
                 focal: bool, grad: torch.Tensor | None = None):
        check(params.dim() == 4 and params.dtype in _FLOAT_TYPES and params.is_contiguous(),
              f"params must be a contiguous floating-point (B, P, H, W) tensor, got {params.dtype} "
              f"{tuple(params.shape)}")
        batch, p, height, width = params.shape
        compute = mixture.compute_dtype(params)
        check(x.shape[0] == batch and x.shape[1] in (1, 3) and x.shape[2:] == params.shape[2:] and x.dtype == compute
              and x.is_contiguous(), f"x must be contiguous {compute} (B, 1 or 3, H, W) matching params, got "
                                     f"{x.dtype} {tuple(x.shape)}")
        channels = x.shape[1]
        nr_mix = mixture.num_mix(p, channels)
        check(gamma.shape == (1,) and gamma.dtype == torch.float64, "gamma must be a float64 tensor of shape (1,)")
        if grad is None:
            check(out.shape == (batch, height, width) and out.dtype == compute and out.is_contiguous(),
                  f"out must be contiguous {compute} (B, H, W)")
            args = (params, x, gamma, out)
        else:
            check(grad.shape == (batch, height, width) and grad.is_contiguous(), "grad must be contiguous (B, H, W)")
            check(out.shape == params.shape and out.dtype == params.dtype and out.is_contiguous(),
                  "out must be a contiguous tensor like params")
            args = (params, x, gamma, grad, out)
        check(len({t.device for t in args}) == 1, "all tensors must be on one device")
        super().__init__((*args, batch * height * width, height * width, nr_mix),
                         dict(CHANNELS=channels, FOCAL=focal), batch, params.dtype)
        self.backward, self.nr_mix, self.num_pixels = grad is not None, nr_mix, batch * height * width


def launch_config(op: MixtureNll) -> tuple:
    """(kernel, grid, block sizes, options) of a bound MixtureNll."""
    block_k = triton.next_power_of_2(op.nr_mix)
    blocks = dict(BLOCK_N=max(1, 256 // block_k), BLOCK_K=block_k,
                  COMPUTE=tl.float64 if op.dtype == torch.float64 else tl.float32)
    kernel = _mixture_nll_backward_kernel if op.backward else _mixture_nll_kernel
    return kernel, (triton.cdiv(op.num_pixels, blocks["BLOCK_N"]),), blocks, dict(num_warps=4)


def aot_specs(config, batch: int, dtype: torch.dtype) -> list[tuple]:
    """Every launch training a model `config` at `batch` with `dtype` parameters makes (loss
    and gradient, plain and focal), as (jit function, signature, constexprs, options) for
    `triton.compile` (tests/test_kernels_compile.py). Built on the meta device."""
    with torch.device("meta"):
        params = torch.empty(batch, config.num_params_out, *config.shape, dtype=dtype)
        x = torch.empty(batch, config.channels, *config.shape, dtype=mixture.compute_dtype(params))
        gamma = torch.empty(1, dtype=torch.float64)
        loss = torch.empty(batch, *config.shape, dtype=x.dtype)
        ops = [MixtureNll(params, x, gamma, out, focal, grad)
               for focal in (False, True) for out, grad in ((loss, None), (torch.empty_like(params), loss))]
    return [op.aot_spec() for op in ops]


# --------------------------------------------------------------------------- autograd op
def _run(op: MixtureNll, device: torch.device) -> None:
    # Triton launches on the current CUDA device: make it the tensors' (a no-op on the CPU)
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        op()


@torch.library.custom_op("fastpixel::mixture_nll", mutates_args=())
def _nll_per_pixel(params: torch.Tensor, x: torch.Tensor, gamma: float, focal: bool) -> torch.Tensor:
    loss = x.new_empty(x.shape[0], *x.shape[2:])
    if loss.numel():
        _run(MixtureNll(params, x, torch.tensor([gamma], dtype=torch.float64, device=x.device), loss, focal), x.device)
    return loss


@_nll_per_pixel.register_fake
def _(params, x, gamma, focal):
    return x.new_empty(x.shape[0], *x.shape[2:])


@torch.library.custom_op("fastpixel::mixture_nll_backward", mutates_args=())
def _nll_per_pixel_backward(grad: torch.Tensor, params: torch.Tensor, x: torch.Tensor, gamma: float,
                            focal: bool) -> torch.Tensor:
    out = torch.empty_like(params)
    if out.numel():
        gamma_t = torch.tensor([gamma], dtype=torch.float64, device=x.device)
        _run(MixtureNll(params, x, gamma_t, out, focal, grad.to(x.dtype).contiguous()), x.device)
    return out


@_nll_per_pixel_backward.register_fake
def _(grad, params, x, gamma, focal):
    return torch.empty_like(params)


def _setup_context(ctx, inputs, output):
    params, x, gamma, focal = inputs
    ctx.save_for_backward(params, x)
    ctx.gamma, ctx.focal = gamma, focal


def _backward(ctx, grad):
    params, x = ctx.saved_tensors
    return _nll_per_pixel_backward(grad, params, x, ctx.gamma, ctx.focal), None, None, None


_nll_per_pixel.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------- public functions
def nll_per_pixel(params: torch.Tensor, x: torch.Tensor, gamma: float | None = None) -> torch.Tensor:
    """The loss of every pixel, (B, H, W) in the compute dtype (float64 for float64 params,
    else float32): -log P(x) (gamma None) or the focal sum over its channels. Differentiable
    in params; params (B, P, H, W), x (B, C, H, W) on the 256-level grid in [-1, 1]."""
    mixture.check_pair(params, x)
    x = x.to(mixture.compute_dtype(params)).contiguous()
    return _nll_per_pixel(params.contiguous(), x, 0.0 if gamma is None else float(gamma), gamma is not None)


def nll(params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """`fastpixel.mixture.nll`, fused: nats per image, (B,)."""
    return nll_per_pixel(params, x).flatten(1).sum(dim=1)


def focal_nll(params: torch.Tensor, x: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """`fastpixel.mixture.focal_nll`, fused: (B,)."""
    return nll_per_pixel(params, x, gamma).flatten(1).sum(dim=1)
