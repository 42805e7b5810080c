"""The naive sampler: one full forward pass per pixel (per colour, for the masked families).
The reference every cached engine must reproduce, image for image."""
from __future__ import annotations

from typing import Iterator

import torch

from ..models.pixelcnnpp import mixture
from ..models.pixelcnnpp.model import PixelCNNpp


def naive_rows(model, x: torch.Tensor, noise: torch.Tensor, labels) -> Iterator[int]:
    """Fill x in place, pixel by pixel, each from a full forward pass (PixelCNN++ draws a
    pixel's colours jointly; the masked families one colour per pass); yield after each row."""
    height, width = x.shape[2:]
    masked = not isinstance(model, PixelCNNpp)
    for r in range(height):
        for c in range(width):
            here = (slice(None), slice(None), slice(r, r + 1), slice(c, c + 1))
            if not masked:
                params = model(x, labels)[here]
                x[here] = mixture.sample(params, noise=noise[here], channels=x.shape[1])
                continue
            for channel in range(model.substeps):
                logits = model(x, labels)[..., r:r + 1, c:c + 1]
                x[here] = model.draw(logits, noise[here], x[here], channel)
        yield r
