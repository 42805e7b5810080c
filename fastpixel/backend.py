"""Which implementation runs the cached sampler's steps, and the training kernels: the one place that decides.

What each engine runs for which family is the engine registry (fastpixel/sampling/engines);
this module says which engine can run on which device and dtype, and picks one.

- `torch`: plain PyTorch (the caches' own steps, fastpixel/sampling/caches), everywhere; the fallback when neither
  engine below can run.
- `triton`: fused Triton kernels (`kernels/`) replayed through CUDA graphs
  (`fastpixel/sampling/engines/fused.py`); the default for CUDA tensors when Triton imports. With
  `TRITON_INTERPRET=1` it also runs on CPU tensors, slowly: that is how it is tested
  without a GPU.
- `cext`: the C++ engine (`csrc/`, `fastpixel/sampling/engines/cext.py`) running the same step plan
  as the Triton backend, and the per-row work, on CPU tensors, float32 or float64; compiled on first use
  (`fastpixel/extension.py`). The default on the CPU, where it measured faster than `torch`
  for every model and batch timed (benchmarks/results/cpu_cext.md). Where it cannot be
  built, the automatic choice warns once and takes `torch`. It also runs the masked
  families' pixels (`EnginePixels` in `fastpixel/sampling/engines/cext.py`; benchmarks/results/cpu_cext.md), which
  have no Triton kernels: `fastpixel.sampling.resolve_backend` refuses `triton` for them.

Training has two of them. The mixture loss (`mixture.nll`, `mixture.focal_nll`), chosen by
`choose_loss`: `triton` (kernels/mixture_nll.py) for CUDA tensors, `torch` elsewhere. The
shifted convolutions and gated blocks of PixelCNN++ (`fastpixel/models/pixelcnnpp/layers.py`), chosen by
`choose_conv`: `torch` (cuDNN) unless `triton` (kernels/shifted_conv.py) is forced, until
the fused kernels are timed against cuDNN on a GPU.

`FASTPIXEL_BACKEND=torch|triton|cext` (or the `backend=` argument, or the sampling CLI's
`--backend`) forces one; `auto`, or nothing, takes the automatic choice. A forced backend that cannot run, or an unknown name, is an error
that says why: never a silent fallback, so a benchmark measures what it says it measures.
"""
from __future__ import annotations

import importlib.util
import os
import warnings

import torch

from .kernels.ops import triton_interpreted

NAMES = ("torch", "triton", "cext")
ENV_VAR = "FASTPIXEL_BACKEND"


class BackendError(ValueError):
    """A backend was asked for that does not exist or cannot run on this machine."""


def why_unavailable(name: str, device: torch.device, dtype: torch.dtype | None = None) -> str | None:
    """None if backend `name` can run on tensors of `device` (and `dtype`, when given), else
    the reason it cannot. For `cext`, this compiles the engine the first time."""
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
        if device.type != "cpu":
            return f"the C++ engine runs on CPU tensors, and the model is on {device.type}"
        if dtype is not None and dtype not in (torch.float32, torch.float64):
            return f"the C++ engine runs float32 and float64 models, not {dtype}"
        from . import extension
        return extension.why_unavailable()
    raise BackendError(f"unknown backend {name!r}; choose one of {', '.join(NAMES)}")


def choose(device: torch.device | str, requested: str | None = None, dtype: torch.dtype | None = None) -> str:
    """The backend for tensors on `device` (of `dtype`): `requested`, else $FASTPIXEL_BACKEND,
    else the fastest one that can run there. Raises BackendError if a forced one cannot."""
    device = torch.device(device)
    name = requested or os.environ.get(ENV_VAR) or None
    if name in (None, "auto"):
        return _automatic(device, dtype)
    source = f"{ENV_VAR}={name}" if requested is None else f"backend {name!r}"
    if name not in NAMES:
        raise BackendError(f"{source}: unknown backend; choose one of {', '.join(NAMES)}")
    reason = why_unavailable(name, device, dtype)
    if reason is not None:
        raise BackendError(f"{source} cannot run here: {reason}")
    return name


def choose_loss(device: torch.device | str, requested: str | None = None) -> str:
    """Who computes the mixture loss (`fastpixel.mixture.nll`, `focal_nll`): "triton" (the
    fused kernels, kernels/mixture_nll.py) or "torch". `requested`, else $FASTPIXEL_BACKEND,
    forces one as `choose` does; the C++ engine has no loss, so $FASTPIXEL_BACKEND=cext (which
    picks the sampler's engine) leaves the loss to PyTorch, and requesting "cext" is an error.
    Automatically: Triton for CUDA tensors when it imports, PyTorch on every other device."""
    return _choose_training(device, requested, "mixture loss", automatic_triton=True)


def choose_conv(device: torch.device | str, requested: str | None = None) -> str:
    """Who runs PixelCNN++'s shifted convolutions and gated blocks in a forward pass
    (`fastpixel.models.pixelcnnpp.layers`): "triton" (kernels/shifted_conv.py, forward and backward fused) or
    "torch" (cuDNN on a GPU). Forced as `choose_loss`; automatically PyTorch everywhere, because
    the fused convolutions have not yet been timed against cuDNN on a GPU."""
    return _choose_training(device, requested, "training convolutions", automatic_triton=False)


def _choose_training(device: torch.device | str, requested: str | None, what: str, automatic_triton: bool) -> str:
    device = torch.device(device)
    if device.type == "meta":  # shapes only (a memory estimate): no kernel runs
        return "torch"
    if requested == "cext":
        raise BackendError(f"backend 'cext': the C++ engine has no {what}; choose torch or triton")
    name = requested or os.environ.get(ENV_VAR) or None
    if name == "cext":
        return "torch"
    if name is None:
        triton_runs = automatic_triton and device.type == "cuda" and why_unavailable("triton", device) is None
        return "triton" if triton_runs else "torch"
    return choose(device, requested)


def _automatic(device: torch.device, dtype: torch.dtype | None) -> str:
    if device.type == "cuda":
        return "triton" if why_unavailable("triton", device) is None else "torch"
    if device.type != "cpu" or (dtype is not None and dtype not in (torch.float32, torch.float64)):
        return "torch"
    reason = why_unavailable("cext", device)
    if reason is None:
        return "cext"
    # the reason is the same for the rest of the process (the build is tried once), so is the warning
    warnings.warn(f"fastpixel: the C++ engine is unavailable, sampling with the PyTorch path ({reason})",
                  RuntimeWarning, stacklevel=3)
    return "torch"
