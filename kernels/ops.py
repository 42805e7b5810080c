"""The fused sampler's ops, each bound to its tensors once: what a pixel's step computes,
on which buffers, without Triton.

A pixel's step is a fixed list of these (fastpixel/sampling/engines/fused.py). An op checks its
arguments when it is made and keeps them in the order of its kernel's signature; then it
runs either as its Triton kernel (calling it: the kernel file of its `family`, imported at
the first launch, picks the block sizes and the grid), or, packed by
fastpixel/sampling/engines/cext.py, in the C++ engine. This module does not import Triton, so the C++
engine runs where Triton is not installed, without paying for its import.
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass

import torch

from . import mixture

NONLINEARITIES = ("identity", "elu", "relu", "concat_elu")
_TYPES = {torch.float32: "fp32", torch.float64: "fp64", torch.bfloat16: "bf16", torch.float16: "fp16",
          torch.int32: "i32", torch.int64: "i64"}
_FLOAT_TYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def triton_interpreted() -> bool:
    """Whether Triton kernels run in its CPU interpreter (read when the kernels are first imported)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check(ok: bool, message: str) -> None:
    """An op's argument check, done once when it is bound: ValueError(message)."""
    if not ok:
        raise ValueError(message)


class Op:
    """kernel[grid](*args, **constexprs, **block sizes, **options) for the kernel in
    kernels/<family>.py, whose `launch_config(op)` gives (kernel, grid, block sizes, options)."""

    family: str

    def __init__(self, args: tuple, constexprs: dict, batch: int, dtype: torch.dtype):
        self.args, self.constexprs, self.batch, self.dtype = args, constexprs, batch, dtype
        self._launch = None

    def _triton(self) -> tuple:
        if self._launch is None:
            kernel, grid, blocks, options = importlib.import_module(f"{__package__}.{self.family}").launch_config(self)
            self._launch = kernel, grid, {**self.constexprs, **blocks}, options
        return self._launch

    def __call__(self) -> None:
        kernel, grid, constexprs, options = self._triton()
        kernel[grid](*self.args, **constexprs, **options)

    def aot_spec(self) -> tuple:
        """(jit function, signature, constexprs, options), as `triton.compile` takes them."""
        kernel, _, constexprs, options = self._triton()
        names = [name for name in kernel.arg_names if name not in constexprs]
        signature = {name: f"*{_TYPES[value.dtype]}" if isinstance(value, torch.Tensor) else "i32"
                     for name, value in zip(names, self.args)}
        return kernel, signature | {name: "constexpr" for name in constexprs}, constexprs, options


class ColumnConv(Op):
    """One output column of a shifted convolution for the whole batch (kernels/column_conv.py
    says what it computes and on which layouts)."""

    family = "column_conv"

    def __init__(self, position: torch.Tensor, cache: torch.Tensor | None, weight: torch.Tensor, term: torch.Tensor,
                 out: torch.Tensor, *, width: int, kw: int, stride: int = 1, level: int = 0, col_shift: int = 0,
                 x: torch.Tensor | None = None, nonlinearity: str = "identity", store: bool = False,
                 skip: tuple[torch.Tensor, torch.Tensor, str] | None = None, residual: torch.Tensor | None = None):
        batch, n = out.shape
        gate = residual is not None
        factor = 2 if nonlinearity == "concat_elu" else 1
        if cache is None:  # a 1x1 layer on the fresh column alone: nothing cached to read or write
            check(kw == 1 and x is not None and not store, "only a 1x1 layer on a fresh column x needs no cache")
            cache = x.new_empty(batch, 1, factor * x.shape[1])
        cin = cache.shape[2]
        n_out = 2 * n if gate else n
        check(position.numel() == 1 and not position.is_floating_point(), "position must be one integer")
        check(cache.dim() == 3 and cache.shape[0] == batch and cache.stride(2) == 1,
              f"cache must be (B={batch}, width, CIN) with contiguous channels, got {tuple(cache.shape)}")
        check(weight.shape == (kw * cin, n_out) and weight.is_contiguous(),
              f"weight must be contiguous ({kw * cin}, {n_out}), got {tuple(weight.shape)}")
        check(term.stride(-1) == 1 and term.shape[-1] == n_out, f"term must end in {n_out} contiguous channels")
        check(out.stride(1) == 1, "out must have contiguous channels")
        check(nonlinearity in NONLINEARITIES, f"nonlinearity must be one of {NONLINEARITIES}")
        if x is not None:
            check(x.shape[0] == batch and factor * x.shape[1] == cin and x.stride(1) == 1,
                  f"x must be (B, {cin // factor}) with contiguous channels, got {tuple(x.shape)}")
        check(not store or x is not None, "store needs the fresh column x")
        check(not (gate and skip is not None), "a gated column takes no skip input (add it to the column before)")
        if skip is not None:
            s, s_weight, s_nl = skip
            s_factor = 2 if s_nl == "concat_elu" else 1
            check(s.stride(1) == 1 and s_weight.shape == (s_factor * s.shape[1], n) and s_weight.is_contiguous(),
                  "skip must be (input (B, S) with contiguous channels, contiguous weight (factor * S, N), nonlinearity)")
        tensors = [position, cache, weight, term, out] + [t for t in (x, residual) if t is not None]
        check(len({t.device for t in tensors}) == 1, "all tensors must be on one device")

        dummy = out  # a valid pointer for the arguments a variant does not read
        x_ = x if x is not None else dummy
        s, s_weight, s_nl = skip if skip is not None else (dummy, dummy, "identity")
        r = residual if residual is not None else dummy
        term_b, term_c = (0, 0) if term.dim() == 1 else (term.stride(0), term.stride(1))
        args = (position, cache, cache.stride(0), cache.stride(1), weight, term, term_b, term_c,
                x_, x_.stride(0), s, s.stride(0), s_weight, r, r.stride(0), out, out.stride(0),
                batch, n, cin, x_.shape[-1], s.shape[-1], width, col_shift)
        super().__init__(args, dict(KW=kw, STRIDE=stride, LEVEL=level, FRESH=x is not None, STORE=store,
                                    NL=NONLINEARITIES.index(nonlinearity), HAS_SKIP=skip is not None,
                                    SKIP_NL=NONLINEARITIES.index(s_nl), GATE=gate), batch, out.dtype)
        self.n = n


@dataclass(frozen=True)
class Column:
    """Which column of a (B, columns, channels) buffer a pixel's step touches:
    `scale * (c >> level) + offset + ((r >> level) & row_mask) * row_columns` at pixel (r, c).
    `Column()` is a fixed column 0, `Column(scale=1)` the pixel's column,
    `Column(row_mask=-1, row_columns=width, scale=1)` the flat index p = r * width + c."""

    level: int = 0
    scale: int = 0
    offset: int = 0
    row_mask: int = 0
    row_columns: int = 0

    def at(self, position: int, width: int) -> int:
        row, col = divmod(position, width)
        return self.scale * (col >> self.level) + self.offset + ((row >> self.level) & self.row_mask) * self.row_columns

    def fields(self) -> tuple[int, ...]:
        return self.level, self.scale, self.offset, self.row_mask, self.row_columns


class ColumnCopy(Op):
    """`count` channels of one column of src into one column of dst, at places that depend on
    the pixel (kernels/column_copy.py)."""

    family = "column_copy"

    def __init__(self, position: torch.Tensor, src: torch.Tensor, dst: torch.Tensor, count: int, *, width: int,
                 src_at: Column = Column(), dst_at: Column = Column()):
        check(position.numel() == 1 and not position.is_floating_point(), "position must be one integer")
        check(src.dim() == 3 and dst.dim() == 3 and 1 in (src.stride(2), src.shape[2]) and 1 in (dst.stride(2), dst.shape[2]),
              "src and dst must be (B, columns, channels) with contiguous channels")
        check(src.dtype == dst.dtype and src.device == dst.device and position.device == dst.device,
              "src and dst must share a dtype, and position their device")
        check(src.shape[0] in (1, dst.shape[0]), f"src must have batch {dst.shape[0]} or 1, got {src.shape[0]}")
        batch = dst.shape[0]
        src_stride_b = src.stride(0) if src.shape[0] == batch else 0
        super().__init__((position, src, src_stride_b, src.stride(1), dst, dst.stride(0), dst.stride(1), batch, count,
                          width, *src_at.fields(), *dst_at.fields()), {}, batch, dst.dtype)
        self.count = count


class SamplePixel(Op):
    """The pixel the position points at, drawn from its mixture parameters for the whole
    batch (kernels/mixture_sample.py): params (B, P), noise (B, K + C, N) float64 read at
    the pixel, the (B, C) draw into `out` and, if given, into `image` (B, C, N)."""

    family = "mixture_sample"

    def __init__(self, params: torch.Tensor, noise: torch.Tensor, position: torch.Tensor, channels: int,
                 out: torch.Tensor, image: torch.Tensor | None = None):
        check(channels in (1, 3), f"channels must be 1 or 3, got {channels!r}")
        check(params.dim() == 2 and params.dtype in _FLOAT_TYPES and params.is_contiguous(),
              f"params must be a contiguous floating-point (batch, P) tensor, got {params.dtype} {tuple(params.shape)}")
        batch = params.shape[0]
        _, k_plus_c, _, _ = mixture.noise_shape((*params.shape, 1, 1), channels)  # checks P against channels
        check(noise.dim() == 3 and noise.shape[:2] == (batch, k_plus_c) and noise.dtype == torch.float64
              and noise.is_contiguous(),
              f"noise must be contiguous float64 (batch={batch}, K + C={k_plus_c}, pixels), got {noise.dtype} "
              f"{tuple(noise.shape)}")
        check(position.shape == (1,) and position.dtype in (torch.int32, torch.int64),
              f"position must be an int32 or int64 tensor of shape (1,), got {position.dtype} {tuple(position.shape)}")
        check(out.shape == (batch, channels) and out.dtype in _FLOAT_TYPES and out.is_contiguous(),
              f"out must be a contiguous floating-point ({batch}, {channels}) tensor, got {out.dtype} {tuple(out.shape)}")
        if image is not None:
            expected = (batch, channels, noise.shape[2])
            check(image.shape == expected and image.dtype in _FLOAT_TYPES and image.is_contiguous(),
                  f"image must be a contiguous floating-point {expected} tensor, got {image.dtype} {tuple(image.shape)}")
        devices = {t.device for t in (params, noise, position, out, image) if t is not None}
        check(len(devices) == 1, f"params, noise, position, out and image must be on one device, got "
                                 f"{sorted(map(str, devices))}")
        args = (params, noise, position, out,
                out if image is None else image,  # a valid pointer that HAS_IMAGE=False never reads
                batch, k_plus_c - channels, noise.shape[2])
        super().__init__(args, dict(CHANNELS=channels, HAS_IMAGE=image is not None), batch, params.dtype)
        self.nr_mix = k_plus_c - channels
