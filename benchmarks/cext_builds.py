"""The C++ engine's builds side by side on one machine: the native build and one for
x86-64-v3 (AVX2 and FMA, no AVX-512), each against a forward pass and PyTorch's cached
sampler, with every method's GFLOP/s next to torch.mm's on 2048 x 2048 matrices.

    python benchmarks/cext_builds.py --out benchmarks/results/cpu_cext_builds

Writes OUT.json and OUT.md. The engine is built once per process (FASTPIXEL_CPU_ARCH is
read then), so each build's runs are timed in a process of their own, started for each
model and batch in turn, between the forward pass's and PyTorch's timings of the same case.
The C++ runs are timed in their parts (building the sampler, rows, pixel steps: the
fastest of three runs by total), each run followed by a forward pass in the same process
(`profile_cached.py`'s `engine_against_forward`): the ratio does not compare two processes
on a machine whose speed drifts. GFLOP/s are a forward pass's FLOPs (its convolutions' and
matrix products', torch.utils.flop_counter, at batch 1, times the batch) over each method's
time: the C++ engine's products add up to the same, within 0.2% (counted from their shapes
in a build that logged them: 3.815 against 3.811 GFLOP per image for the MNIST-size model,
48.77 against 48.74 for CIFAR's, 1.539 against 1.537 for the bundled one).

A build for a lesser instruction set is also set against PyTorch held to it: in that
build's process, MKL and oneDNN are told to use no more than AVX2 (MKL_ENABLE_INSTRUCTIONS,
ONEDNN_MAX_CPU_ISA), as on a CPU of that level, and the forward pass and torch.mm are timed
there again: the engine's AVX2 path against PyTorch's, not against PyTorch's AVX-512.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

import fastpixel
from machine import describe_machine, machine_line
from profile_cached import benchmark_model, engine_against_forward

BUILDS = ("native", "x86-64-v3")
# PyTorch's libraries held to a build's instruction set, in the build's process
LIBRARY_ISA = {"x86-64-v3": {"MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}}
BATCHES = (1, 16, 64)


def mm_gflops(size: int = 2048, runs: int = 5) -> float:
    """torch.mm's rate on two size x size float32 matrices, the fastest of `runs`."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = min(_seconds(lambda: a @ b) for _ in range(runs))
    return 2 * size ** 3 / best / 1e9


def _seconds(run) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def forward_flops(net: torch.nn.Module) -> int:
    """FLOPs of the products of one image's forward pass."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        net(torch.zeros(1, net.config.channels, *net.config.shape))
    return counter.get_total_flops()


def cext_parts(build: str, name: str, batch: int) -> dict:
    """The C++ engine's (building, rows, pixel steps) seconds, built for `build`, in a process of its own,
    with that process's forward pass and torch.mm rate (PyTorch held to the build's instruction set)."""
    env = dict(os.environ, FASTPIXEL_CPU_ARCH=build, **LIBRARY_ISA.get(build, {}))
    out = subprocess.run([sys.executable, __file__, "--worker", name, str(batch)], env=env, check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.splitlines()[-1])


def _worker(name: str, batch: int) -> None:
    from fastpixel import extension
    extension.load()  # built (or found in the cache) before anything is timed
    print(json.dumps(dict(engine_against_forward(benchmark_model(name), batch), mm_gflops=mm_gflops(),
                          library_isa=LIBRARY_ISA.get(os.environ.get("FASTPIXEL_CPU_ARCH"), "this CPU's"))))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/cpu_cext_builds"))
    parser.add_argument("--models", nargs="+", default=["mnist", "cifar", "bundled"])
    parser.add_argument("--batches", type=int, nargs="+", default=list(BATCHES))
    parser.add_argument("--builds", nargs="+", default=list(BUILDS))
    parser.add_argument("--worker", nargs=2, metavar=("MODEL", "BATCH"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return _worker(args.worker[0], int(args.worker[1]))

    result = dict(machine=describe_machine(), date=datetime.date.today().isoformat(), builds=args.builds,
                  mm_gflops=mm_gflops(), cases=[])
    for name in args.models:
        net = benchmark_model(name)
        flops = forward_flops(net)
        for batch in args.batches:
            case = dict(model=name, config=net.config.to_dict(), batch=batch, flops_per_image=flops)
            with torch.no_grad():
                x = torch.zeros(batch, net.config.channels, *net.config.shape)
                net(x)  # warm up
                case["forward"] = min(_seconds(lambda: net(x)) for _ in range(3))
                fastpixel.sample(net, batch, fast=True, seed=0, backend="torch")  # warm up
                case["cached_torch"] = min(_seconds(lambda: fastpixel.sample(net, batch, fast=True, seed=0,
                                                                              backend="torch")) for _ in range(2))
            case["cext"] = {build: cext_parts(build, name, batch) for build in args.builds}
            result["cases"].append(case)
            print(json.dumps(case), flush=True)
        result["mm_gflops_after"] = mm_gflops()  # the rate again: a machine that got busier shows here
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


def markdown(result: dict) -> str:
    m, builds = result["machine"], result["builds"]
    rate = result["mm_gflops"]
    lines = [f"# The C++ engine's builds side by side: {', '.join(builds)}", "",
             f"Machine: {machine_line(m)}. Date: {result['date']}. float32, `benchmarks/cext_builds.py`.", "",
             f"torch.mm, 2048 x 2048 float32: {rate:.0f} GFLOP/s (again after the runs: "
             f"{result['mm_gflops_after']:.0f}).", "",
             "## Seconds per sampling, and in forward passes of the same batch", "",
             "C++: the whole cached sampling (building the sampler, rows, pixel steps); "
             "rows + pixels in brackets. Forward passes: the C++ time over the fastest of the forward passes "
             "timed in turn with it in the build's own process (in brackets); for a build with PyTorch held to "
             "its instruction set, forward passes of PyTorch held to it (" +
             ", ".join(f"{b}: {', '.join(f'{k}={v}' for k, v in LIBRARY_ISA[b].items())}" for b in builds
                       if b in LIBRARY_ISA) + "). The forward pass column: this script's own process.", "",
             "| model | batch | forward pass | cached torch | " +
             " | ".join(f"C++ {b} | {b}: forward passes | {b}: s per image" for b in builds) + " |",
             "|---|---:|---:|---:|" + "---:|---:|---:|" * len(builds)]
    for case in result["cases"]:
        cells = [case["model"], str(case["batch"]), f"{case['forward']:.3f}", f"{case['cached_torch']:.3f}"]
        for build in builds:
            c = case["cext"][build]
            cells += [f"{c['total']:.3f} ({c['rows']:.3f} + {c['pixels']:.3f})",
                      f"{c['total'] / c['forward']:.2f} ({c['forward']:.3f})",
                      f"{c['total'] / case['batch']:.4f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## GFLOP/s: a forward pass's FLOPs over each method's time", "",
              f"Next to torch.mm's rate timed in the build's own process (in brackets; {rate:.0f} GFLOP/s in this "
              "script's); in a build's process with PyTorch held to its instruction set, torch.mm is held too.", "",
              "| model | batch | GFLOP per image | forward pass | cached torch | " +
              " | ".join(f"C++ {b} | {b}: % of torch.mm" for b in builds) + " |",
              "|---|---:|---:|---:|---:|" + "---:|---:|" * len(builds)]
    for case in result["cases"]:
        gflop = case["flops_per_image"] * case["batch"] / 1e9
        cells = [case["model"], str(case["batch"]), f"{case['flops_per_image'] / 1e9:.2f}",
                 f"{gflop / case['forward']:.0f}", f"{gflop / case['cached_torch']:.0f}"]
        for build in builds:
            c = case["cext"][build]
            gflops = gflop / c["total"]
            cells += [f"{gflops:.0f}", f"{100 * gflops / c['mm_gflops']:.0f}% ({c['mm_gflops']:.0f})"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
