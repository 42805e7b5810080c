"""One output column of a shifted convolution, for every image of a batch, in one launch.

The cached sampler's per-pixel work is made of these: a convolution whose lower rows have
already been folded into a per-column term (`term`), so that what is left at a pixel is
the newest input row's share, a window of `KW` columns of the layer's input cache times
the newest row of the filter. Around that product the kernel fuses what PyTorch would
launch separately: the nonlinearity of the fresh input column (and its write into the
cache, where the next pixels will find it), a 1x1 skip input with its own nonlinearity,
and the gated residual epilogue `x + a * sigmoid(b)`.

The column is not an argument: the kernel reads the flat pixel index p from a device
tensor and works out its column at its resolution level, so a captured CUDA graph replays
the same launches at every pixel of a row pattern.

Layouts (channels last, so a column's channels are contiguous):
- cache: the newest input row, (B, padded width, CIN); window column j of output column
  `col` is padded column STRIDE * col + COL_SHIFT + j (negative ones read as zeros).
- weight: (KW * CIN, N_OUT), window-major, as `ConvCache.newest_weight` (fastpixel/sampling/caches/pixelcnnpp.py).
- term: (B, output width, N_OUT), read at `col`; strides 0 turn it into a bias.
- fresh input x: (B, X_RAW) raw values; nl(x) has factor * X_RAW channels (concat_elu:
  [elu(x), elu(-x)]), and is the window's last column.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .ops import ColumnConv


# --------------------------------------------------------------------------- reference
def _nl_reference(x: torch.Tensor, nonlinearity: str) -> torch.Tensor:
    if nonlinearity == "concat_elu":
        return torch.nn.functional.elu(torch.cat([x, -x], dim=-1))
    return {"identity": lambda t: t, "elu": torch.nn.functional.elu, "relu": torch.relu}[nonlinearity](x)


def reference(cache: torch.Tensor, weight: torch.Tensor, term: torch.Tensor, position: int, *, width: int,
              kw: int, stride: int = 1, level: int = 0, col_shift: int = 0, x: torch.Tensor | None = None,
              nonlinearity: str = "identity", skip: tuple[torch.Tensor, torch.Tensor, str] | None = None,
              residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The kernel's result in float64: (output (B, N), the fresh column nl(x) or None).
    term is (B, Wout, N_OUT) or a bias (N_OUT,); skip is (input (B, S), weight (S', N), nonlinearity)."""
    f64 = torch.float64
    col = (position % width) >> level
    cin = cache.shape[2]
    columns = []
    for j in range(kw):
        at = stride * col + col_shift + j
        if x is not None and j == kw - 1:
            columns.append(_nl_reference(x.to(f64), nonlinearity))
        elif at < 0:
            columns.append(cache.new_zeros(cache.shape[0], cin, dtype=f64))
        else:
            columns.append(cache[:, at].to(f64))
    out = torch.cat(columns, dim=1) @ weight.to(f64)
    out = out + (term.to(f64) if term.dim() == 1 else term[:, col].to(f64))
    if skip is not None:
        s, s_weight, s_nl = skip
        out = out + _nl_reference(s.to(f64), s_nl) @ s_weight.to(f64)
    if residual is not None:
        a, b = out.chunk(2, dim=1)
        out = residual.to(f64) + a * torch.sigmoid(b)
    fresh = None if x is None else columns[-1]
    return out, fresh


# --------------------------------------------------------------------------- kernel
@triton.jit
def _nl(v, NL: tl.constexpr):
    # exp(v) - 1 rather than expm1: the interpreter has no expm1; the two differ by rounding.
    if NL == 1 or NL == 3:
        v = tl.where(v > 0, v, tl.exp(v) - 1)
    elif NL == 2:
        v = tl.maximum(v, 0)
    return v


@triton.jit
def _nl_source(ch, X_RAW, NL: tl.constexpr):
    """Which raw channel nl-channel ch reads, and whether negated (concat_elu: ch >= X_RAW reads -x)."""
    if NL == 3:
        negative = ch >= X_RAW
        return tl.where(negative, ch - X_RAW, ch), negative
    return ch, ch < 0


@triton.jit
def _fresh_column(ptr, stride_b, offs_b, mask_b, ch, mask_ch, X_RAW, NL: tl.constexpr, ACC: tl.constexpr):
    """nl(x)[b, ch] for a block of batch rows and nl-channels (concat_elu: ch >= X_RAW reads -x)."""
    raw, negative = _nl_source(ch, X_RAW, NL)
    v = tl.load(ptr + offs_b[:, None] * stride_b + raw[None, :], mask=mask_b[:, None] & mask_ch[None, :], other=0.0)
    v = v.to(ACC)
    return _nl(tl.where(negative[None, :], -v, v), NL)


@triton.jit
def _column_conv_kernel(
    # pointers
    pos_ptr,                            # int tensor (1,): the flat pixel index p = row * WIDTH + column
    cache_ptr, stride_cb, stride_cc,    # newest input row (B, padded width, CIN)
    w_ptr,                              # newest filter row (KW * CIN, N_OUT), contiguous
    term_ptr, stride_tb, stride_tc,     # per-column term (B, Wout, N_OUT), channels contiguous
    x_ptr, stride_xb,                   # FRESH: the raw input column (B, X_RAW)
    skip_ptr, stride_sb, skip_w_ptr,    # HAS_SKIP: raw skip input (B, S_RAW), weight (factor * S_RAW, N)
    res_ptr, stride_rb,                 # GATE: the residual (B, N)
    out_ptr, stride_ob,                 # output (B, N)
    # sizes
    B, N, CIN, X_RAW, S_RAW, WIDTH, COL_SHIFT,
    # compile-time choices
    KW: tl.constexpr, STRIDE: tl.constexpr, LEVEL: tl.constexpr,
    FRESH: tl.constexpr, STORE: tl.constexpr, NL: tl.constexpr,
    HAS_SKIP: tl.constexpr, SKIP_NL: tl.constexpr, GATE: tl.constexpr, ACC: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid_n = tl.program_id(1)
    p = tl.load(pos_ptr)
    col = (p % WIDTH) >> LEVEL
    first = STRIDE * col + COL_SHIFT  # padded column of the window's first column

    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_b = offs_b < B
    mask_n = offs_n < N
    n_out = 2 * N if GATE else N
    acc = tl.zeros((BLOCK_B, BLOCK_N), dtype=ACC)
    acc_gate = tl.zeros((BLOCK_B, BLOCK_N), dtype=ACC)

    # window (B, KW * CIN) @ weight (KW * CIN, N_OUT), BLOCK_K window entries at a time
    for k0 in range(0, KW * CIN, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        j = k // CIN
        ch = k % CIN
        at = first + j
        from_cache = (k < KW * CIN) & (at >= 0)
        if FRESH:
            is_fresh = (j == KW - 1) & (k < KW * CIN)
            from_cache = from_cache & (j < KW - 1)
        v = tl.load(cache_ptr + offs_b[:, None] * stride_cb + at[None, :] * stride_cc + ch[None, :],
                    mask=mask_b[:, None] & from_cache[None, :], other=0.0).to(ACC)
        if FRESH:
            v = tl.where(is_fresh[None, :], _fresh_column(x_ptr, stride_xb, offs_b, mask_b, ch, is_fresh, X_RAW, NL, ACC), v)
        w_mask = (k < KW * CIN)[:, None] & mask_n[None, :]
        w = tl.load(w_ptr + k[:, None] * n_out + offs_n[None, :], mask=w_mask, other=0.0).to(ACC)
        acc += tl.sum(v[:, :, None] * w[None, :, :], axis=1)
        if GATE:
            w = tl.load(w_ptr + k[:, None] * n_out + N + offs_n[None, :], mask=w_mask, other=0.0).to(ACC)
            acc_gate += tl.sum(v[:, :, None] * w[None, :, :], axis=1)

    mask_out = mask_b[:, None] & mask_n[None, :]
    term_at = term_ptr + offs_b[:, None] * stride_tb + col * stride_tc + offs_n[None, :]
    acc += tl.load(term_at, mask=mask_out, other=0.0).to(ACC)

    if HAS_SKIP:  # + nl(skip) @ skip_weight, a 1x1 layer on another input
        s_channels = 2 * S_RAW if SKIP_NL == 3 else S_RAW
        for k0 in range(0, s_channels, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            mask_k = k < s_channels
            v = _fresh_column(skip_ptr, stride_sb, offs_b, mask_b, k, mask_k, S_RAW, SKIP_NL, ACC)
            w = tl.load(skip_w_ptr + k[:, None] * N + offs_n[None, :], mask=mask_k[:, None] & mask_n[None, :], other=0.0).to(ACC)
            acc += tl.sum(v[:, :, None] * w[None, :, :], axis=1)

    if GATE:  # x + a * sigmoid(b)
        acc_gate += tl.load(term_at + N, mask=mask_out, other=0.0).to(ACC)
        acc = acc * (1 / (1 + tl.exp(-acc_gate)))
        acc += tl.load(res_ptr + offs_b[:, None] * stride_rb + offs_n[None, :], mask=mask_out, other=0.0).to(ACC)
    tl.store(out_ptr + offs_b[:, None] * stride_ob + offs_n[None, :], acc, mask=mask_out)

    if STORE:  # the fresh column into the cache, once (by the first column of programs)
        for k0 in range(0, CIN, BLOCK_K):
            ch = k0 + tl.arange(0, BLOCK_K)
            mask_ch = (ch < CIN) & (ch * 0 + pid_n == 0)
            v = _fresh_column(x_ptr, stride_xb, offs_b, mask_b, ch, mask_ch, X_RAW, NL, ACC)
            at = first + KW - 1
            tl.store(cache_ptr + offs_b[:, None] * stride_cb + at * stride_cc + ch[None, :], v,
                     mask=mask_b[:, None] & mask_ch[None, :])


# --------------------------------------------------------------------------- launcher
def constexprs(batch: int, dtype: torch.dtype) -> dict:
    """Block sizes for a batch: the launcher and the ahead-of-time compile test share them."""
    wide = dtype == torch.float64
    # BLOCK_B * BLOCK_K * BLOCK_N products live in registers at once: at most 64 per thread of 4 warps
    return dict(BLOCK_B=min(triton.next_power_of_2(max(batch, 1)), 16), BLOCK_N=16, BLOCK_K=16 if wide else 32,
                ACC=tl.float64 if wide else tl.float32)


def launch_config(op: ColumnConv) -> tuple:
    """(kernel, grid, block sizes, options) of a bound ColumnConv."""
    blocks = constexprs(op.batch, op.dtype)
    return _column_conv_kernel, (triton.cdiv(op.batch, blocks["BLOCK_B"]), triton.cdiv(op.n, blocks["BLOCK_N"])), blocks, {}
