"""Completion against drawing from scratch, side by side: same model, engine, batch and run.

    python benchmarks/completion_speed.py --data_dir DATA      # writes benchmarks/results/completion_cpu.{json,md}

For each bundled MNIST model and engine: 16 digits drawn from scratch; the bottom half of 16
MNIST test digits completed (the top 14 rows known, teacher-forced through the same steps);
and all 784 pixels known (the prefill alone). Runs alternate, repeated; the table gives the
median and the fastest of each.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import fastpixel
from fastpixel.io.data import load_dataset
from machine import machine_line

RESULTS = Path(__file__).resolve().parent / "results"


def _seconds(run) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data_dir", default="data", help="MNIST's IDX files in DATA/mnist")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=str(RESULTS / "completion_cpu"), help="JSON and Markdown, without suffix")
    args = parser.parse_args(argv)
    test = load_dataset("mnist", args.data_dir, "test", download=False)
    digits = test.images[:16]
    rows = []
    for name in ("mnist", "mnist-gated"):
        model = fastpixel.load(name)
        for engine in ("cext", "torch"):
            kwargs = dict(fast=True, seed=0, backend=engine)
            cases = {"from scratch": lambda: fastpixel.sample(model, 16, **kwargs),
                     "bottom half completed": lambda: fastpixel.sample(model, 16, prefix=digits, keep=14 * 28, **kwargs),
                     "all known (prefill only)": lambda: fastpixel.sample(model, 16, prefix=digits, keep=28 * 28, **kwargs)}
            for run in cases.values():  # warm-up: the engine's build, first-call costs
                run()
            times = {case: [] for case in cases}
            for _ in range(args.repeats):  # alternate, so that a slow spell of the machine hits every case
                for case, run in cases.items():
                    times[case].append(_seconds(run))
            scratch = statistics.median(times["from scratch"])
            for case, seconds in times.items():
                rows.append(dict(model=name, engine=engine, case=case, median_s=statistics.median(seconds),
                                 min_s=min(seconds), ratio_to_scratch=statistics.median(seconds) / scratch))
                print(f"{name:12} {engine:6} {case:26} median {rows[-1]['median_s']:.3f} s  "
                      f"({rows[-1]['ratio_to_scratch']:.2f}x from scratch)", flush=True)
    data = dict(machine=machine_line(), batch=16, repeats=args.repeats, rows=rows)
    Path(args.out + ".json").write_text(json.dumps(data, indent=2) + "\n")
    lines = ["# Completion against drawing from scratch (16 MNIST digits)", "",
             f"Machine: {data['machine']}. `benchmarks/completion_speed.py`, {args.repeats} alternating repeats after a "
             "warm-up; the bundled models; the first 16 MNIST test digits as prefixes. A training ran in the background "
             "at the lowest priority (nice 19, one thread) while this was measured.", "",
             "| model | engine | case | median (s) | fastest (s) | median / from scratch |", "|---|---|---|---:|---:|---:|"]
    lines += [f"| `{r['model']}` | {r['engine']} | {r['case']} | {r['median_s']:.3f} | {r['min_s']:.3f} | "
              f"{r['ratio_to_scratch']:.2f} |" for r in rows]
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
