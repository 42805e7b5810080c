"""Image grids: many uint8 images tiled into one PNG."""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .checkpoint import write_atomically


def make_grid(images: torch.Tensor | np.ndarray, columns: int | None = None, padding: int = 2) -> np.ndarray:
    """Tile uint8 images (N, C, H, W) into one (rows*H, columns*W[, 3]) array, nearly square by default."""
    images = np.asarray(images)
    n, channels, height, width = images.shape
    columns = columns or max(1, math.ceil(math.sqrt(n)))
    rows = max(1, math.ceil(n / columns))
    grid = np.zeros((rows * (height + padding) + padding, columns * (width + padding) + padding, channels), np.uint8)
    for i, image in enumerate(images):
        top = padding + (i // columns) * (height + padding)
        left = padding + (i % columns) * (width + padding)
        grid[top:top + height, left:left + width] = image.transpose(1, 2, 0)
    return grid[:, :, 0] if channels == 1 else grid


MAX_CLASS_COLUMNS = 20  # more classes than this (ImageNet's 1000) get the nearly square grid


def class_columns(n: int, num_classes: int | None) -> int | None:
    """One column per class for images whose labels cycle 0, 1, ..., so each column shows one class;
    None (nearly square) for unconditional models, or when the classes do not fit a row."""
    return num_classes if num_classes and num_classes <= min(n, MAX_CLASS_COLUMNS) else None


def save_grid(images: torch.Tensor | np.ndarray, path: str | os.PathLike, columns: int | None = None) -> Path:
    """Write the images as one PNG grid, atomically."""
    path = Path(path)
    picture = Image.fromarray(make_grid(images, columns))
    write_atomically(path, lambda tmp: picture.save(tmp, format="PNG"))
    return path
