"""The PyTorch engine: a cache's own reference steps, run operator by operator. It runs on
every device and dtype, and is what the faster engines are checked against."""
from __future__ import annotations

import torch

from ...models.masked import categorical
from ...models.pixelcnnpp import mixture
from ..caches.masked import CachedSampler
from ..caches.pixelcnnpp import CachedNetwork


class TorchSteps:
    """PixelCNN++: CachedNetwork's per-row work, then per pixel its step, the mixture draw
    with the pixel's noise, and the commit of the drawn pixel to the input layers."""

    def __init__(self, net: CachedNetwork, x: torch.Tensor, noise: torch.Tensor):
        self.net, self.image, self.noise = net, x, noise
        self.params = None  # the mixture parameters (B, P) of the pixel just drawn

    def start_row(self, r: int) -> None:
        self.net.start_row(r)

    def step(self, r: int, c: int, known: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        self.params = self.net.step(r, c)
        here = (slice(None), slice(None), slice(r, r + 1), slice(c, c + 1))
        pixel = mixture.sample(self.params[:, :, None, None], noise=self.noise[here], channels=self.image.shape[1])
        if known is not None:
            which, values = known
            pixel = torch.where(which[:, None, None, None], values[:, :, None, None].to(pixel.dtype), pixel)
        self.image[here] = pixel
        self.net.commit(r, c, pixel[:, :, 0, 0])

    def end_row(self, r: int) -> None:
        """Nothing: the steps wrote every pixel of the row."""


class MaskedPixels:
    """The masked families: per pixel and colour, the sampler's plan of products, then the
    draw; at the end of a row the drawn levels go into the canvas."""

    def __init__(self, sampler: CachedSampler, x: torch.Tensor, noise: torch.Tensor):
        self.sampler, self.image, self.noise = sampler, x, noise
        self.params = sampler.logits  # the logits (B, C, N) of the pixel just drawn

    def start_row(self, r: int) -> None:
        self.sampler.start_row()

    def step(self, i: int, j: int, known: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        s = self.sampler
        for c, plan in enumerate(s.plan):
            for product in plan:
                product(j)
            s.take(c, j, categorical.draw(s.logits[:, c], self.noise[:, c, i, j]), known)

    def end_row(self, r: int) -> None:
        self.sampler.end_row()
        self.sampler.write_row(self.image, r)
