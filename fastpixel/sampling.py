"""Drawing images from a model, and scoring them: the naive sampler (one full forward pass
per pixel, the reference the cached sampler must reproduce) and bits per dimension.

The noise contract: image i's uniforms are drawn up front from its own CPU generator
seeded from (seed, i), so image i is the same whatever n, the batch size, the sampler, or
the process that draws it (`first` lets each of several processes draw its own slice).
"""
from __future__ import annotations

import contextlib
import math
import os
import sys
from typing import Iterator, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from . import cache, mixture
from .backend import ENV_VAR, choose
from .families import family_of
from .model import PixelCNNpp, check_labels


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


def sample(model, n: int, fast: bool = False, seed: int | None = None,
           labels: Sequence[int] | torch.Tensor | None = None, progress: bool = False,
           batch_size: int | None = None, backend: str | None = None, first: int = 0) -> torch.Tensor:
    """Draw n images, uint8 (n, C, H, W) on the CPU, on the model's device and in its dtype;
    a prior over discrete codes (categorical_inputs) returns int64 codes (n, H, W).

    fast=True uses the incremental activation cache; with the same seed it returns the
    same images as the naive sampler (bit for bit in float64; in lower precision the two
    compute the same parameters to rounding, so a draw that lands on a bin edge may differ).
    Class-conditional models take one label per image (default: cycle through the classes
    by image index). batch_size=None draws DEFAULT_BATCH images at a time; a draw that
    cannot fit in memory is a ValueError before any work. seed=None draws a fresh seed.
    `backend` ("torch", "triton", "cext"; None: $FASTPIXEL_BACKEND, else the fastest here) runs the cached sampler; see
    fastpixel.backend (the masked families run "cext" or "torch"). `first` > 0 draws images first .. first+n-1 of the seed's sequence,
    so processes that split the indices together return one draw's images.
    """
    family = family_of(model).name
    config = model.config
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    if batch_size is None:
        batch_size = min(max(n, 1), DEFAULT_BATCH)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    check_fits(config, n, min(batch_size, n))
    if seed is None:
        seed = int(np.random.SeedSequence().generate_state(1, dtype=np.uint32)[0])
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    if isinstance(first, bool) or not isinstance(first, int) or first < 0:
        raise ValueError(f"first must be a non-negative int, got {first!r}")
    labels = _labels_for(config, n, labels, first)
    param = next(model.parameters())
    name = resolve_backend(param.device, fast, backend, param.dtype, family)
    if progress:
        print(f"fastpixel: {describe(fast, name, param.device)}", file=sys.stderr)

    codes = config.categorical_inputs
    images = torch.empty((n, config.channels, *config.shape), dtype=torch.int64 if codes else torch.uint8)
    height = config.shape[0]
    with _eval_mode(model), torch.no_grad(), tqdm(total=-(-n // batch_size) * height, unit="row",
                                                   disable=not progress, desc="sampling") as bar:
        for start in range(0, n, batch_size):
            stop = min(start + batch_size, n)
            noise = torch.stack([image_noise(config, seed, first + i) for i in range(start, stop)]).to(param.device)
            batch_labels = None if labels is None else labels[start:stop].to(param.device)
            x = torch.zeros((stop - start, config.channels, *config.shape), dtype=torch.int64 if codes else param.dtype,
                            device=param.device)
            for _ in _rows(model, family, fast, name, x, noise, batch_labels):
                bar.update(1)
            images[start:stop] = x.cpu() if codes else to_uint8(x).cpu()
    return images[:, 0] if codes else images


def _rows(model, family: str, fast: bool, backend: str, x: torch.Tensor, noise: torch.Tensor, labels) -> Iterator[int]:
    """The sampler that fills the canvas x in place, yielding after each row."""
    if not fast:
        return _naive_rows(model, x, noise, labels)
    if family == "pixelcnnpp":
        return cache.sample_rows(model, x, noise, labels, backend=backend)
    return model.cached_sampler(len(x), labels).rows(x, noise, backend)


def resolve_backend(device: torch.device | str, fast: bool, requested: str | None = None,
                    dtype: torch.dtype | None = None, family: str = "pixelcnnpp") -> str:
    """The backend that sample(fast=fast, backend=requested) runs on `device` for a model of
    `dtype` and `family` (fastpixel.backend.choose). Raises a ValueError (a
    fastpixel.backend.BackendError when it cannot run here) before any work. The masked
    families have no Triton kernels: "triton" is refused for them, and where it would be
    chosen (CUDA tensors) they take "torch"."""
    if fast:
        if family != "pixelcnnpp" and (requested or os.environ.get(ENV_VAR)) == "triton":
            raise ValueError(f"backend 'triton' serves PixelCNN++ models only: the {family} family samples with "
                             "the C++ engine (backend 'cext', on the CPU) or PyTorch layers (backend 'torch')")
        name = choose(device, requested, dtype)  # also checks a backend forced by $FASTPIXEL_BACKEND
        return "torch" if family != "pixelcnnpp" and name == "triton" else name
    if requested not in (None, "torch"):
        raise ValueError(f"backend {requested!r} applies to the cached sampler only (fast=True, --fast): "
                         "the naive sampler runs plain PyTorch layers")
    if requested is None and os.environ.get(ENV_VAR):
        choose(device, None, dtype)  # a bad $FASTPIXEL_BACKEND is an error here too
    return "torch"


def describe(fast: bool, backend: str, device: torch.device | str) -> str:
    """Which sampler and backend a draw runs, in words (the progress line, the CLI's summary)."""
    if fast:
        return f"cached sampling, {backend} backend, on {device}"
    return f"naive sampling (a full forward pass per pixel), {backend}, on {device}"


def _naive_rows(model, x: torch.Tensor, noise: torch.Tensor, labels) -> Iterator[int]:
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


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Grid values in [-1, 1] back to 0..255 (in float32: bf16 cannot hold 127.5 * x exactly)."""
    return torch.round((x.float() + 1) * 127.5).clamp(0, 255).to(torch.uint8)


def to_model_input(images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 images to the model's [-1, 1] grid."""
    return images.to(dtype) / 127.5 - 1


def _labels_for(config, n: int, labels, first: int) -> torch.Tensor | None:
    if labels is None:  # by global image index, so a process's slice gets the labels of a one-process draw
        return None if config.num_classes is None else torch.arange(first, first + n) % config.num_classes
    labels = torch.as_tensor(labels)
    if labels.dim() == 0:
        labels = labels.expand(n)
    check_labels(config, labels, n)
    return labels.long()


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def bits_per_dim(model, images_uint8: torch.Tensor | np.ndarray, labels=None,
                 batch_size: int = 256, progress: bool = False) -> float:
    """Average negative log2-likelihood per sub-pixel of uint8 images (N, C, H, W) (or of
    int codes (N, H, W) for a prior over codes), in eval mode."""
    images = torch.as_tensor(images_uint8)
    if len(images) == 0:
        raise ValueError("bits_per_dim needs at least one image")
    nats = nll_sum(model, images, labels, batch_size, progress)
    return nats / (images.numel() * math.log(2.0))


@torch.no_grad()
def nll_sum(model, images_uint8: torch.Tensor | np.ndarray, labels=None,
            batch_size: int = 256, progress: bool = False) -> float:
    """Total negative log-likelihood in nats of uint8 images (N, C, H, W) (or int codes
    (N, H, W)), in eval mode (sums from several processes add up, which bits_per_dim's
    averages would not)."""
    images = torch.as_tensor(images_uint8)
    family_of(model)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    config = model.config
    codes = config.categorical_inputs
    if codes:
        if images.dim() == 4 and images.shape[1] == 1:  # (N, 1, H, W), as the codes data set holds them
            images = images[:, 0]
        if images.is_floating_point() or images.dtype == torch.bool or images.dim() != 3 or tuple(images.shape[1:]) != config.shape:
            raise ValueError(f"codes must be integers of shape (N, {config.shape[0]}, {config.shape[1]}), "
                             f"got {images.dtype} {tuple(images.shape)}")
    else:
        expected = (config.channels, *config.shape)
        if images.dtype != torch.uint8 or images.dim() != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(f"images must be uint8 of shape (N, {', '.join(map(str, expected))}), "
                             f"got {images.dtype} {tuple(images.shape)}")
    if labels is not None:
        labels = torch.as_tensor(labels)
    check_labels(config, labels, len(images))
    param = next(model.parameters())
    total = 0.0
    with _eval_mode(model):
        for start in tqdm(range(0, len(images), batch_size), disable=not progress, desc="bits/dim", unit="batch"):
            chunk = images[start:start + batch_size].to(param.device)
            y = None if labels is None else labels[start:start + batch_size].to(param.device)
            if codes:
                total += float(model.nll(model(chunk.long(), y), chunk.long()).double().sum())
                continue
            # The likelihood is taken at the exact grid values; bf16 would round them off the grid.
            x = to_model_input(chunk, torch.promote_types(param.dtype, torch.float32))
            total += float(model.nll(model(x.to(param.dtype), y), x).double().sum())
    return total
