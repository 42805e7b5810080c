"""Copy one column of channels between buffers at a place that depends on the current pixel.

The cached sampler moves single columns around at every pixel (a sampled pixel into the
input caches, an activation into a downsampling cache, a 2x2 block from a coarser level
into the rows the finer level reads next). In a captured CUDA graph the pixel is not a
Python number but a device tensor holding the flat index p = row * width + column; this
kernel works out the source and destination columns from it, so one launch serves every
pixel of a row pattern.

A side's column is `scale * (c >> level) + offset + ((r >> level) & row_mask) * row_columns`
with (r, c) the pixel's row and column: `Column()` is a fixed column 0, `Column(scale=1)`
the pixel's column, `Column(row_mask=-1, row_columns=width, scale=1)` the flat index p.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .ops import Column, ColumnCopy


# --------------------------------------------------------------------------- reference
def reference(src: torch.Tensor, dst: torch.Tensor, position: int, count: int, *, width: int,
              src_at: Column = Column(), dst_at: Column = Column()) -> None:
    """dst's `count` channels from its column onwards = src's from its column (in place)."""
    s, d = src_at.at(position, width), dst_at.at(position, width)
    flat_src = src.as_strided((src.shape[0], count), (src.stride(0), 1), src.storage_offset() + s * src.stride(1))
    flat_dst = dst.as_strided((dst.shape[0], count), (dst.stride(0), 1), dst.storage_offset() + d * dst.stride(1))
    flat_dst.copy_(flat_src)


# --------------------------------------------------------------------------- kernel
@triton.jit
def _column(p, WIDTH, LEVEL, SCALE, OFFSET, ROW_MASK, ROW_COLUMNS):
    return SCALE * ((p % WIDTH) >> LEVEL) + OFFSET + (((p // WIDTH) >> LEVEL) & ROW_MASK) * ROW_COLUMNS


@triton.jit
def _column_copy_kernel(
    pos_ptr,                          # int tensor (1,): the flat pixel index
    src_ptr, stride_sb, stride_sc,    # source (B or broadcast, columns, channels)
    dst_ptr, stride_db, stride_dc,    # destination (B, columns, channels)
    B, COUNT, WIDTH,
    S_LEVEL, S_SCALE, S_OFFSET, S_ROW_MASK, S_ROW_COLUMNS,
    D_LEVEL, D_SCALE, D_OFFSET, D_ROW_MASK, D_ROW_COLUMNS,
    BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr,
):
    p = tl.load(pos_ptr)
    s = _column(p, WIDTH, S_LEVEL, S_SCALE, S_OFFSET, S_ROW_MASK, S_ROW_COLUMNS)
    d = _column(p, WIDTH, D_LEVEL, D_SCALE, D_OFFSET, D_ROW_MASK, D_ROW_COLUMNS)
    offs_b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (offs_b < B)[:, None] & (offs_c < COUNT)[None, :]
    v = tl.load(src_ptr + offs_b[:, None] * stride_sb + s * stride_sc + offs_c[None, :], mask=mask)
    tl.store(dst_ptr + offs_b[:, None] * stride_db + d * stride_dc + offs_c[None, :], v, mask=mask)


# --------------------------------------------------------------------------- launcher
def constexprs(batch: int) -> dict:
    """Block sizes: the launcher and the ahead-of-time compile test share them."""
    return dict(BLOCK_B=min(triton.next_power_of_2(max(batch, 1)), 16), BLOCK_C=64)


def launch_config(op: ColumnCopy) -> tuple:
    """(kernel, grid, block sizes, options) of a bound ColumnCopy."""
    blocks = constexprs(op.batch)
    grid = (triton.cdiv(op.batch, blocks["BLOCK_B"]), triton.cdiv(op.count, blocks["BLOCK_C"]))
    return _column_copy_kernel, grid, blocks, {}
