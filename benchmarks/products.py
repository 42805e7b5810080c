"""The C++ engine's matrix product against PyTorch's (`torch.mm`: its BLAS) at the shapes a
sampling of the MNIST-size model (3/64/5) runs, for the native and x86-64-v3 builds side by
side: a pixel's product (batch x 256 @ 256 x 128) and a row's (28 * batch x 768 @ 768 x
128), batch 1, 16 and 64, float32. Microseconds, the median of 7 timings of many calls.

    python benchmarks/products.py --out benchmarks/results/cpu_products

The engine's product is its PRODUCT op (fastpixel/sampling/engines/cext.py), one call into
the library per product, with the zeroing of its accumulator and the copy of its result
(what a sampling's product pays too). Each build is timed in a process of its own, since the
engine is built once per process; torch.mm is timed in each, as a check that the two
processes ran alike; in the x86-64-v3 build's, PyTorch's MKL and oneDNN are held to AVX2, as
on a CPU of that level (`cext_builds.LIBRARY_ISA`). Written for csrc/README.md's "why not a
BLAS call".
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
BUILDS = ("native", "x86-64-v3")
BATCHES = (1, 16, 64)
PIXEL_K, ROW_K, N, WIDTH = 256, 768, 128, 28


def shapes() -> list[tuple[str, int, int, int, int]]:
    """(what, batch, m, k, n) of each product timed."""
    return ([("pixel", b, b, PIXEL_K, N) for b in BATCHES] +
            [("row", b, WIDTH * b, ROW_K, N) for b in BATCHES])


def median_microseconds(run, seconds: float = 0.2) -> float:
    """The median of 7 timings, each of as many calls as take about `seconds`."""
    run()
    start, calls = time.perf_counter(), 0
    while time.perf_counter() - start < 0.05:
        run()
        calls += 1
    calls = max(1, int(calls * seconds / 0.05))
    timings = []
    for _ in range(7):
        start = time.perf_counter()
        for _ in range(calls):
            run()
        timings.append((time.perf_counter() - start) / calls)
    return 1e6 * statistics.median(timings)


def engine_product(a: torch.Tensor, w: torch.Tensor, out: torch.Tensor):
    """out = a @ w as the engine's PRODUCT op: m images of one position, each a run of k values."""
    from fastpixel.sampling.engines.cext import _PRODUCT, OpList, engine_filter, load_engine, pack_op, panel_columns
    run, slots = load_engine(a.dtype)
    (m, k), n = a.shape, w.shape[1]
    panel = panel_columns(a.dtype, pixel=True)
    position, filter_ = torch.zeros(1, dtype=torch.int32), engine_filter(w, panel)
    runs_a = [a, k, 0, 1, k, k]  # address, image stride, column stride, runs, gap, run length
    no_init = [None, 0, 0, 0, 0, 0]
    runs_out = [out, n, 0, 1, n, n]
    op = pack_op(_PRODUCT, [position, 1, m, *runs_a, False, filter_, n, *no_init, None, 0, *runs_out, panel], slots)
    return OpList(run, [op], [a, filter_, out, position])


def time_build() -> list[dict]:
    """Every shape, in this process: the engine's product and torch.mm's."""
    torch.manual_seed(0)
    rows = []
    for what, batch, m, k, n in shapes():
        a, w = torch.randn(m, k), torch.randn(k, n) / k ** 0.5
        out, expected = torch.empty(m, n), torch.empty(m, n)
        call = engine_product(a, w, out)
        call()
        torch.mm(a, w, out=expected)
        if not torch.allclose(out, expected, rtol=1e-4, atol=1e-4):
            raise AssertionError(f"the engine's {what} product at batch {batch} differs from torch.mm")
        rows.append(dict(what=what, batch=batch, m=m, k=k, n=n, engine_us=median_microseconds(call),
                         torch_mm_us=median_microseconds(lambda: torch.mm(a, w, out=expected))))
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(RESULTS / "cpu_products"), help="JSON and Markdown, without suffix")
    parser.add_argument("--this-build", action="store_true", help="time the build FASTPIXEL_CPU_ARCH names, here")
    args = parser.parse_args(argv)
    if args.this_build:
        print(json.dumps(time_build()))
        return
    from cext_builds import LIBRARY_ISA
    from machine import describe_machine, machine_line
    timed = {}
    for build in BUILDS:
        done = subprocess.run([sys.executable, __file__, "--this-build"], capture_output=True, text=True, check=True,
                              env={**os.environ, "FASTPIXEL_CPU_ARCH": build, **LIBRARY_ISA.get(build, {})})
        timed[build] = json.loads(done.stdout.splitlines()[-1])
    described = describe_machine()
    result = dict(machine=described, threads=torch.get_num_threads(), builds=timed)
    Path(args.out + ".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["# The engine's matrix product against torch.mm", "",
             f"Machine: {machine_line(described)}. float32, `benchmarks/products.py`. Microseconds per product "
             "(median of 7).", "",
             "| product | batch | m x k @ k x n | engine, native | torch.mm | engine, x86-64-v3 | torch.mm held to AVX2 |",
             "|---|---:|---|---:|---:|---:|---:|"]
    for native, v3 in zip(timed["native"], timed["x86-64-v3"]):
        lines.append(f"| {native['what']} | {native['batch']} | {native['m']} x {native['k']} @ {native['k']} x "
                     f"{native['n']} | {native['engine_us']:.1f} | {native['torch_mm_us']:.1f} | "
                     f"{v3['engine_us']:.1f} | {v3['torch_mm_us']:.1f} |")
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
