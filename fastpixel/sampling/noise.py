"""The noise contract: image i's uniforms are drawn up front from its own CPU generator
seeded from (seed, i), so image i is the same whatever n, the batch size, the sampler, the
engine, or the process that draws it (`first` in `sample` lets each of several processes
draw its own slice). Also: how much memory a draw needs, checked before any work.
"""
from __future__ import annotations

import os

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


DEFAULT_BATCH = 256  # images drawn at once when no batch size is given: each holds its noise and activations


def check_fits(config, n: int, batch_size: int, copies: int = 1) -> None:
    """Refuse, before any work, a draw whose memory cannot exist here: `copies` uint8 arrays of
    all n images, plus one batch's float64 noise (made, then stacked) and canvas."""
    pixels = config.shape[0] * config.shape[1]
    noise_and_canvas = 8 * pixels * (2 * config.noise_channels + config.channels)
    needed = copies * n * config.channels * pixels * _bytes_per_value(config) + batch_size * noise_and_canvas
    available = _available_memory()
    if needed > available:
        raise ValueError(f"drawing {n} images in batches of {batch_size} needs at least {needed / 2**30:.3g} GiB of "
                         f"memory, more than the {available / 2**30:.3g} GiB available here: ask for fewer images "
                         "or a smaller batch size")


def _bytes_per_value(config) -> int:
    return 8 if config.categorical_inputs else 1  # int64 codes, else uint8 images


def _available_memory() -> int:
    """Bytes of memory this machine can still hand out (MemAvailable on Linux, else all of it)."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
