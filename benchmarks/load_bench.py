"""The bundled model's 16 digits on quiet cores and beside busy ones: the draw chooses its
thread count from the cores other programs leave idle (fastpixel/cores.py); the same draw
with torch's full thread count whatever the load shows what that choice saves.

    python benchmarks/load_bench.py [--repeats 5] [--json benchmarks/results/load_cpu.json]

Busy cores run a busy-loop process each beside the draw (one core, then every core; each loop
bounded to the benchmark's life, and stopped by it). Results go to JSON and a Markdown table next to it, with the CPU
named."""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

import fastpixel
from fastpixel import cores

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine_line  # noqa: E402  (the CPU model and its vector extensions)


@contextlib.contextmanager
def busy_cores(count: int, seconds: int = 600):
    """`count` processes spinning, each ended by the benchmark (or by itself after `seconds`)."""
    spin = f"import time\nend = time.time() + {seconds}\nwhile time.time() < end: pass"
    loops = [subprocess.Popen([sys.executable, "-c", spin]) for _ in range(count)]
    time.sleep(0.5)
    try:
        yield
    finally:
        for loop in loops:
            loop.kill()
            loop.wait()


def timed_draws(model, repeats: int) -> list[float]:
    fastpixel.sample(model, 16, seed=0)  # warm: the engine built and loaded
    times = []
    for i in range(repeats):
        start = time.perf_counter()
        fastpixel.sample(model, 16, seed=i)
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    options = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    options.add_argument("--repeats", type=int, default=5)
    options.add_argument("--json", default="benchmarks/results/load_cpu.json")
    args = options.parse_args()
    model = fastpixel.load("mnist")
    threads = torch.get_num_threads()
    cases = {}
    for busy in sorted({0, 1, os.cpu_count()}):
        load = "quiet" if busy == 0 else f"{busy} of {os.cpu_count()} cores busy"
        for policy in ("idle cores", "all threads"):
            with busy_cores(busy), _all_threads() if policy == "all threads" else contextlib.nullcontext():
                cases[f"{load}, {policy}"] = timed_draws(model, args.repeats)
    quiet = statistics.median(cases["quiet, idle cores"])
    rows = [{"case": name, "median_s": statistics.median(t), "min_s": min(t), "max_s": max(t),
             "times_quiet": statistics.median(t) / quiet} for name, t in cases.items()]
    result = {"machine": machine_line(), "torch_threads": threads, "model": "mnist (bundled)", "images": 16,
              "repeats": args.repeats, "cases": rows}
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# 16 digits beside busy cores\n\nMachine: {machine_line()}.\n",
             "| case | median s | min s | max s | × quiet |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {r['case']} | {r['median_s']:.3f} | {r['min_s']:.3f} | {r['max_s']:.3f} | {r['times_quiet']:.1f} |"
              for r in rows]
    Path(args.json).with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


@contextlib.contextmanager
def _all_threads():
    """torch's full thread count whatever the load: the draw as it was before fastpixel/cores.py."""
    real = cores.idle_cores
    cores.idle_cores = lambda: None
    try:
        yield
    finally:
        cores.idle_cores = real


if __name__ == "__main__":
    main()
