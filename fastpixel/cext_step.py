"""The cached sampler's pixel step in C++ (`csrc/step.cpp`): the Triton backend's step plan,
run by the CPU engine.

The model is walked once, by `fused_step.FusedSteps`, into a fixed list of bound launches
over `CachedNetwork`'s buffers (column convolutions, column copies, the mixture draw, the
position's advance). Here each launch is packed, when the sampler is built, into one op
descriptor for the engine: the same arguments its Triton kernel gets, tensors as
addresses. A step is then one call into C++ per run of packed ops; only the non-local
block, when it is due, stays in PyTorch between two such calls. The per-row work
(`CachedNetwork.start_row`: a few large convolutions per row) stays in PyTorch too.
"""
from __future__ import annotations

import ctypes
from typing import Callable

import numpy as np
import torch

from . import extension
from .cache import CachedNetwork
from .fused_step import Advance, FusedSteps, step_pattern
from .kernels.bound_launch import BoundLaunch
from .kernels.column_conv import _column_conv_kernel
from .kernels.column_copy import _column_copy_kernel
from .kernels.mixture_sample import _mixture_sample_kernel
from .model import LEVELS, PixelCNNpp

_DTYPES = (torch.float32, torch.float64)
# op kinds (csrc/step.cpp `Kind`) and the constexprs each kernel's C++ twin reads after its arguments
_CONSTEXPRS = {_column_conv_kernel: (0, ("KW", "STRIDE", "LEVEL", "FRESH", "STORE", "NL", "HAS_SKIP", "SKIP_NL", "GATE")),
               _column_copy_kernel: (1, ()),
               _mixture_sample_kernel: (2, ("CHANNELS", "HAS_IMAGE"))}
_ADVANCE = 3


def _pack(launch: BoundLaunch | Advance, slots: int) -> np.ndarray:
    """One op descriptor: its kind, then the launch's arguments (tensors as addresses)."""
    if isinstance(launch, Advance):
        kind, values = _ADVANCE, [launch.position]
    else:
        kind, names = _CONSTEXPRS[launch.kernel]
        values = [*launch.args, *(int(launch.constexprs[name]) for name in names)]
    for value in values:
        if isinstance(value, torch.Tensor) and value.dtype == torch.int64:
            raise ValueError("the C++ engine reads the position as int32")
    op = np.zeros(slots, dtype=np.int64)
    op[0] = kind
    op[1:1 + len(values)] = [v.data_ptr() if isinstance(v, torch.Tensor) else int(v) for v in values]
    return op


def engine_call(launches: list[BoundLaunch | Advance], dtype: torch.dtype) -> Callable[[], None]:
    """One call into the engine that runs `launches` in order, on tensors of `dtype`
    (float32 or float64), packed now. Raises extension.BuildError when there is no engine."""
    library = extension.load()
    run = library.fp_run_float64 if dtype == torch.float64 else library.fp_run_float32
    return _Ops(run, [_pack(launch, library.fp_op_slots()) for launch in launches])


class _Ops:
    """A run of packed ops: one call into the engine."""

    def __init__(self, run: Callable[[ctypes.c_void_p, int], None], ops: list[np.ndarray]):
        self.ops = np.stack(ops)  # kept here: the engine reads it at every call
        self.run, self.address, self.count = run, ctypes.c_void_p(self.ops.ctypes.data), len(ops)

    def __call__(self) -> None:
        self.run(self.address, self.count)


class CextSteps:
    """FusedSteps' pixel steps, each run by the C++ engine: `start_row(r)`, then `step(r, c)`
    for each pixel in raster order (the same contract as FusedSteps)."""

    def __init__(self, model: PixelCNNpp, net: CachedNetwork, x: torch.Tensor, noise: torch.Tensor):
        if x.dtype not in _DTYPES:
            raise ValueError(f"the C++ engine runs float32 and float64 models, not {x.dtype}")
        if x.device.type != "cpu":
            raise ValueError(f"the C++ engine runs on the CPU, and the model is on {x.device}")
        self.plan = FusedSteps(model, net, x, noise)  # keeps every buffer the ops point at alive
        self.params = self.plan.params
        self._segments = [self._segments_of(due, x.dtype) for due in range(1, LEVELS + 1)]

    def _segments_of(self, due: int, dtype: torch.dtype) -> list[Callable[[], None]]:
        """A step's launches (FusedSteps.step_launches) as runs of packed ops, one engine call
        each, with whatever is not a packable launch (the non-local block) between them."""
        segments, packable = [], []
        for launch in self.plan.step_launches[due]:
            if isinstance(launch, (BoundLaunch, Advance)):
                packable.append(launch)
                continue
            if packable:
                segments.append(engine_call(packable, dtype))
                packable = []
            segments.append(launch)
        if packable:
            segments.append(engine_call(packable, dtype))
        return segments

    def start_row(self, r: int) -> None:
        self.plan.start_row(r)

    def step(self, r: int, c: int) -> None:
        for segment in self._segments[step_pattern(r, c) - 1]:
            segment()

