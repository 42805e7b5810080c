"""`python -m fastpixel.eval`: test bits/dim of a saved model.

    python -m fastpixel.eval --checkpoint runs/mnist --data_set mnist --data_dir data [--json result.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from .io.checkpoint import load, write_atomically
from .io.data import DATASETS, DataError, load_dataset
from .models.families import family_of
from .sampling import bits_per_dim
from .usage import UsageError, check_writable, interrupts_raise, report


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m fastpixel.eval", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="a model file written by fastpixel.save, or a training save_dir")
    p.add_argument("--data_set", choices=DATASETS, required=True)
    p.add_argument("--data_dir", required=True)
    p.add_argument("--split", choices=["test", "train"], default="test")
    p.add_argument("--max_images", type=int, default=None, help="score only the first this many images")
    p.add_argument("--batch_size", type=int, default=100)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--no_download", action="store_true", help="never download missing data")
    p.add_argument("--json", default=None, help="also write the result as JSON here")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> dict:
    if args.batch_size < 1 or (args.max_images is not None and args.max_images < 1):
        raise ValueError("--batch_size and --max_images must be positive")
    if args.json is not None:
        check_writable(args.json, "--json", parents=True)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but no CUDA device is available")
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else ("cpu" if args.device == "auto" else args.device)
    model = load(args.checkpoint, device=device)
    data = load_dataset(args.data_set, args.data_dir, args.split, download=not args.no_download)
    images, labels = data.images[:args.max_images], data.labels
    if model.config.num_classes is None:
        labels = None
    elif labels is None:
        raise ValueError(f"the model is class-conditional but {args.data_set} has no labels")
    else:
        labels = labels[:args.max_images]
    expected = (model.config.channels, *model.config.shape)
    if (images.dtype == torch.int64) != model.config.categorical_inputs:
        raise ValueError(f"the model takes {'maps of codes' if images.dtype != torch.int64 else 'images'}, "
                         f"{args.data_set} holds {'maps of codes' if images.dtype == torch.int64 else 'images'}")
    if tuple(images.shape[1:]) != expected:
        raise ValueError(f"the model takes images of shape {expected}, {args.data_set} has {tuple(images.shape[1:])}")
    start = time.perf_counter()
    bpd = bits_per_dim(model, images, labels, batch_size=args.batch_size, progress=True)
    return {"checkpoint": str(args.checkpoint), "family": family_of(model).name, "data_set": args.data_set, "split": args.split, "images": len(images),
            "bits_per_dim": bpd, "seconds": round(time.perf_counter() - start, 2), "device": str(device)}


def main(argv=None) -> int:
    interrupts_raise()
    args = parse_args(argv)
    try:
        result = run(args)
    except (OSError, ValueError, DataError, UsageError) as err:
        return report("python -m fastpixel.eval", err)
    except KeyboardInterrupt:
        print("python -m fastpixel.eval: interrupted; nothing was written", file=sys.stderr)
        return 130
    print(f"{args.split} bits/dim: {result['bits_per_dim']:.4f} ({result['images']} images of {args.data_set})")
    if args.json is not None:
        write_atomically(Path(args.json), lambda tmp: Path(tmp).write_text(json.dumps(result, indent=2) + "\n"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
