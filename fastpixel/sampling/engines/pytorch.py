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

    def __init__(self, net: CachedNetwork, x: torch.Tensor, noise: torch.Tensor, prefix: torch.Tensor | None = None):
        self.net, self.image, self.noise, self.prefix = net, x, noise, prefix
        self.params = None  # the mixture parameters (B, P) of the pixel just drawn

    def start_row(self, r: int) -> None:
        self.net.start_row(r)

    def step(self, r: int, c: int, known: torch.Tensor | bool | None = None) -> None:
        self.params = self.net.step(r, c)
        here = (slice(None), slice(None), slice(r, r + 1), slice(c, c + 1))
        if known is True:
            pixel = self.prefix[here]
        else:
            pixel = mixture.sample(self.params[:, :, None, None], noise=self.noise[here], channels=self.image.shape[1])
            if known is not None:
                pixel = torch.where(known[:, None, None, None], self.prefix[here].to(pixel.dtype), pixel)
        self.image[here] = pixel
        self.net.commit(r, c, pixel[:, :, 0, 0])

    def decide(self, r: int, c: int, decide) -> None:
        self.params = self.net.step(r, c)
        for channel in range(self.image.shape[1]):  # a channel's distribution reads the earlier ones' levels
            self.image[:, channel, r, c] = decide(r, c, channel, self.params).to(self.image.dtype) / 127.5 - 1
        self.net.commit(r, c, self.image[:, :, r, c])

    def end_row(self, r: int) -> None:
        """Nothing: the steps wrote every pixel of the row."""


class MaskedPixels:
    """The masked families: per pixel and colour, the sampler's plan of products, then the
    draw; at the end of a row the drawn levels go into the canvas."""

    def __init__(self, sampler: CachedSampler, x: torch.Tensor, noise: torch.Tensor, prefix: torch.Tensor | None = None):
        self.sampler, self.image, self.noise = sampler, x, noise
        self.params = sampler.logits  # the logits (B, C, N) of the pixel just drawn
        self.prefix_levels = None if prefix is None else sampler.model.levels(prefix)  # (B, C, H, W)

    def start_row(self, r: int) -> None:
        self.sampler.start_row()

    def step(self, i: int, j: int, known: torch.Tensor | bool | None = None) -> None:
        s = self.sampler
        for c, plan in enumerate(s.plan):
            for product in plan:
                product(j)
            drawn = None if known is True else categorical.draw(s.logits[:, c], self.noise[:, c, i, j])
            s.take(c, j, self.level(c, i, j, known, drawn))

    def decide(self, i: int, j: int, decide) -> None:
        s = self.sampler
        for c, plan in enumerate(s.plan):
            for product in plan:
                product(j)
            s.take(c, j, decide(i, j, c, s.logits[:, c]))

    def level(self, c: int, i: int, j: int, known: torch.Tensor | bool | None, drawn: torch.Tensor | None) -> torch.Tensor:
        """Colour c's level at (i, j): the prefix's where `known` says so, else the one drawn."""
        if known is True:
            return self.prefix_levels[:, c, i, j]
        return drawn if known is None else torch.where(known, self.prefix_levels[:, c, i, j], drawn)

    def end_row(self, r: int) -> None:
        self.sampler.end_row()
        self.sampler.write_row(self.image, r)
