"""fastpixel's codec against PNG, WebP lossless, lzma and bz2, on the MNIST and Fashion-MNIST
test sets, all measured in one run; and which encoder/decoder pairs agree bit for bit.

    python benchmarks/codec_table.py --data_dir DATA                 # the full test sets (minutes)
    python benchmarks/codec_table.py --data_dir DATA --images 500    # a quick look

Sizes are bits per sub-pixel of everything stored (headers, offsets, digests included). PNG
and WebP code each image alone (optimised PNG; WebP lossless at its slowest, best setting);
lzma and bz2 code the whole set's raw bytes at once. fastpixel's round trip is checked
image for image; its decode time is set beside an estimate of the naive decoder's (one
forward pass per sub-pixel: one pass timed, times H * W).
"""
from __future__ import annotations

import argparse
import bz2
import io
import json
import lzma
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from PIL import Image

import fastpixel
from fastpixel.io.data import load_dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine_line  # noqa: E402  (one description of the machine for every script)

RESULTS = Path(__file__).resolve().parent / "results"
SETS = {"mnist": "mnist", "fashion_mnist": "fashion-mnist"}  # data set: the bundled model trained on it


def per_image_bits(images: torch.Tensor, save) -> int:
    total = 0
    for image in images:
        buffer = io.BytesIO()
        save(Image.fromarray(image[0].numpy()), buffer)
        total += 8 * len(buffer.getvalue())
    return total


def naive_decode_estimate(model, images: torch.Tensor, batch: int) -> float:
    """Seconds the naive decoder would take: a forward pass per sub-pixel, per batch."""
    device = next(model.parameters()).device
    x = (images[:batch].float() / 127.5 - 1).to(device)
    with torch.no_grad():
        model(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        model(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        one = time.perf_counter() - start
    passes = math.prod(model.config.shape) * model.config.channels
    return one * passes * math.ceil(len(images) / batch)


def exact_pairs(model, images: torch.Tensor) -> dict[str, bool]:
    """Which decoders reproduce the encoder's probabilities bit for bit (a decode that returns
    is exact: a digest guards every batch)."""
    data = fastpixel.encode(model, images, batch_size=16, backend="cext")

    def decodes(**kwargs) -> bool:
        try:
            return torch.equal(fastpixel.decode(model, data, **kwargs), images)
        except fastpixel.sampling.codec.CodecError:
            return False

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    one_thread = decodes()
    torch.set_num_threads(threads)
    pairs = {f"cext {threads} threads -> cext 1 thread": one_thread,
             "cext -> torch": decodes(backend="torch")}
    data_torch = fastpixel.encode(model, images, batch_size=16, backend="torch")
    torch.set_num_threads(1)
    try:
        pairs[f"torch {threads} threads -> torch 1 thread"] = torch.equal(fastpixel.decode(model, data_torch), images)
    except fastpixel.sampling.codec.CodecError:
        pairs[f"torch {threads} threads -> torch 1 thread"] = False
    torch.set_num_threads(threads)
    pairs["cext -march=native -> cext -march=x86-64-v3"] = _decodes_with_other_build(data, images)
    return pairs


def _decodes_with_other_build(data: bytes, images: torch.Tensor) -> bool:
    """Decode in a fresh process whose C++ engine is built for x86-64-v3 (AVX2) instead of this CPU."""
    code = ("import sys, torch, fastpixel; "
            "data = sys.stdin.buffer.read(); m = fastpixel.load('mnist'); "
            "images = fastpixel.decode(m, data); sys.stdout.buffer.write(images.numpy().tobytes())")
    result = subprocess.run([sys.executable, "-c", code], input=data, capture_output=True, timeout=1200,
                            env={**os.environ, "FASTPIXEL_CPU_ARCH": "x86-64-v3"})
    return result.returncode == 0 and result.stdout == images.numpy().tobytes()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data_dir", default="data")
    parser.add_argument("--images", type=int, default=10_000, help="the first this many test images of each set")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--out", default=str(RESULTS / "codec_cpu"), help="JSON and Markdown, without suffix")
    parser.add_argument("--device", default="cpu", help="where the models run (cuda: the Triton engine)")
    parser.add_argument("--conditions", default="a quiet machine",
                        help="what else ran meanwhile, for the record (e.g. a training at the lowest priority)")
    args = parser.parse_args(argv)
    rows = []
    for name, model_name in SETS.items():
        images = load_dataset(name, args.data_dir, "test", download=False).images[:args.images]
        model = fastpixel.load(model_name, device=args.device)
        dims = images.numel()
        raw = images.numpy().tobytes()
        row = dict(data_set=name, model=model_name, images=len(images),
                   png=per_image_bits(images, lambda im, f: im.save(f, format="PNG", optimize=True)) / dims,
                   webp=per_image_bits(images, lambda im, f: im.save(f, format="WEBP", lossless=True, quality=100,
                                                                       method=6)) / dims,
                   lzma=8 * len(lzma.compress(raw, preset=9 | lzma.PRESET_EXTREME)) / dims,
                   bz2=8 * len(bz2.compress(raw, 9)) / dims,
                   model_bpd=-float(fastpixel.log_prob(model, images).sum()) / (dims * math.log(2)))
        start = time.perf_counter()
        data = fastpixel.encode(model, images, batch_size=args.batch_size, progress=True)
        row["encode_s"] = time.perf_counter() - start
        start = time.perf_counter()
        decoded = fastpixel.decode(model, data, progress=True)
        row["decode_s"] = time.perf_counter() - start
        row["round_trip_exact"] = torch.equal(decoded, images)
        row["fastpixel"] = 8 * len(data) / dims
        row["naive_decode_estimate_s"] = naive_decode_estimate(model, images, args.batch_size)
        rows.append(row)
        print(json.dumps(row), flush=True)
    pairs = exact_pairs(fastpixel.load("mnist"), load_dataset("mnist", args.data_dir, "test", download=False).images[:32])
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else machine_line()
    result = dict(machine=device, conditions=args.conditions, batch_size=args.batch_size, rows=rows, exact_pairs=pairs)
    Path(args.out + ".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["# fastpixel's codec against PNG, WebP, lzma and bz2 (bits per sub-pixel, everything stored)", "",
             f"Machine: {result['machine']}. `benchmarks/codec_table.py`, batches of {args.batch_size}; the bundled "
             f"models; {args.conditions}.", "",
             "| test set | images | PNG (per image) | WebP lossless (per image) | bz2 (whole set) | lzma (whole set) | "
             "fastpixel | model bits/dim | round trip | encode | decode | naive decode (estimated) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['data_set']} (`{r['model']}`) | {r['images']:,} | {r['png']:.3f} | {r['webp']:.3f} | "
                     f"{r['bz2']:.3f} | {r['lzma']:.3f} | **{r['fastpixel']:.3f}** | {r['model_bpd']:.3f} | "
                     f"{'exact' if r['round_trip_exact'] else 'FAILED'} | {r['encode_s']:.0f} s | {r['decode_s']:.0f} s | "
                     f"{r['naive_decode_estimate_s'] / 3600:.1f} h |")
    lines += ["", "Encoder → decoder pairs (32 MNIST test images, `mnist`): a decode either reproduces every image "
              "or is refused; which reproduce them:", ""]
    lines += [f"- {pair}: {'bit-exact' if ok else 'refused (the arithmetic differs)'}" for pair, ok in pairs.items()]
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
