"""The noise contract: image i's uniforms are drawn up front from its own CPU generator
seeded from (seed, i), so image i is the same whatever n, the batch size, the sampler, the
engine, or the process that draws it (`first` in `sample` lets each of several processes
draw its own slice). Also: how much memory a draw needs, checked before any work.
"""
from __future__ import annotations

import os
import resource

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
    available = available_memory()
    if needed > available:
        raise ValueError(f"drawing {n} images in batches of {batch_size} needs at least {needed / 2**30:.3g} GiB of "
                         f"memory, more than the {available / 2**30:.3g} GiB available here: ask for fewer images "
                         "or a smaller batch size")


def _bytes_per_value(config) -> int:
    return 8 if config.categorical_inputs else 1  # int64 codes, else uint8 images


def available_memory(proc: str = "/proc", cgroups: str = "/sys/fs/cgroup") -> int:
    """Bytes this process can still allocate: the least of the machine's MemAvailable, its
    cgroup's limit less its usage (a container's; cgroup v2 or v1), and the address-space
    rlimit (`ulimit -v`) less what the process already maps."""
    rooms = [_meminfo_available(proc), _cgroup_room(proc, cgroups), _rlimit_room(proc)]
    return min(room for room in rooms if room is not None)


def _meminfo_available(proc: str) -> int:
    try:
        with open(f"{proc}/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _cgroup_room(proc: str, cgroups: str) -> int | None:
    """The cgroup's limit less its usage, or None without a limit (or a readable cgroup)."""
    try:
        lines = open(f"{proc}/self/cgroup").read().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2: one hierarchy
            files, folders = ("memory.max", "memory.current"), (f"{cgroups}{path}", cgroups)
        elif "memory" in controllers.split(","):  # v1: the memory controller's hierarchy
            files, folders = ("memory.limit_in_bytes", "memory.usage_in_bytes"), (f"{cgroups}/memory{path}", f"{cgroups}/memory")
        else:
            continue
        for folder in folders:  # the process's own cgroup, or the root a namespaced mount shows
            try:
                limit, usage = (open(f"{folder}/{name}").read().strip() for name in files)
            except OSError:
                continue
            if limit != "max" and int(limit) < 2**60:  # v1 writes "no limit" as a huge number
                return max(0, int(limit) - int(usage))
            break
    return None


def _rlimit_room(proc: str) -> int | None:
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY:
        return None
    try:
        with open(f"{proc}/self/status") as f:
            mapped = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    except (OSError, StopIteration, ValueError):
        mapped = 0
    return max(0, soft - mapped)
