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

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .bound_launch import BoundLaunch


@dataclass(frozen=True)
class Column:
    """Which column of a (B, columns, channels) buffer a pixel's step touches."""

    level: int = 0
    scale: int = 0
    offset: int = 0
    row_mask: int = 0
    row_columns: int = 0

    def at(self, position: int, width: int) -> int:
        row, col = divmod(position, width)
        return self.scale * (col >> self.level) + self.offset + ((row >> self.level) & self.row_mask) * self.row_columns


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


class ColumnCopy(BoundLaunch):
    """A copy bound to its buffers once; each call is one launch (graph-capturable)."""

    def __init__(self, position: torch.Tensor, src: torch.Tensor, dst: torch.Tensor, count: int, *, width: int,
                 src_at: Column = Column(), dst_at: Column = Column()):
        if position.numel() != 1 or position.is_floating_point():
            raise ValueError("position must be one integer")
        if src.dim() != 3 or dst.dim() != 3 or 1 not in (src.stride(2), src.shape[2]) or 1 not in (dst.stride(2), dst.shape[2]):
            raise ValueError("src and dst must be (B, columns, channels) with contiguous channels")
        if src.dtype != dst.dtype or src.device != dst.device or position.device != dst.device:
            raise ValueError("src and dst must share a dtype, and position their device")
        if src.shape[0] not in (1, dst.shape[0]):
            raise ValueError(f"src must have batch {dst.shape[0]} or 1, got {src.shape[0]}")
        batch = dst.shape[0]
        meta = constexprs(batch)
        grid = (triton.cdiv(batch, meta["BLOCK_B"]), triton.cdiv(count, meta["BLOCK_C"]))
        src_stride_b = src.stride(0) if src.shape[0] == batch else 0
        super().__init__(_column_copy_kernel, grid, (position, src, src_stride_b, src.stride(1), dst, dst.stride(0),
                                                     dst.stride(1), batch, count, width, *_fields(src_at),
                                                     *_fields(dst_at)), meta)


def _fields(at: Column) -> tuple[int, ...]:
    return at.level, at.scale, at.offset, at.row_mask, at.row_columns
