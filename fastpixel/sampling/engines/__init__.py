"""The engines that run a cache's steps, one interface for all, and the loop that drives them.

A cache (fastpixel/sampling/caches) holds a family's state while an image is drawn; an
engine runs its steps. Every engine's steps object has the same shape:

- `start_row(r)`: the row's work, once image rows < r are final;
- `step(r, c, known=None)`: draw pixel (r, c) into the canvas, leaving its distribution's
  parameters in `params` (mixture parameters (B, P), or logits (B, C, N) for the masked
  families). Built with a `prefix` (a canvas like the image), a step can take the prefix's
  pixel instead of a draw: for every image (`known=True`; no draw is made) or for the images
  a (B,) bool tensor names. This is teacher forcing: completion from a prefix runs the very
  steps sampling runs, and the parameters at a known pixel are those of a full forward pass;
- `decide(r, c, decide)`: pixel (r, c) with no noise read: decide(r, c, channel, params)
  gives each colour's levels (B,) int64 in turn, from that colour's parameters (PixelCNN++:
  the pixel's (B, P); the masked families: the colour's logits (B, N), computed once the
  earlier colours are taken). The codec decides with its entropy decoder, and its encoder
  with the image, through the same steps;
- `end_row(r)`: what the row leaves for the next one.

The engines: `torch` (pytorch.py: the caches' own reference steps, everywhere), `triton`
(fused.py: fused Triton launches replayed through CUDA graphs) and `cext` (cext.py: the
C++ engine on the CPU). Which one runs is fastpixel.backend's decision; which steps an
engine has for which cache is `ENGINES`, and which cache a family has is `CACHES`: adding
an engine or a family is an entry in each table here, with no branch elsewhere.

May import: fastpixel.models, fastpixel.kernels, fastpixel.extension (the C++ build).
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch

from ...models.families import family_of
from ..caches.gated import CachedGated
from ..caches.masked import CachedSampler
from ..caches.pixelcnn import CachedPixelCNN
from ..caches.pixelcnnpp import CachedNetwork
from .cext import CextSteps, EnginePixels
from .fused import FusedSteps
from .pytorch import MaskedPixels, TorchSteps

Decide = Callable[[int, int, int, torch.Tensor], torch.Tensor]  # (r, c, channel, params) -> levels (B,)

CACHES = {"pixelcnnpp": CachedNetwork, "pixelcnn": CachedPixelCNN, "gated": CachedGated}
ENGINES = {
    "torch": {CachedNetwork: TorchSteps, CachedSampler: MaskedPixels},
    "triton": {CachedNetwork: FusedSteps},
    "cext": {CachedNetwork: CextSteps, CachedSampler: EnginePixels},
}


def _steps_type(engine: str, cache: type) -> type | None:
    return next((steps for kind, steps in ENGINES[engine].items() if issubclass(cache, kind)), None)


def runs(engine: str, family: str) -> bool:
    """Whether `engine` has steps for the family's cache."""
    return _steps_type(engine, CACHES[family]) is not None


def cached_rows(model, x: torch.Tensor, noise: torch.Tensor, labels: torch.Tensor | None, engine: str = "torch",
                on_step: Callable[[int, int, torch.Tensor], None] | None = None, prefix: torch.Tensor | None = None,
                keep: torch.Tensor | None = None, decide: Decide | None = None) -> Iterator[int]:
    """Fill the canvas x (B, C, H, W) in place through the model's cache, each step run by
    `engine`; yield after each row. Same noise, same order, same draws as the naive sampler.
    on_step(r, c, params) sees each pixel's distribution parameters. With `prefix` (a canvas
    like x) and `keep` (B,) int64, image b's pixel p (raster order) is the prefix's while
    p < keep[b], and drawn with its own noise after. With `decide`, every level is decide's
    (see the module docstring) and the noise is not read."""
    cache_type = CACHES[family_of(model).name]
    steps_type = _steps_type(engine, cache_type)
    if steps_type is None:
        raise ValueError(f"the {engine} engine has no steps for {cache_type.__name__}")
    height, width = x.shape[2:]
    all_known = any_known = 0  # pixels p < all_known are known in every image, p < any_known in some
    if prefix is not None and keep.numel():
        all_known, any_known = int(keep.min()), int(keep.max())
        known = torch.arange(height * width) < keep[:, None]  # (B, H * W)
        x.copy_(torch.where(known.view(-1, 1, height, width).to(x.device), prefix, x))
        keep = keep.to(x.device)
    with torch.no_grad():
        steps = steps_type(cache_type(model, x.shape[0], labels), x, noise, prefix)
        for r in range(height):
            # Triton launches on the current CUDA device: make it the model's (a no-op on the CPU)
            with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
                steps.start_row(r)
                for c in range(width):
                    p = r * width + c
                    if decide is not None:
                        steps.decide(r, c, decide)
                    else:
                        steps.step(r, c, True if p < all_known else keep > p if p < any_known else None)
                    if on_step is not None:
                        on_step(r, c, steps.params)
                steps.end_row(r)
            yield r
