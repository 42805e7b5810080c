"""Where the cached sampler's time goes: torch.profiler over one cached sampling run,
operators grouped by the kind of work they do, written as Markdown.

    python benchmarks/profile_cached.py --model mnist --batch 16 --out benchmarks/results/profile_cpu.md
    python benchmarks/profile_cached.py --backend cext --out benchmarks/results/profile_cext.md

With the C++ engine (`--backend cext`) the pixel steps run outside PyTorch's operators: the
profiler sees the row work alone, and the rest of the wall time is the engine (and Python).
"""
from __future__ import annotations

import argparse
import platform
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

import fastpixel

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


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="mnist")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--backend", choices=["torch", "cext"], default="torch")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/profile_cpu.md"))
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    model = fastpixel.PixelCNNpp(MODELS[args.model]).eval()
    run = dict(fast=True, seed=0, backend=args.backend)
    fastpixel.sample(model, args.batch, **run)  # warm up
    start = time.perf_counter()
    fastpixel.sample(model, args.batch, **run)
    wall = time.perf_counter() - start
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fastpixel.sample(model, args.batch, **run)
    events = prof.key_averages()
    kinds, calls = defaultdict(float), defaultdict(int)
    for e in events:
        kind = KINDS.get(e.key, "other operators (views, indexing, dispatch)")
        kinds[kind] += e.self_cpu_time_total / 1e6
        calls[kind] += e.count
    total = sum(kinds.values())
    lines = [f"# Cached sampling profile: {args.model}-size model, batch {args.batch}, {args.backend} backend", "",
             f"Machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
             f"torch {torch.__version__}. Wall time without the profiler: {wall:.2f} s; "
             f"operator time under the profiler: {total:.2f} s.", "",
             "| kind of work | seconds | share of operator time | calls |", "|---|---:|---:|---:|"]
    for kind, seconds in sorted(kinds.items(), key=lambda kv: -kv[1]):
        lines.append(f"| {kind} | {seconds:.3f} | {100 * seconds / total:.0f}% | {calls[kind]:,} |")
    lines += ["", "Top operators by self time:", "", "```",
              events.table(sort_by="self_cpu_time_total", row_limit=15), "```", ""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
