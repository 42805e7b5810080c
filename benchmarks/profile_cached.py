"""Where the cached sampler's time goes, written as Markdown.

    python benchmarks/profile_cached.py --model mnist --batch 16 --out benchmarks/results/profile_cpu.md
    python benchmarks/profile_cached.py --backend cext --batch 1 16 --out benchmarks/results/profile_cext.md

The PyTorch path (`--backend torch`): torch.profiler over one cached sampling run,
operators grouped by the kind of work they do. The C++ engine (`--backend cext`) runs no
PyTorch operator once built, so its run is timed in its three parts instead: building the
sampler (the cache's buffers, the weights laid out for the engine, the packed ops), the
per-row work and the pixel steps, each beside one forward pass of the same batch.
"""
from __future__ import annotations

import argparse
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

import fastpixel
from fastpixel import sampling
from fastpixel.sampling.caches.pixelcnnpp import CachedNetwork
from fastpixel.sampling.engines.cext import CextSteps
from machine import machine_line

MODELS = {
    "mnist": fastpixel.ModelConfig(image_size=28, channels=1, nr_resnet=3, nr_filters=64, nr_logistic_mix=5),
    "cifar": fastpixel.ModelConfig(image_size=32, channels=3, nr_resnet=5, nr_filters=160, nr_logistic_mix=10),
}
KINDS = {  # operator -> kind of work
    "aten::mkldnn_convolution": "row convolutions (u stream, per-row terms)",
    "aten::addmm": "per-pixel matrix products", "aten::mm": "per-pixel matrix products",
    "aten::bmm": "per-pixel matrix products",
    "aten::elu": "elementwise", "aten::add": "elementwise", "aten::neg": "elementwise", "aten::mul": "elementwise",
    "aten::sigmoid": "elementwise", "aten::log": "elementwise", "aten::exp": "elementwise",
    "aten::clamp": "elementwise", "aten::log1p": "elementwise", "aten::round": "elementwise",
    "aten::div": "elementwise", "aten::sub": "elementwise",
    "aten::copy_": "copies and cache writes", "aten::cat": "copies and cache writes", "aten::fill_": "copies and cache writes",
    "aten::zero_": "copies and cache writes", "aten::contiguous": "copies and cache writes",
}
PARTS = ("building", "rows", "pixels", "total", "forward")


def benchmark_model(name: str) -> fastpixel.PixelCNNpp:
    """A model of MODELS: random weights after data-dependent initialisation (realistic
    activation scales), the same for every run; or "bundled", the shipped MNIST model."""
    if name == "bundled":
        return fastpixel.load("mnist").eval()
    torch.manual_seed(0)
    model = fastpixel.PixelCNNpp(MODELS[name])
    height, width = model.config.shape
    model.data_init(torch.rand(8, model.config.channels, height, width) * 2 - 1)
    return model.eval()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="mnist")
    parser.add_argument("--batch", type=int, nargs="+", default=[16])
    parser.add_argument("--backend", choices=["torch", "cext"], default="torch")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/profile_cpu.md"))
    args = parser.parse_args(argv)

    model = benchmark_model(args.model)
    title = f"# Cached sampling profile: {args.model}-size model, {args.backend} backend"
    machine = f"Machine: {machine_line()}."
    if args.backend == "cext":
        lines = [title, "", machine + " Seconds, the fastest of three runs, each followed by a forward pass "
                 "(`engine_against_forward`).", "",
                 "| batch | building the sampler | rows | pixel steps | total | one forward pass | total in forward passes |",
                 "|---:|---:|---:|---:|---:|---:|---:|"]
        for batch in args.batch:
            t = engine_against_forward(model, batch)
            lines.append(f"| {batch} | " + " | ".join(f"{t[part]:.3f}" for part in PARTS) +
                         f" | {t['total'] / t['forward']:.2f} |")
    else:
        lines = [title, "", machine] + [line for batch in args.batch for line in _operators(model, batch)]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def engine_against_forward(model, batch: int, rounds: int = 3) -> dict:
    """A cached sampling run with the C++ engine (driving the same objects as
    fastpixel.sampling.engines.cached_rows) and a forward pass of the same batch, timed in
    turn `rounds` times after a warm-up round (which builds the engine): the seconds of
    building, rows and pixel steps of the fastest sampling by total, and of the fastest
    forward pass. In turn and in one process, because this project's VMs drift between
    processes and over seconds: the same forward pass took 0.44 to 0.79 s in one afternoon,
    and a ratio of two processes' timings moved by as much.
    """
    cfg = model.config
    noise = torch.stack([sampling.image_noise(cfg, 0, i) for i in range(batch)])
    labels = None if cfg.num_classes is None else torch.arange(batch) % cfg.num_classes
    samplings, forwards = [], []
    with torch.no_grad():
        for _ in range(rounds + 1):
            start = time.perf_counter()
            x = torch.zeros(batch, cfg.channels, *cfg.shape)
            steps = CextSteps(CachedNetwork(model, batch, labels), x, noise)
            built, rows, pixels = time.perf_counter() - start, 0.0, 0.0
            for r in range(cfg.shape[0]):
                start = time.perf_counter()
                steps.start_row(r)
                rows += time.perf_counter() - start
                start = time.perf_counter()
                for c in range(cfg.shape[1]):
                    steps.step(r, c)
                pixels += time.perf_counter() - start
            samplings.append((built, rows, pixels))
            start = time.perf_counter()
            model(torch.zeros(batch, cfg.channels, *cfg.shape))
            forwards.append(time.perf_counter() - start)
    samplings, forwards = samplings[1:], forwards[1:]
    building, rows, pixels = min(samplings, key=sum)
    return dict(building=building, rows=rows, pixels=pixels, total=building + rows + pixels, forward=min(forwards))


def _operators(model, batch: int) -> list[str]:
    """torch.profiler's operators of one cached sampling run with the PyTorch path, by kind."""
    run = dict(fast=True, seed=0, backend="torch")
    fastpixel.sample(model, batch, **run)  # warm up
    start = time.perf_counter()
    fastpixel.sample(model, batch, **run)
    wall = time.perf_counter() - start
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fastpixel.sample(model, batch, **run)
    events = prof.key_averages()
    kinds, calls = defaultdict(float), defaultdict(int)
    for e in events:
        kind = KINDS.get(e.key, "other operators (views, indexing, dispatch)")
        kinds[kind] += e.self_cpu_time_total / 1e6
        calls[kind] += e.count
    total = sum(kinds.values())
    lines = ["", f"## Batch {batch}", "", f"Wall time without the profiler: {wall:.2f} s; "
             f"operator time under the profiler: {total:.2f} s.", "",
             "| kind of work | seconds | share of operator time | calls |", "|---|---:|---:|---:|"]
    for kind, seconds in sorted(kinds.items(), key=lambda kv: -kv[1]):
        lines.append(f"| {kind} | {seconds:.3f} | {100 * seconds / total:.0f}% | {calls[kind]:,} |")
    return lines + ["", "Top operators by self time:", "", "```",
                    events.table(sort_by="self_cpu_time_total", row_limit=15), "```"]


if __name__ == "__main__":
    main()
