"""The categorical output of the masked families (PixelCNN, Gated PixelCNN): N logits per
sub-pixel, its likelihood, and an exact one-uniform sampler.

Images live on the 256-level grid everywhere in fastpixel; a model of N levels sees
`level = u8 * N // 256` (N equal bins of the 256 values) and writes a level back as
`round(level * 255 / (N - 1))`, so N = 256 is the identity and its bits/dim compare with
PixelCNN++'s. A prior over discrete codes (categorical inputs) uses the codes as levels.

Sampling follows the noise contract with one uniform per sub-pixel through the inverse CDF
(the number of cumulative probabilities below the uniform), computed in float64 so that two
samplers whose logits agree to rounding draw the same level unless the uniform lies within
that rounding of a bin edge.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

MAX_IMAGE_LEVELS = 256   # colour levels of an image model: the grid has no more
MAX_CODES = 4096         # codes of a prior over discrete codes (categorical inputs)


def levels(x: torch.Tensor, n_levels: int) -> torch.Tensor:
    """Grid values in [-1, 1] (B, C, H, W) to integer levels 0..N-1 (int64)."""
    u8 = torch.round((x.double() + 1) * 127.5).clamp(0, 255).long()
    return u8 * n_levels // 256


def grid_values(level: torch.Tensor, n_levels: int, dtype: torch.dtype) -> torch.Tensor:
    """Levels back on the [-1, 1] grid (`u8 / 127.5 - 1` of the level's 0..255 value)."""
    u8 = torch.round(level.double() * (255 / (n_levels - 1)))
    return (u8 / 127.5 - 1).to(dtype)


def scaled(level: torch.Tensor, n_levels: int, dtype: torch.dtype) -> torch.Tensor:
    """Levels as the model's input intensities: evenly spaced in [-1, 1]."""
    return (level.to(dtype) * (2 / (n_levels - 1)) - 1).to(dtype)


def nll(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood in nats per image, (B,), of integer levels `target` (B, C, H, W)
    under logits (B, C, N, H, W)."""
    return -log_prob(logits, target).flatten(1).sum(1)


def log_prob(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """log P of each integer level of `target` (B, C, H, W) under logits (B, C, N, H, W), (B, C, H, W)."""
    if logits.dim() != 5 or target.shape != (logits.shape[0], logits.shape[1], *logits.shape[3:]):
        raise ValueError(f"logits (B, C, N, H, W) and levels (B, C, H, W) do not fit: "
                         f"{tuple(logits.shape)} and {tuple(target.shape)}")
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 logits are scored in float32
    return -F.cross_entropy(logits.transpose(1, 2), target, reduction="none")


def pmf(logits: torch.Tensor) -> torch.Tensor:
    """The distribution over levels, float64, of logits (B, N)."""
    return torch.softmax(logits.double(), dim=-1)


def draw(logits: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """The level (int64, logits' shape without the level axis `dim=1`) whose CDF interval holds
    each uniform: logits (B, N, ...), uniforms (B, ...) in [0, 1)."""
    cdf = torch.softmax(logits.double(), dim=1).cumsum(dim=1)
    level = (cdf < uniforms.double().unsqueeze(1)).sum(dim=1)
    return level.clamp_(max=logits.shape[1] - 1)  # a uniform above a cdf that rounds to 1 - eps
