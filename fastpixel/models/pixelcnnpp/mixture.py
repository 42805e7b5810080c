"""The discretised logistic mixture, PixelCNN++'s likelihood (`fastpixel.mixture`).

The math is plain PyTorch in kernels/mixture.py, beside the fused Triton kernels it is the
reference of; this module adds who computes the loss: `nll` and `focal_nll` hand CUDA
tensors to the fused kernel with the same loss and its gradient (kernels/mixture_nll.py)
where fastpixel.backend.choose_loss says so, and run the PyTorch code everywhere else.
Parameter layout, sampling and the noise it consumes are described there.
"""
from __future__ import annotations

import torch

from ...backend import choose_loss
from ...kernels import mixture as plain
from ...kernels.mixture import HALF_BIN, MIN_LOG_SCALE, level_pmf, log_prob, noise_shape, num_params, sample, snap_to_grid

__all__ = ["nll", "focal_nll", "log_prob", "level_pmf", "sample", "noise_shape", "num_params", "snap_to_grid", "HALF_BIN", "MIN_LOG_SCALE"]


def _fused(params: torch.Tensor, backend: str | None):
    """kernels/mixture_nll.py when fastpixel.backend.choose_loss picks Triton, else None."""
    if choose_loss(params.device, backend) != "triton":
        return None
    from ...kernels import mixture_nll  # imports Triton: only when it runs (an import statement torch.compile traces)
    return mixture_nll


def nll(params: torch.Tensor, x: torch.Tensor, backend: str | None = None) -> torch.Tensor:
    """Negative log-likelihood in nats per image, (B,), of images x (B, C, H, W) on the
    256-level grid in [-1, 1] under mixture parameters (B, P, H, W). `backend` ("torch",
    "triton"; None: $FASTPIXEL_BACKEND, else Triton's fused kernel for CUDA tensors and
    PyTorch elsewhere) says who computes it (fastpixel.backend.choose_loss)."""
    fused = _fused(params, backend)
    return plain.nll(params, x) if fused is None else fused.nll(params, x)


def focal_nll(params: torch.Tensor, x: torch.Tensor, gamma: float = 2.0, backend: str | None = None) -> torch.Tensor:
    """Focal loss (Lin et al. 2017) per image, (B,): the sum over sub-pixels of
    -(1 - P)^gamma log P, P the chain rule's sub-pixel conditional; equal to `nll` at
    gamma = 0 (kernels/mixture.py says how). `backend` as for `nll`."""
    plain.check_gamma(gamma)
    fused = _fused(params, backend)
    return plain.focal_nll(params, x, gamma) if fused is None else fused.focal_nll(params, x, gamma)
