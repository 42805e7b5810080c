"""`python -m fastpixel.sample`: draw images from a saved model (any family) into a PNG grid,
through the model's cache (`--naive`: a full forward pass per pixel, same images, far slower).

    python -m fastpixel.sample                      # 16 digits from the bundled mnist model
    python -m fastpixel.sample --checkpoint run/model.safetensors -n 16 --seed 0
    torchrun --standalone --nproc_per_node 4 -m fastpixel.sample -n 1024 --npy grid.npy
    python -m fastpixel.sample --complete mnist:test:0-7 --keep_rows 14 -n 6 --data_dir data

With `--complete SOURCE` (a .npy array, a .png picture or a folder of them, or
DATASET:SPLIT:FIRST-LAST indices into --data_dir) each source image keeps its first
`--keep_rows` rows and `-n` completions are drawn for it from the model's exact conditional
distribution; the grid shows, per source image, the original, the occluded input (the rows
to draw in grey) and the completions. Class-conditional models complete a data set's
images with their true labels unless --label says otherwise.

Under `torchrun` each process draws a contiguous share of the image indices; since image i
depends only on (seed, i), rank 0 gathers the shares into the very images one process
would draw, and alone writes and prints. Bad input (a missing or corrupt checkpoint, a
label out of range, n <= 0, an output path that cannot be written, a backend that cannot
run) ends with a one-line error and exit code 2 on every rank, before any sampling and
without leaving a partial file.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Callable, TypeVar

import torch
import torch.distributed as dist

from . import sampling
from .backend import NAMES
from .io.checkpoint import bundled_models, load, write_array, written_together
from .io.grid import class_columns, save_grid
from .io.sources import SourceError, read_source
from .models.families import family_of
from .usage import (Parser, UsageError, check_writable, is_special_file, leave_process_group, report, report_stop,
                    stop_code, stops_raise)

PROGRAM = "python -m fastpixel.sample"
_T = TypeVar("_T")


def parse_args(argv=None) -> argparse.Namespace:
    args = parser().parse_args(argv)
    args.fast = not args.naive
    return args


def parser() -> Parser:
    """The command line's options (the tests read them)."""
    options = Parser(PROGRAM, __doc__)
    how = options.add_mutually_exclusive_group()
    how.add_argument("--naive", action="store_true",
                     help="the naive sampler, a full forward pass per pixel: the reference, hundreds of times slower "
                          "(same images)")
    how.add_argument("--fast", action="store_true",
                     help="the cached sampler: the default, accepted so that older commands still run")
    options.add_argument("--checkpoint", default="mnist",
                         help=f"a bundled model ({', '.join(bundled_models())}), a file written by fastpixel.save, "
                              "or a training save_dir")
    options.add_argument("-n", "--num_samples", type=int, default=16,
                         help="how many images, or with --complete completions per source image")
    options.add_argument("--batch_size", type=int, default=None,
                         help=f"images per batch and process (default: up to {sampling.DEFAULT_BATCH})")
    options.add_argument("--seed", type=int, default=0, help="image i depends only on (seed, i)")
    options.add_argument("--label", type=int, default=None,
                         help="class of every image, for class-conditional models (default: cycle through the classes)")
    options.add_argument("--out", default="samples.png", help="PNG grid to write")
    options.add_argument("--npy", default=None,
                         help="also save the raw uint8 array (N, C, H, W) here (code maps: int64 (N, H, W), only here)")
    options.add_argument("--complete", default=None, metavar="SOURCE",
                         help="complete these images instead of drawing from scratch: a .npy array (uint8 (N, C, H, W) "
                              "or (N, H, W)), a .png picture or a folder of them, or DATASET:SPLIT:FIRST-LAST (e.g. "
                              "mnist:test:0-7) read from --data_dir")
    options.add_argument("--keep_rows", type=int, default=None,
                         help="with --complete: the rows of each source image kept; the rest are drawn")
    options.add_argument("--data_dir", default="data", help="where --complete finds DATASET:SPLIT:FIRST-LAST")
    options.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                         help="auto: CUDA when there is a GPU, else the CPU")
    options.add_argument("--backend", choices=["auto", *NAMES], default="auto",
                         help="who runs the cached sampler's steps (auto: $FASTPIXEL_BACKEND, else the fastest here)")
    return options


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for, but no CUDA device is available")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device("cuda", local_rank) if name == "cuda" else torch.device(name)


def prepare(args: argparse.Namespace, device: torch.device, writer: bool, world: int) -> tuple[torch.nn.Module, str, int]:
    """Check everything the draw needs and load the model (and, with --complete, the source
    images into args.source); return the model, the backend that will run and every rank's
    largest batch."""
    if args.num_samples <= 0:
        raise UsageError(f"-n/--num_samples must be positive, got {args.num_samples}")
    if args.batch_size is not None and args.batch_size <= 0:
        raise UsageError(f"--batch_size must be positive, got {args.batch_size}")
    if args.seed < 0:
        raise UsageError(f"--seed must be non-negative, got {args.seed}")
    if writer:
        check_writable(args.out, "--out", suffix=".png", what="a PNG grid")
        if args.npy is not None:
            check_writable(args.npy, "--npy")
    try:
        model = load(args.checkpoint, device=device)
    except (OSError, ValueError) as err:
        raise UsageError(str(err)) from None
    if _codes(model) and args.npy is None:
        raise UsageError("this model draws maps of discrete codes, not images: pass --npy FILE to save them")
    same_file = args.npy is not None and os.path.realpath(args.npy) == os.path.realpath(args.out)
    if writer and same_file and not _codes(model) and not is_special_file(args.out):
        raise UsageError(f"--out and --npy both name {args.out}: the array would overwrite the grid")
    num_classes = model.config.num_classes
    if args.label is not None and num_classes is None:
        raise UsageError("--label was given, but this model is not class-conditional")
    if args.label is not None and not 0 <= args.label < num_classes:
        raise UsageError(f"--label must lie in 0..{num_classes - 1}, got {args.label}")
    if args.complete is not None:
        args.source = _completion_source(args, model)
    elif args.keep_rows is not None:
        raise UsageError("--keep_rows applies to --complete SOURCE")
    batch = max(1, min(args.batch_size or sampling.DEFAULT_BATCH, -(-_total(args) // world)))
    try:  # the images, their gathered copy under torchrun and the grid
        sampling.check_fits(model, _total(args), batch, args.fast, copies=3)
        backend = sampling.resolve_backend(device, args.fast, _requested_backend(args), next(model.parameters()).dtype,
                                           family_of(model).name)
    except ValueError as err:  # also a backend forced by $FASTPIXEL_BACKEND
        raise UsageError(str(err)) from None
    return model, backend, batch


def run(args: argparse.Namespace, device: torch.device, rank: int = 0, world: int = 1) -> str | None:
    """Draw this rank's share of the images; on rank 0, gather all, write them and return the summary."""
    args.source = None
    model, backend, batch = _on_every_rank(world, lambda: prepare(args, device, writer=rank == 0, world=world))
    n = _total(args)
    # Rounding the bounds up gives rank 0, whose progress bar is shown, the largest share.
    first, stop = -(-rank * n // world), -(-(rank + 1) * n // world)
    start = time.perf_counter()
    completion = {}
    labels = args.label
    if args.source is not None:  # completion j of source image s is image s * per_source + j
        per_source = args.num_samples
        completion = dict(prefix=args.source.images.repeat_interleave(per_source, 0)[first:stop],
                          keep=args.keep_rows * model.config.shape[1])
        if labels is None and args.source.labels is not None and model.config.num_classes is not None:
            labels = args.source.labels.repeat_interleave(per_source, 0)[first:stop]
    images = sampling.sample(model, stop - first, fast=args.fast, seed=args.seed, labels=labels,
                             progress=rank == 0, batch_size=batch, backend=backend if args.fast else None,
                             first=first, **completion)
    if world > 1:
        shares = [None] * world if rank == 0 else None
        dist.gather_object(images, shares, dst=0)
        if rank != 0:
            return None
        images = torch.cat(shares)
    seconds = time.perf_counter() - start
    written = args.npy if _codes(model) else args.out
    try:
        with written_together():  # the grid and the array, or neither
            if not _codes(model) and args.source is not None:
                grid, columns = _completion_grid(args.source.images, images, args.keep_rows)
                save_grid(grid, args.out, columns)
            elif not _codes(model):
                cycled = args.label is None  # the default labels cycle through the classes
                save_grid(images, args.out, class_columns(n, model.config.num_classes) if cycled else None)
            if args.npy is not None:
                write_array(args.npy, images.numpy())
    except OSError as err:  # a full disk, /dev/full
        outputs = [p for p in (None if _codes(model) else args.out, args.npy) if p is not None]
        why = err.strerror or f"{err} (a short write: is the disk full?)"  # NumPy's short writes carry no errno
        raise UsageError(f"cannot write {' and '.join(outputs)}: {why}; nothing was written") from None
    processes = f", {world} processes" if world > 1 else ""
    what = f"{n} {'code maps' if _codes(model) else 'images'}"
    if args.source is not None:
        what = (f"{args.num_samples} completions of each of {len(args.source.images)} {'maps' if _codes(model) else 'images'} "
                f"(first {args.keep_rows} rows kept)")
    return (f"wrote {written}: {what} in {seconds:.2f} s "
            f"({n / seconds:.2f} images/s; {sampling.describe(args.fast, backend, device)}{processes})")


def _total(args: argparse.Namespace) -> int:
    """Images drawn: -n, or -n completions of each source image."""
    return args.num_samples * (1 if args.source is None else len(args.source.images))


def _completion_source(args: argparse.Namespace, model):
    """The --complete images, checked against the model and --keep_rows."""
    try:
        source = read_source(args.complete, args.data_dir)
    except (SourceError, OSError, ValueError) as err:  # a DataError too
        raise UsageError(f"--complete {err}") from None
    config = model.config
    height = config.shape[0]
    expected = tuple(config.shape) if _codes(model) else (config.channels, *config.shape)
    if tuple(source.images.shape[1:]) != expected:
        raise UsageError(f"--complete {args.complete}: its images have shape {tuple(source.images.shape[1:])}, and "
                         f"this model's have {expected}")
    if args.keep_rows is None or not 0 <= args.keep_rows <= height:
        raise UsageError(f"--complete needs --keep_rows in 0..{height} (the rows of each image to keep)")
    return source


def _completion_grid(sources: torch.Tensor, completions: torch.Tensor, keep_rows: int) -> tuple[torch.Tensor, int]:
    """Per source image a row: the original, the occluded input (the rows to draw in grey),
    then its completions; and the grid's column count."""
    per_source = len(completions) // len(sources)
    occluded = sources.clone()
    occluded[:, :, keep_rows:] = 128
    rows = [torch.cat([sources[s:s + 1], occluded[s:s + 1], completions[s * per_source:(s + 1) * per_source]])
            for s in range(len(sources))]
    return torch.cat(rows), per_source + 2


def _codes(model) -> bool:
    return model.config.categorical_inputs


def _requested_backend(args: argparse.Namespace) -> str | None:
    return None if args.backend == "auto" else args.backend


def _on_every_rank(world: int, check: Callable[[], _T]) -> _T:
    """Run `check` on every rank and fail on all of them if it fails on any (with the lowest
    failing rank's message), so that no rank waits forever for one that gave up."""
    try:
        result, error = check(), None
    except UsageError as err:
        result, error = None, str(err)
    if world > 1:
        errors = [None] * world
        dist.all_gather_object(errors, error)
        error = next((e for e in errors if e is not None), None)
    if error is not None:
        raise UsageError(error)
    return result


def main(argv=None) -> int:
    # As torchrun sets them; one process without it, on the same code path.
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    with stops_raise():
        code = _draw(parse_args(argv), rank, world)
    if world > 1:
        leave_process_group(code)
    return code


def _draw(args: argparse.Namespace, rank: int, world: int) -> int:
    """Draw and write; the exit code."""
    try:
        device = pick_device(args.device, int(os.environ.get("LOCAL_RANK", "0")))
        if world > 1:
            if device.type == "cuda":
                torch.cuda.set_device(device)  # NCCL's collectives run on the current device
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        summary = run(args, device, rank, world)
    except UsageError as err:
        return report(PROGRAM, err) if rank == 0 else 2
    except KeyboardInterrupt as stop:
        return report_stop(PROGRAM, stop) if rank == 0 else stop_code(stop)
    if summary is not None:
        print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
