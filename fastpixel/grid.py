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


def save_grid(images: torch.Tensor | np.ndarray, path: str | os.PathLike, columns: int | None = None) -> Path:
    """Write the images as one PNG grid, atomically."""
    path = Path(path)
    picture = Image.fromarray(make_grid(images, columns))
    write_atomically(path, lambda tmp: picture.save(tmp, format="PNG"))
    return path
