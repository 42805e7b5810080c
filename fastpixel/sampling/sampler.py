"""`fastpixel.sample`: draw images from any family, naively (a full forward pass per pixel)
or through its cache (fastpixel/sampling/caches) run by an engine (fastpixel/sampling/engines),
honouring the noise contract (noise.py)."""
from __future__ import annotations

import os
import sys
import warnings
from typing import Iterator, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import extension
from ..backend import ENV_VAR, choose
from ..cores import on_idle_cores
from ..models.config import check_labels
from ..models.families import FAMILIES, family_of
from . import engines
from .likelihood import eval_mode, to_model_input, to_uint8
from .naive import naive_rows
from .budget import DEFAULT_BATCH, check_fits
from .noise import image_noise


def sample(model, n: int, fast: bool = True, seed: int | None = None,
           labels: Sequence[int] | torch.Tensor | None = None, progress: bool = False,
           batch_size: int | None = None, backend: str | None = None, first: int = 0,
           prefix: torch.Tensor | np.ndarray | None = None, keep: int | Sequence[int] | None = None) -> torch.Tensor:
    """Draw n images, uint8 (n, C, H, W) on the CPU, on the model's device and in its dtype;
    a prior over discrete codes (categorical_inputs) returns int64 codes (n, H, W).

    By default (fast=True) the model's cache draws them, about one forward pass per image;
    fast=False runs the naive sampler, a full forward pass per pixel, the reference: with the
    same seed both return the same images (bit for bit in float64; in lower precision the two
    compute the same parameters to rounding, so a draw that lands on a bin edge may differ).
    Class-conditional models take one label per image (default: cycle through the classes
    by image index). batch_size=None draws DEFAULT_BATCH images at a time; a draw that
    cannot fit in memory is a ValueError before any work. seed=None draws a fresh seed.
    `backend` ("torch", "triton", "cext"; None or "auto": $FASTPIXEL_BACKEND, else the fastest here) runs the cached sampler
    (where the automatic choice is Triton and it fails at run time, a warning names the error and the
    PyTorch engine draws the same images; a forced Triton fails loudly); see
    fastpixel.backend (the masked families run "cext" or "torch"). `first` > 0 draws images first .. first+n-1 of the seed's sequence,
    so processes that split the indices together return one draw's images.

    Completion: with `prefix`, uint8 images (n, C, H, W) (int codes (n, H, W) for a prior over
    codes), and `keep`, an int or one per image in 0..H*W, image i keeps its prefix's first
    keep[i] pixels in raster order (whole rows: rows * W) and draws the rest from the model's
    exact conditional distribution, each drawn pixel with the noise it has in an unconditional
    draw: completing a drawn image from its own prefix, with its seed, gives it back. The
    known pixels go through the very steps sampling runs (teacher forcing), so they cost what
    drawing them would. Families with fewer than 256 levels keep the prefix at their levels.
    """
    family = family_of(model).name
    config = model.config
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    if batch_size is None:
        batch_size = min(max(n, 1), DEFAULT_BATCH)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    check_fits(model, n, min(batch_size, n), fast)
    if seed is None:
        seed = int(np.random.SeedSequence().generate_state(1, dtype=np.uint32)[0])
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    if isinstance(first, bool) or not isinstance(first, int) or first < 0:
        raise ValueError(f"first must be a non-negative int, got {first!r}")
    labels = _labels_for(config, n, labels, first)
    param = next(model.parameters())
    known, keep = _prefix_for(model, n, prefix, keep, param.dtype)
    name = resolve_backend(param.device, fast, backend, param.dtype, family)
    if progress:
        print(f"fastpixel: {describe(fast, name, param.device)}", file=sys.stderr)

    codes = config.categorical_inputs
    images = torch.empty((n, config.channels, *config.shape), dtype=torch.int64 if codes else torch.uint8)
    height = config.shape[0]
    with eval_mode(model), torch.no_grad(), tqdm(total=-(-n // batch_size) * height, unit="row",
                                                   disable=not progress, desc="sampling") as bar:
        for start in range(0, n, batch_size):
            stop = min(start + batch_size, n)
            noise = torch.stack([image_noise(config, seed, first + i) for i in range(start, stop)]).to(param.device)
            batch_labels = None if labels is None else labels[start:stop].to(param.device)
            x = torch.zeros((stop - start, config.channels, *config.shape), dtype=torch.int64 if codes else param.dtype,
                            device=param.device)
            batch_known = None if known is None else (known[start:stop].to(param.device), keep[start:stop])
            rows = 0
            try:
                for rows, _ in enumerate(on_idle_cores(_rows(model, fast, name, x, noise, batch_labels, batch_known),
                                                       param.device, name if fast else "naive"), 1):
                    bar.update(1)
            except Exception as err:  # noqa: BLE001  (whatever a GPU path that never ran here may raise)
                if not (name == "triton" and _automatic(backend)):
                    raise
                warnings.warn(f"fastpixel: the Triton engine failed ({type(err).__name__}: {' '.join(str(err).split())[:300]}); "
                              "drawing with the PyTorch engine instead (same images; --backend triton shows the error)",
                              RuntimeWarning, stacklevel=2)
                name = "torch"
                bar.update(-rows)
                x.zero_()
                for _ in _rows(model, fast, name, x, noise, batch_labels, batch_known):
                    bar.update(1)
            images[start:stop] = x.cpu() if codes else to_uint8(x).cpu()
    return images[:, 0] if codes else images


def _automatic(requested: str | None) -> bool:
    """Whether the backend was the automatic choice (so a Triton failure may fall back)."""
    return (requested or os.environ.get(ENV_VAR) or "auto") == "auto"


def _rows(model, fast: bool, backend: str, x: torch.Tensor, noise: torch.Tensor, labels,
          known: tuple[torch.Tensor, torch.Tensor] | None) -> Iterator[int]:
    """The sampler that fills the canvas x in place, yielding after each row; `known` is
    (prefix canvas, keep) or None."""
    prefix, keep = (None, None) if known is None else known
    if not fast:
        return naive_rows(model, x, noise, labels, prefix, keep)
    return engines.cached_rows(model, x, noise, labels, engine=backend, prefix=prefix, keep=keep)


def resolve_backend(device: torch.device | str, fast: bool, requested: str | None = None,
                    dtype: torch.dtype | None = None, family: str = "pixelcnnpp") -> str:
    """The backend that sample(fast=fast, backend=requested) runs on `device` for a model of
    `dtype` and `family` (fastpixel.backend.choose). Raises a ValueError (a
    fastpixel.backend.BackendError when it cannot run here) before any work. An engine with
    no steps for the family's cache (Triton has none for the masked families) is refused
    when forced, and where the automatic choice would take it, the family takes "torch"."""
    if requested == "auto":
        requested = None
    if fast:
        forced = requested or os.environ.get(ENV_VAR)
        if forced in engines.ENGINES and not engines.runs(forced, family):
            served = " and ".join(f.title for f in FAMILIES.values() if engines.runs(forced, f.name))
            able = " or ".join(f"'{name}'" for name in engines.ENGINES if engines.runs(name, family))
            raise ValueError(f"backend {forced!r} serves {served} models only: the {family} family samples with "
                             f"backend {able}")
        name = choose(device, requested, dtype)  # also checks a backend forced by $FASTPIXEL_BACKEND
        return name if engines.runs(name, family) else "torch"
    if requested not in (None, "torch"):
        raise ValueError(f"backend {requested!r} applies to the cached sampler only (the default; not fast=False "
                         "or --naive): the naive sampler runs plain PyTorch layers")
    if requested is None and os.environ.get(ENV_VAR):
        choose(device, None, dtype)  # a bad $FASTPIXEL_BACKEND is an error here too
    return "torch"


def describe(fast: bool, backend: str, device: torch.device | str) -> str:
    """Which sampler and backend a draw runs, in words (the progress line, the CLI's summary)."""
    if fast:
        alone = backend == "cext" and not extension.threaded()
        return f"cached sampling, {backend} backend{' (one thread: built without OpenMP)' if alone else ''}, on {device}"
    return f"naive sampling (a full forward pass per pixel), {backend}, on {device}"


def _prefix_for(model, n: int, prefix, keep, dtype: torch.dtype) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The prefix as the sampler's canvas (grid values in `dtype`, or int64 codes (n, 1, H, W))
    and keep as (n,) int64, once both are checked; (None, None) without a prefix."""
    config = model.config
    if prefix is None or keep is None:
        if prefix is not None or keep is not None:
            raise ValueError("completion needs both prefix= (the known images) and keep= (how many pixels of each "
                             "to keep, in raster order)")
        return None, None
    height, width = config.shape
    if isinstance(prefix, np.ndarray):
        prefix = torch.from_numpy(prefix)
    if config.categorical_inputs:
        expected = f"integer codes ({n}, {height}, {width}) in 0..{config.color_levels - 1}"
        if (not isinstance(prefix, torch.Tensor) or prefix.is_floating_point() or prefix.is_complex()
                or prefix.dtype == torch.bool or tuple(prefix.shape) != (n, height, width)):
            raise ValueError(f"prefix must hold {expected}, got {_described(prefix)}")
        if prefix.numel() and (int(prefix.min()) < 0 or int(prefix.max()) >= config.color_levels):
            raise ValueError(f"prefix must hold {expected}, got codes from {int(prefix.min())} to {int(prefix.max())}")
        canvas = prefix[:, None].long()
    else:
        expected = (n, config.channels, height, width)
        if not isinstance(prefix, torch.Tensor) or prefix.dtype != torch.uint8 or tuple(prefix.shape) != expected:
            raise ValueError(f"prefix must be uint8 images of shape {expected}, got {_described(prefix)}")
        canvas = to_model_input(prefix, dtype)
        if hasattr(model, "levels"):  # a family with its own levels keeps the prefix at them
            canvas = model.canvas_values(model.levels(canvas), dtype)
    keep = torch.as_tensor(keep)
    if keep.dim() == 0:
        keep = keep.expand(n)
    if keep.is_floating_point() or keep.dtype == torch.bool or keep.shape != (n,):
        raise ValueError(f"keep must be an int or {n} ints (one per image), got {_described(keep)}")
    if n and (int(keep.min()) < 0 or int(keep.max()) > height * width):
        raise ValueError(f"keep must lie in 0..{height * width} (pixels of a {height}x{width} image, raster order), "
                         f"got values from {int(keep.min())} to {int(keep.max())}")
    return canvas, keep.long()


def _described(value) -> str:
    return f"{value.dtype} of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__


def _labels_for(config, n: int, labels, first: int) -> torch.Tensor | None:
    if labels is None:  # by global image index, so a process's slice gets the labels of a one-process draw
        return None if config.num_classes is None else torch.arange(first, first + n) % config.num_classes
    labels = torch.as_tensor(labels)
    if labels.dim() == 0:
        labels = labels.expand(n)
    check_labels(config, labels, n)
    return labels.long()
