"""How hard a class-conditional model's labels steer, read two ways (the card of `mnist-cond`
quotes both):

- samples: images drawn for each class in turn, read by a reader that knows nothing of the
  model, the label of the nearest neighbour (Euclidean, on pixels) among the real training
  images. On MNIST that reader is right on 96% of the first 1,000 test digits (printed).
- Bayes reading: real test images classified as argmax over y of p(x | y) (uniform prior).

    python benchmarks/steering.py --checkpoint mnist-cond --data_dir DATA
    python benchmarks/steering.py --checkpoint runs/cond/model.safetensors --data_dir DATA --no-save
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import torch

import fastpixel
from fastpixel.io.data import load_dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine_line  # noqa: E402  (one description of the machine for every script)

RESULTS = Path(__file__).resolve().parent / "results"


def nearest_labels(images: torch.Tensor, train) -> torch.Tensor:
    """The training label of each image's nearest training image."""
    references = train.images.flatten(1).float()
    return torch.cat([train.labels[torch.cdist(chunk.flatten(1).float(), references).argmin(dim=1)]
                      for chunk in images.split(256)])


def bayes_reading(model, images: torch.Tensor) -> torch.Tensor:
    """argmax over y of log p(x | y), one label per image."""
    scores = torch.stack([fastpixel.log_prob(model, images, torch.full((len(images),), y), batch_size=100)
                          for y in range(model.config.num_classes)], dim=1)
    return scores.argmax(dim=1)


def measure(checkpoint: str, data_dir: str, data_set: str, per_class: int, seed: int, test_images: int) -> dict:
    model = fastpixel.load(checkpoint).eval()
    classes = model.config.num_classes
    if classes is None:
        raise SystemExit(f"{checkpoint} is not class-conditional")
    train = load_dataset(data_set, data_dir, "train", download=False)
    test = load_dataset(data_set, data_dir, "test", download=False)
    asked = torch.arange(per_class * classes) % classes
    started = time.perf_counter()
    drawn = fastpixel.sample(model, len(asked), seed=seed, labels=asked)
    draw_s = time.perf_counter() - started
    read = nearest_labels(drawn, train)
    reader = nearest_labels(test.images[:1000], train)
    bayes = bayes_reading(model, test.images[:test_images])
    return {
        "checkpoint": checkpoint, "machine": machine_line(), "seed": seed, "samples": len(asked),
        "samples_read_as_asked": float((read == asked).float().mean()),
        "per_class_read_as_asked": [float((read[asked == y] == y).float().mean()) for y in range(classes)],
        "reader_on_first_1000_test_images": float((reader == test.labels[:1000]).float().mean()),
        "bayes_images": test_images,
        "bayes_reading": float((bayes == test.labels[:test_images]).float().mean()),
        "draw_seconds": draw_s,
    }


def markdown(result: dict) -> str:
    per_class = " | ".join(f"{100 * a:.0f}" for a in result["per_class_read_as_asked"])
    return "\n".join([
        f"# Label steering of `{result['checkpoint']}`", "",
        f"Machine: {result['machine']}", "",
        f"- samples read as the asked class by the nearest training image: **{100 * result['samples_read_as_asked']:.1f}%** "
        f"of {result['samples']} (seed {result['seed']}, classes cycled); the reader is right on "
        f"{100 * result['reader_on_first_1000_test_images']:.1f}% of the first 1,000 test images",
        f"- per class (%): {per_class}",
        f"- Bayes reading, argmax over y of p(x | y), on the first {result['bayes_images']} test images: "
        f"**{100 * result['bayes_reading']:.1f}%**", "",
        "Reproduce: `python benchmarks/steering.py --checkpoint "
        f"{result['checkpoint']} --data_dir DATA --seed {result['seed']}`", ""])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default="mnist-cond")
    p.add_argument("--data_dir", required=True, help="where the data set's files are (nothing is downloaded)")
    p.add_argument("--data_set", default="mnist")
    p.add_argument("--per_class", type=int, default=30, help="samples drawn per class")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--test_images", type=int, default=1000, help="test images the Bayes reading classifies")
    p.add_argument("--no-save", dest="save", action="store_false", help="print only")
    args = p.parse_args()
    result = measure(args.checkpoint, args.data_dir, args.data_set, args.per_class, args.seed, args.test_images)
    print(markdown(result))
    if args.save:
        stem = "steering_" + re.sub(r"[^\w-]", "_", Path(args.checkpoint).stem)
        (RESULTS / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
        (RESULTS / f"{stem}.md").write_text(markdown(result))


if __name__ == "__main__":
    main()
