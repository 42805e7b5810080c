"""`python -m fastpixel.eval`: test bits/dim of a saved model, and where it spends its bits.

    python -m fastpixel.eval --checkpoint runs/mnist --data_set mnist --data_dir data [--json result.json]
    python -m fastpixel.eval --checkpoint mnist --data_set mnist --data_dir data --per_image scores.npy --heatmap heat.png

--per_image writes each image's bits/dim (float64, (N,)), for out-of-distribution scores or
model comparison; --heatmap draws the first --heatmap_images images, each beside its
per-pixel bits (the sub-pixels' -log2 p given everything before them, summed over colours).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from .io.checkpoint import bundled_models, load, write_array, write_atomically
from .io.data import DATASETS, DataError, load_dataset
from .models.families import family_of
from .sampling import bits_per_dim, log_prob
from .usage import Parser, UsageError, check_writable, report, report_stop, stops_raise


def parse_args(argv=None) -> argparse.Namespace:
    return parser().parse_args(argv)


def parser() -> Parser:
    """The command line's options (the tests read them)."""
    p = Parser("python -m fastpixel.eval", __doc__)
    p.add_argument("--checkpoint", required=True,
                   help=f"a bundled model ({', '.join(bundled_models())}), a model file written by fastpixel.save, "
                        "or a training save_dir")
    p.add_argument("--data_set", choices=DATASETS, required=True, help="the data set to score")
    p.add_argument("--data_dir", required=True, help="where the data set lives (downloaded there when missing)")
    p.add_argument("--split", choices=["test", "train"], default="test", help="which split to score")
    p.add_argument("--max_images", type=int, default=None, help="score only the first this many images (default: all)")
    p.add_argument("--batch_size", type=int, default=100, help="images per forward pass")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="auto: CUDA when there is a GPU, else the CPU")
    p.add_argument("--no_download", action="store_true", help="never download missing data")
    p.add_argument("--json", default=None, help="also write the result as JSON here")
    p.add_argument("--per_image", default=None, metavar="FILE.npy",
                   help="also write each image's bits/dim here (float64, one per image)")
    p.add_argument("--heatmap", default=None, metavar="FILE.png",
                   help="also draw the first --heatmap_images images beside their per-pixel bits here")
    p.add_argument("--heatmap_images", type=int, default=8, help="how many images the heat map shows")
    return p


def run(args: argparse.Namespace) -> dict:
    if args.batch_size < 1 or (args.max_images is not None and args.max_images < 1):
        raise ValueError("--batch_size and --max_images must be positive")
    if args.heatmap_images < 1:
        raise ValueError("--heatmap_images must be positive")
    for path, option in ((args.json, "--json"), (args.per_image, "--per_image")):
        if path is not None:
            check_writable(path, option, parents=True)
    if args.heatmap is not None:
        check_writable(args.heatmap, "--heatmap", parents=True, suffix=".png", what="a PNG")
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
    if args.per_image is None and args.heatmap is None:
        bpd = bits_per_dim(model, images, labels, batch_size=args.batch_size, progress=True)
    else:  # one pass gives the maps, the per-image numbers and the mean
        maps = log_prob(model, images, labels, per_pixel=True, batch_size=args.batch_size, progress=True)
        bits = -maps / math.log(2.0)
        bpd = float(bits.mean())
        if args.per_image is not None:
            scores = bits.flatten(1).mean(1).numpy()
            write_array(args.per_image, scores)
        if args.heatmap is not None:
            shown = slice(0, args.heatmap_images)
            per_pixel = bits[shown] if bits.dim() == 3 else bits[shown].sum(1)  # codes maps have no colour axis
            write_atomically(Path(args.heatmap), lambda tmp: _heatmap(images[shown], per_pixel, tmp))
    return {"checkpoint": str(args.checkpoint), "family": family_of(model).name, "data_set": args.data_set, "split": args.split, "images": len(images),
            "bits_per_dim": bpd, "seconds": round(time.perf_counter() - start, 2), "device": str(device)}


def _heatmap(images: torch.Tensor, bits: torch.Tensor, path: str) -> None:
    """Each image beside its per-pixel bits (N, H, W), two columns of pairs, one colour bar in bits."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n, pairs = len(images), 2
    rows = -(-n // pairs)
    fig, axes = plt.subplots(rows, 2 * pairs, figsize=(2 * pairs * 1.6, rows * 1.6 + 0.4), squeeze=False)
    top = float(bits.max())
    for ax in axes.flat:
        ax.axis("off")
    for i in range(n):
        picture, heat = axes[i // pairs, 2 * (i % pairs)], axes[i // pairs, 2 * (i % pairs) + 1]
        image = images[i]
        if image.dim() == 3 and image.shape[0] == 3:
            picture.imshow(image.permute(1, 2, 0).numpy())
        else:
            picture.imshow(image.reshape(image.shape[-2:]).numpy(), cmap="gray", vmin=0, vmax=255)
        shown = heat.imshow(bits[i].numpy(), cmap="inferno", vmin=0, vmax=top)
    fig.colorbar(shown, ax=axes.ravel().tolist(), label="bits per pixel", shrink=0.9)
    fig.savefig(path, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        with stops_raise():
            result = run(args)
            print(f"{args.split} bits/dim: {result['bits_per_dim']:.4f} ({result['images']} images of {args.data_set})")
            if args.json is not None:
                write_atomically(Path(args.json), lambda tmp: Path(tmp).write_text(json.dumps(result, indent=2) + "\n"))
    except (OSError, ValueError, DataError, UsageError) as err:
        return report("python -m fastpixel.eval", err)
    except KeyboardInterrupt as stop:
        return report_stop("python -m fastpixel.eval", stop)
    return 0


if __name__ == "__main__":
    sys.exit(main())
