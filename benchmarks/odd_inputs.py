"""Detecting odd inputs by likelihood: each bundled model scores its own test set and the
other's, per image, in bits/dim (`fastpixel.log_prob`); the AUROC says how well "higher
bits/dim than the model's own data" separates the two. Also with the input-complexity
correction of Serrà et al. (ICLR 2020): the score minus the image's PNG size in bits/dim.

    python benchmarks/odd_inputs.py --data_dir DATA      # writes benchmarks/results/odd_inputs.{json,md}
"""
from __future__ import annotations

import argparse
import io
import json
import math
from pathlib import Path

import torch
from PIL import Image

import fastpixel
from fastpixel.io.data import load_dataset
from machine import machine_line

RESULTS = Path(__file__).resolve().parent / "results"
MODELS = {"mnist": "mnist", "fashion-mnist": "fashion_mnist"}  # bundled model: the data set it was trained on


def png_bits_per_dim(images: torch.Tensor) -> torch.Tensor:
    """Each image's size as an optimised PNG, in bits per sub-pixel: a generic measure of its complexity."""
    sizes = []
    for image in images:
        buffer = io.BytesIO()
        Image.fromarray(image[0].numpy()).save(buffer, format="PNG", optimize=True)
        sizes.append(8 * len(buffer.getvalue()) / image.numel())
    return torch.tensor(sizes, dtype=torch.float64)


def auroc(inside: torch.Tensor, outside: torch.Tensor) -> float:
    """P(an outside image scores higher than an inside one), ties counting half."""
    inside, outside = inside[:, None], outside[None, :]
    return float(((outside > inside).double() + 0.5 * (outside == inside).double()).mean())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data_dir", default="data")
    parser.add_argument("--images", type=int, default=1000, help="the first this many test images of each set")
    parser.add_argument("--out", default=str(RESULTS / "odd_inputs"))
    args = parser.parse_args(argv)
    data = {name: load_dataset(name, args.data_dir, "test", download=False).images[:args.images]
            for name in MODELS.values()}
    png = {name: png_bits_per_dim(images) for name, images in data.items()}
    rows = []
    for model_name, home in MODELS.items():
        model = fastpixel.load(model_name)
        bpd = {name: -fastpixel.log_prob(model, images) / (images[0].numel() * math.log(2)) for name, images in data.items()}
        for other in (name for name in data if name != home):
            rows.append(dict(model=model_name, own=home, other=other, own_bpd=float(bpd[home].mean()),
                             other_bpd=float(bpd[other].mean()), auroc=auroc(bpd[home], bpd[other]),
                             auroc_complexity_corrected=auroc(bpd[home] - png[home], bpd[other] - png[other])))
    result = dict(images=args.images, png_bpd={k: float(v.mean()) for k, v in png.items()}, rows=rows)
    Path(args.out + ".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# Detecting odd inputs by likelihood (first {args.images} test images of each set)", "",
             "`benchmarks/odd_inputs.py`; scores are per-image bits/dim of the bundled models (`fastpixel.log_prob`); "
             f"the results do not depend on the machine's speed (float32; run on {machine_line()}).", "",
             "| model | own test set (bits/dim) | other test set (bits/dim) | AUROC, bits/dim | AUROC, bits/dim − PNG bits/dim |",
             "|---|---:|---:|---:|---:|"]
    lines += [f"| `{r['model']}` | {r['own']}: {r['own_bpd']:.3f} | {r['other']}: {r['other_bpd']:.3f} | {r['auroc']:.3f} | "
              f"{r['auroc_complexity_corrected']:.3f} |" for r in rows]
    lines += ["", "PNG bits/dim (optimised, per image, mean): " +
              ", ".join(f"{k} {v:.3f}" for k, v in result["png_bpd"].items())]
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
