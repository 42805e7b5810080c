"""The naive sampler: one full forward pass per pixel (per colour, for the masked families).
The reference every cached engine must reproduce, image for image."""
from __future__ import annotations

from typing import Iterator

import torch

from ..models.pixelcnnpp import mixture
from ..models.pixelcnnpp.model import PixelCNNpp


def naive_rows(model, x: torch.Tensor, noise: torch.Tensor, labels, prefix: torch.Tensor | None = None,
               keep: torch.Tensor | None = None) -> Iterator[int]:
    """Fill x in place, pixel by pixel, each from a full forward pass (PixelCNN++ draws a
    pixel's colours jointly; the masked families one colour per pass); yield after each row.
    With `prefix` (a canvas like x) and `keep` (B,), image b's pixel p is the prefix's while
    p < keep[b] (its draw is made, then replaced, as the cached engines do)."""
    height, width = x.shape[2:]
    masked = not isinstance(model, PixelCNNpp)
    for r in range(height):
        for c in range(width):
            here = (slice(None), slice(None), slice(r, r + 1), slice(c, c + 1))
            known = None if prefix is None else (keep.to(x.device) > r * width + c)[:, None, None, None]
            if not masked:
                params = model(x, labels)[here]
                x[here] = mixture.sample(params, noise=noise[here], channels=x.shape[1])
                if known is not None:
                    x[here] = torch.where(known, prefix[here], x[here])
                continue
            for channel in range(model.substeps):
                logits = model(x, labels)[..., r:r + 1, c:c + 1]
                x[here] = model.draw(logits, noise[here], x[here], channel)
                if known is not None:
                    x[here] = torch.where(known, prefix[here], x[here])
        yield r
