"""Turn a pytest-benchmark JSON from benchmarks/test_sampling_speed.py into a Markdown
table and a speedup plot, next to the JSON (or under --out).

    python benchmarks/report.py benchmarks/results/cpu.json
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path


def rows_from(data: dict) -> list[dict]:
    """One row per (model, batch): cached seconds (PyTorch path, and the C++ engine where it
    ran), naive seconds (measured or estimated; None where not timed), speedup, cost in
    forward passes (None without a timed forward pass)."""
    by_case = defaultdict(dict)
    for bench in data["benchmarks"]:
        info = bench["extra_info"]
        case = by_case[(info["model"], info["batch"])]
        case[info["method"]] = bench["stats"]["min"] * info["multiplier"]
        if info["multiplier"] > 1:  # the estimate's underlying measurement is one forward pass
            case["forward"] = bench["stats"]["min"]
    rows = []
    for (model, batch), times in sorted(by_case.items()):
        if "cached" not in times:
            continue
        measured = times.get("naive (measured)")
        estimated = times.get("naive (estimated: forward pass x H*W)")
        naive = measured if measured is not None else estimated
        cext, forward = times.get("cached cext"), times.get("forward")
        fastest = min(t for t in (times["cached"], cext) if t is not None)
        rows.append(dict(model=model, batch=batch, cached=times["cached"], cext=cext, naive=naive,
                         naive_kind="measured" if measured is not None else "estimated",
                         estimated=estimated, forward=forward,
                         speedup=None if naive is None else naive / fastest,
                         forward_passes=None if forward is None else times["cached"] / forward,
                         cext_forward_passes=None if forward is None or cext is None else cext / forward))
    return rows


def machine(data: dict) -> str:
    """benchmarks/machine.py's line, as the suite recorded it; for older files, pytest-benchmark's
    own description (which names no vector extensions)."""
    info = data.get("machine_info", {})
    cpu = info.get("cpu", {})
    extra = data["benchmarks"][0]["extra_info"] if data["benchmarks"] else {}
    if "machine" in extra:
        return extra["machine"]
    return (f"{cpu.get('brand_raw', info.get('processor', 'unknown CPU'))}, {cpu.get('count', '?')} logical cores, "
            f"{info.get('system', '')} {info.get('release', '')}, Python {info.get('python_version', '?')}, "
            f"torch {extra.get('torch', '?')} ({extra.get('threads', '?')} threads)")


def _number(value: float | None, digits: int, suffix: str = "") -> str:
    return "–" if value is None else f"{value:.{digits}f}{suffix}"


def markdown(rows: list[dict], data: dict) -> str:
    lines = [f"Machine: {machine(data)}. Date: {data.get('datetime', '?')[:10]}. float32.", "",
             "| model | batch | naive (s) | cached torch (s) | cached C++ (s) | C++ over torch | speedup over naive "
             "| forward passes, torch | forward passes, C++ | images/s, fastest |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        naive = _number(row["naive"], 1, " (est.)" if row["naive_kind"] == "estimated" else "")
        over_torch = None if row["cext"] is None else row["cached"] / row["cext"]
        fastest = min(t for t in (row["cached"], row["cext"]) if t is not None)
        lines.append(f"| {row['model']} | {row['batch']} | {naive} | {row['cached']:.2f} | {_number(row['cext'], 2)} | "
                     f"{_number(over_torch, 1, 'x')} | {_number(row['speedup'], 0, 'x')} | "
                     f"{_number(row['forward_passes'], 1)} | {_number(row['cext_forward_passes'], 1)} | "
                     f"{row['batch'] / fastest:.2f} |")
    measured = [r for r in rows if r["naive_kind"] == "measured" and r["estimated"]]
    lines.append("")
    lines.append("Naive sampling is estimated as one forward pass x H*W (x C for the masked families, a pass per "
                 "sub-pixel) (est.) except where measured in full.")
    for r in measured:
        lines.append(f"Check of the estimate, {r['model']} batch {r['batch']}: measured {r['naive']:.1f} s, "
                     f"estimated {r['estimated']:.1f} s.")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for model in sorted({r["model"] for r in rows if r["speedup"] is not None}):
        mine = [r for r in rows if r["model"] == model]
        ax.plot([r["batch"] for r in mine], [r["speedup"] for r in mine], marker="o", label=model)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size")
    ax.set_ylabel("speedup of the fastest cached sampler over naive")
    ax.set_title(title, fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("json", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="folder for the .md and .png (default: next to the JSON)")
    args = parser.parse_args(argv)
    data = json.loads(args.json.read_text())
    rows = rows_from(data)
    out = args.out or args.json.parent
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.json.stem}.md").write_text(markdown(rows, data))
    plot(rows, out / f"{args.json.stem}.png", machine(data))
    print(markdown(rows, data))


if __name__ == "__main__":
    main()
