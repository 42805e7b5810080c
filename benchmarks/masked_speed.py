"""Cached sampling of the masked families against a forward pass, torch and cext backends.

    OMP_NUM_THREADS=1 python benchmarks/masked_speed.py [--batch 16] [--repeats 3] [--configs gated-mnist ...]

For each configuration: one forward pass of the batch, and `fastpixel.sample(model, batch,
fast=True, seed=0)` per backend, best of `repeats` each, timed side by side in this process;
prints a Markdown table of seconds and of sampling time in forward passes.
"""
from __future__ import annotations

import argparse
import time

import torch

import fastpixel

CONFIGS = {
    "gated-mnist": lambda: fastpixel.GatedPixelCNN(fastpixel.GatedConfig(
        hidden_fmaps=48, hidden_layers=7, hidden_ksize=5, causal_ksize=7, out_hidden_fmaps=64)),
    "pixelcnn-mnist": lambda: fastpixel.PixelCNN(fastpixel.PixelCNNConfig()),
    "gated-rgb32": lambda: fastpixel.GatedPixelCNN(fastpixel.GatedConfig(
        channels=3, image_size=32, hidden_fmaps=48, out_hidden_fmaps=48)),
    "pixelcnn-rgb32": lambda: fastpixel.PixelCNN(fastpixel.PixelCNNConfig(
        channels=3, image_size=32, hidden_fmaps=48, out_hidden_fmaps=48)),
}


def best(run, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--configs", nargs="+", choices=sorted(CONFIGS), default=list(CONFIGS))
    parser.add_argument("--backends", nargs="+", choices=["torch", "cext"], default=["torch", "cext"])
    args = parser.parse_args(argv)
    print(f"{torch.get_num_threads()} thread(s), batch {args.batch}, best of {args.repeats}\n")
    print("| model | forward (s) | " + " | ".join(f"{b} (s) | {b} (forward passes)" for b in args.backends) + " |")
    print("|---|---|" + "---|---|" * len(args.backends))
    for name in args.configs:
        torch.manual_seed(0)
        model = CONFIGS[name]().eval()
        cfg = model.config
        x = torch.randint(0, 256, (args.batch, cfg.channels, *cfg.shape)) / 127.5 - 1
        with torch.no_grad():
            forward = best(lambda: model(x), args.repeats)
        cells = [f"{forward:.3f}"]
        for backend in args.backends:
            seconds = best(lambda: fastpixel.sample(model, args.batch, fast=True, seed=0, backend=backend), args.repeats)
            cells += [f"{seconds:.3f}", f"{seconds / forward:.2f}"]
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
