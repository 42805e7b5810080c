"""The noise contract: image i's uniforms are drawn up front from its own CPU generator
seeded from (seed, i), so image i is the same whatever n, the batch size, the sampler, the
engine, or the process that draws it (`first` in `sample` lets each of several processes
draw its own slice).
"""
from __future__ import annotations

import numpy as np
import torch


def image_noise(config, seed: int, index: int) -> torch.Tensor:
    """The uniforms (config.noise_channels, H, W), float64 on the CPU, that image `index` of a
    draw with `seed` consumes (PixelCNN++: K + C per pixel; the masked families: C)."""
    # SeedSequence mixes (seed, index) into an independent stream; seed*n + index would collide.
    state = np.random.SeedSequence([seed, index]).generate_state(2, dtype=np.uint32)
    generator = torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
    shape = (config.noise_channels, *config.shape)
    return torch.rand(shape, generator=generator, dtype=torch.float64)
