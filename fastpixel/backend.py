"""Which implementation runs the cached sampler's per-pixel work: the one place that decides.

- `torch`: plain PyTorch (`fastpixel/cache.py`), everywhere; the default off CUDA, where
  it is the fastest path we have.
- `triton`: fused Triton kernels (`kernels/`) replayed through CUDA graphs
  (`fastpixel/fused_step.py`); the default for CUDA tensors when Triton imports. With
  `TRITON_INTERPRET=1` it also runs on CPU tensors, slowly: that is how it is tested
  without a GPU.
- `cext`: the C++ extension `fastpixel._C` (`csrc/`), not built yet.

`FASTPIXEL_BACKEND=torch|triton|cext` (or the `backend=` argument, or the sampling CLI's
`--backend`) forces one. A forced backend that cannot run, or an unknown name, is an error
that says why: never a silent fallback, so a benchmark measures what it says it measures.
"""
from __future__ import annotations

import importlib.util
import os

import torch

NAMES = ("torch", "triton", "cext")
ENV_VAR = "FASTPIXEL_BACKEND"


class BackendError(ValueError):
    """A backend was asked for that does not exist or cannot run on this machine."""


def triton_interpreted() -> bool:
    """Whether Triton kernels run in its CPU interpreter (read when the kernels are first imported)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def why_unavailable(name: str, device: torch.device) -> str | None:
    """None if backend `name` can run on tensors of `device`, else the reason it cannot."""
    if name == "torch":
        return None
    if name == "triton":
        if importlib.util.find_spec("triton") is None:
            return "Triton is not installed (pip install triton)"
        if device.type == "cuda" or (device.type == "cpu" and triton_interpreted()):
            return None
        return (f"Triton kernels need CUDA tensors, and the model is on {device.type}"
                + (" (set TRITON_INTERPRET=1 to run them, slowly, on the CPU)" if device.type == "cpu" else ""))
    if name == "cext":
        return "the C++ extension fastpixel._C is not built yet (csrc/ holds no engine)"
    raise BackendError(f"unknown backend {name!r}; choose one of {', '.join(NAMES)}")


def choose(device: torch.device | str, requested: str | None = None) -> str:
    """The backend for tensors on `device`: `requested`, else $FASTPIXEL_BACKEND, else the
    fastest one that can run there. Raises BackendError if a forced one cannot."""
    device = torch.device(device)
    name = requested or os.environ.get(ENV_VAR) or None
    if name is None:
        return "triton" if device.type == "cuda" and why_unavailable("triton", device) is None else "torch"
    source = f"{ENV_VAR}={name}" if requested is None else f"backend {name!r}"
    if name not in NAMES:
        raise BackendError(f"{source}: unknown backend; choose one of {', '.join(NAMES)}")
    reason = why_unavailable(name, device)
    if reason is not None:
        raise BackendError(f"{source} cannot run here: {reason}")
    return name
