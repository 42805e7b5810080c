"""A kernel launch bound to its arguments once, called at every pixel.

The fused sampler's steps are fixed lists of launches over fixed buffers. Binding each
launch when the sampler is built keeps the per-pixel path free of shape checks and
argument handling, and lets the ahead-of-time compile check ask every bound launch for
exactly the signature and constexprs it will run with (`aot_spec`).
"""
from __future__ import annotations

import torch

_TYPES = {torch.float32: "fp32", torch.float64: "fp64", torch.bfloat16: "bf16", torch.float16: "fp16",
          torch.int32: "i32", torch.int64: "i64"}


class BoundLaunch:
    """kernel[grid](*args, **constexprs, **options), ready to call."""

    def __init__(self, kernel, grid: tuple[int, ...], args: tuple, constexprs: dict, options: dict | None = None):
        self.kernel, self.grid, self.args = kernel, grid, args
        self.constexprs, self.options = constexprs, options or {}

    def __call__(self) -> None:
        self.kernel[self.grid](*self.args, **self.constexprs, **self.options)

    def aot_spec(self) -> tuple:
        """(jit function, signature, constexprs, options), as `triton.compile` takes them."""
        names = [name for name in self.kernel.arg_names if name not in self.constexprs]
        signature = {name: f"*{_TYPES[value.dtype]}" if isinstance(value, torch.Tensor) else "i32"
                     for name, value in zip(names, self.args)}
        return self.kernel, signature | {name: "constexpr" for name in self.constexprs}, self.constexprs, self.options


def check(ok: bool, message: str) -> None:
    """A launcher's argument check, done once when a launch is bound: ValueError(message)."""
    if not ok:
        raise ValueError(message)
