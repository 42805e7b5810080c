"""`python -m fastpixel.sample`: draw images from a saved model into a PNG grid.

    python -m fastpixel.sample --fast --checkpoint run/model.safetensors -n 16 --seed 0

Bad input (a missing or corrupt checkpoint, a label out of range, n <= 0, an output path
that cannot be written) ends with a one-line error and exit code 2, before any sampling
and without leaving a partial file.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np
import torch

from . import sampling
from .checkpoint import load, write_atomically
from .grid import save_grid
from .usage import UsageError, report


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m fastpixel.sample", description=__doc__.split("\n")[0])
    parser.add_argument("--fast", action="store_true", help="use the cached sampler (same images as without, much faster)")
    parser.add_argument("--checkpoint", default="mnist",
                        help="a bundled model's name (default: mnist), a file written by fastpixel.save, or a training save_dir")
    parser.add_argument("-n", "--num-samples", type=int, default=16, help="how many images (default 16)")
    parser.add_argument("--batch-size", type=int, default=None, help="images per batch (default: all at once)")
    parser.add_argument("--seed", type=int, default=0, help="image i depends only on (seed, i) (default 0)")
    parser.add_argument("--label", type=int, default=None,
                        help="class of every image, for class-conditional models (default: cycle through the classes)")
    parser.add_argument("--out", default="samples.png", help="PNG grid to write (default samples.png)")
    parser.add_argument("--npy", default=None, help="also save the raw uint8 array (N, C, H, W) here")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    return parser.parse_args(argv)


def check_writable(path: Path) -> None:
    directory = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise UsageError(f"output path {path} is a directory")
    if not directory.is_dir():
        raise UsageError(f"cannot write {path}: directory {directory} does not exist")
    try:
        tempfile.TemporaryFile(dir=directory).close()
    except OSError as err:
        raise UsageError(f"cannot write {path}: {err.strerror}") from None


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for, but no CUDA device is available")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def run(args: argparse.Namespace) -> str:
    if args.num_samples <= 0:
        raise UsageError(f"-n/--num-samples must be positive, got {args.num_samples}")
    if args.batch_size is not None and args.batch_size <= 0:
        raise UsageError(f"--batch-size must be positive, got {args.batch_size}")
    if args.seed < 0:
        raise UsageError(f"--seed must be non-negative, got {args.seed}")
    outputs = [Path(args.out)] + ([Path(args.npy)] if args.npy else [])
    for path in outputs:
        check_writable(path)
    device = pick_device(args.device)
    try:
        model = load(args.checkpoint, device=device)
    except (OSError, ValueError) as err:
        raise UsageError(str(err)) from None
    num_classes = model.config.num_classes
    if args.label is not None and num_classes is None:
        raise UsageError("--label was given, but this model is not class-conditional")
    if args.label is not None and not 0 <= args.label < num_classes:
        raise UsageError(f"--label must lie in 0..{num_classes - 1}, got {args.label}")

    start = time.perf_counter()
    images = sampling.sample(model, args.num_samples, fast=args.fast, seed=args.seed, labels=args.label,
                             progress=True, batch_size=args.batch_size)
    seconds = time.perf_counter() - start
    save_grid(images, args.out)
    if args.npy:
        write_atomically(Path(args.npy), lambda tmp: _save_npy(tmp, images.numpy()))
    kind = "cached" if args.fast else "naive"
    return (f"wrote {args.out}: {args.num_samples} images in {seconds:.2f} s "
            f"({args.num_samples / seconds:.2f} images/s, {kind} sampling on {device})")


def _save_npy(path: str, array: np.ndarray) -> None:
    with open(path, "wb") as f:  # np.save(path) would append ".npy" to a temporary name
        np.save(f, array)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        print(run(args))
    except UsageError as err:
        return report("python -m fastpixel.sample", err)
    except KeyboardInterrupt:
        print("python -m fastpixel.sample: interrupted; nothing was written", file=sys.stderr)
        return 130
    return 0


class _CallableModule(types.ModuleType):
    """Importing this module binds `fastpixel.sample` to it, hiding the function of the same
    name; calling the module calls that function, so `fastpixel.sample(model, n)` still works."""

    def __call__(self, *args, **kwargs):
        return sampling.sample(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

if __name__ == "__main__":
    sys.exit(main())
