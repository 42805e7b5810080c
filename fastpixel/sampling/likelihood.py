"""Scoring images: negative log-likelihood and bits per dimension, for every family, and the
conversions between uint8 images and the model's [-1, 1] grid."""
from __future__ import annotations

import contextlib
import math

import numpy as np
import torch
from tqdm.auto import tqdm

from ..models.config import check_labels
from ..models.families import family_of


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Grid values in [-1, 1] back to 0..255 (in float32: bf16 cannot hold 127.5 * x exactly)."""
    return torch.round((x.float() + 1) * 127.5).clamp(0, 255).to(torch.uint8)


def to_model_input(images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 images to the model's [-1, 1] grid."""
    return images.to(dtype) / 127.5 - 1


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def bits_per_dim(model, images_uint8: torch.Tensor | np.ndarray, labels=None,
                 batch_size: int = 256, progress: bool = False) -> float:
    """Average negative log2-likelihood per sub-pixel of uint8 images (N, C, H, W) (or of
    int codes (N, H, W) for a prior over codes), in eval mode."""
    images = torch.as_tensor(images_uint8)
    if len(images) == 0:
        raise ValueError("bits_per_dim needs at least one image")
    nats = nll_sum(model, images, labels, batch_size, progress)
    return nats / (images.numel() * math.log(2.0))


@torch.no_grad()
def nll_sum(model, images_uint8: torch.Tensor | np.ndarray, labels=None,
            batch_size: int = 256, progress: bool = False) -> float:
    """Total negative log-likelihood in nats of uint8 images (N, C, H, W) (or int codes
    (N, H, W)), in eval mode (sums from several processes add up, which bits_per_dim's
    averages would not)."""
    total = 0.0
    for output, x in _scored_batches(model, images_uint8, labels, batch_size, progress, "bits/dim"):
        total += float(model.nll(output, x).double().sum())
    return total


@torch.no_grad()
def log_prob(model, images_uint8: torch.Tensor | np.ndarray, labels=None, per_pixel: bool = False,
             batch_size: int = 256, progress: bool = False) -> torch.Tensor:
    """The log-likelihood in nats of uint8 images (N, C, H, W) (or int codes (N, H, W)), in
    eval mode: per image, (N,), or with per_pixel=True per sub-pixel, (N, C, H, W) (codes:
    (N, H, W)), each the log-probability of that sub-pixel given everything before it in
    raster order (colours in order within a pixel). A per-image number is the sum of its
    map; -mean / ln 2 of the maps is bits_per_dim. float64 on the CPU."""
    maps = torch.cat([model.log_prob(output, x).double().cpu()
                      for output, x in _scored_batches(model, images_uint8, labels, batch_size, progress, "log p")])
    if model.config.categorical_inputs:
        maps = maps[:, 0]
    return maps if per_pixel else maps.flatten(1).sum(1)


def _scored_batches(model, images_uint8, labels, batch_size: int, progress: bool, desc: str):
    """(forward's output, the x it scores) per batch of checked images, in eval mode."""
    images = torch.as_tensor(images_uint8)
    family_of(model)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    config = model.config
    codes = config.categorical_inputs
    if codes:
        if images.dim() == 4 and images.shape[1] == 1:  # (N, 1, H, W), as the codes data set holds them
            images = images[:, 0]
        if images.is_floating_point() or images.dtype == torch.bool or images.dim() != 3 or tuple(images.shape[1:]) != config.shape:
            raise ValueError(f"codes must be integers of shape (N, {config.shape[0]}, {config.shape[1]}), "
                             f"got {images.dtype} {tuple(images.shape)}")
    else:
        expected = (config.channels, *config.shape)
        if images.dtype != torch.uint8 or images.dim() != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(f"images must be uint8 of shape (N, {', '.join(map(str, expected))}), "
                             f"got {images.dtype} {tuple(images.shape)}")
    if labels is not None:
        labels = torch.as_tensor(labels)
    check_labels(config, labels, len(images))
    param = next(model.parameters())
    with eval_mode(model):
        for start in tqdm(range(0, len(images), batch_size), disable=not progress, desc=desc, unit="batch"):
            chunk = images[start:start + batch_size].to(param.device)
            y = None if labels is None else labels[start:start + batch_size].to(param.device)
            if codes:
                yield model(chunk.long(), y), chunk.long()
                continue
            # The likelihood is taken at the exact grid values; bf16 would round them off the grid.
            x = to_model_input(chunk, torch.promote_types(param.dtype, torch.float32))
            yield model(x.to(param.dtype), y), x
