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
    """One row per (model, batch): cached seconds, naive seconds (measured or estimated), speedup."""
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
        rows.append(dict(model=model, batch=batch, cached=times["cached"], naive=naive,
                         naive_kind="measured" if measured is not None else "estimated",
                         estimated=estimated, forward=times["forward"],
                         speedup=naive / times["cached"], forward_passes=times["cached"] / times["forward"]))
    return rows


def machine(data: dict) -> str:
    info = data.get("machine_info", {})
    cpu = info.get("cpu", {})
    extra = data["benchmarks"][0]["extra_info"] if data["benchmarks"] else {}
    return (f"{cpu.get('brand_raw', info.get('processor', 'unknown CPU'))}, {cpu.get('count', '?')} logical cores, "
            f"{info.get('system', '')} {info.get('release', '')}, Python {info.get('python_version', '?')}, "
            f"torch {extra.get('torch', '?')} ({extra.get('threads', '?')} threads)")


def markdown(rows: list[dict], data: dict) -> str:
    lines = [f"Machine: {machine(data)}. Date: {data.get('datetime', '?')[:10]}. float32.", "",
             "| model | batch | naive (s) | cached (s) | speedup | cached cost in forward passes | images/s cached |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        naive = f"{row['naive']:.1f}" + (" (est.)" if row["naive_kind"] == "estimated" else "")
        lines.append(f"| {row['model']} | {row['batch']} | {naive} | {row['cached']:.2f} | {row['speedup']:.0f}x | "
                     f"{row['forward_passes']:.1f} | {row['batch'] / row['cached']:.2f} |")
    measured = [r for r in rows if r["naive_kind"] == "measured" and r["estimated"]]
    lines.append("")
    lines.append("Naive sampling is estimated as one forward pass x H*W (est.) except where measured in full.")
    for r in measured:
        lines.append(f"Check of the estimate, {r['model']} batch {r['batch']}: measured {r['naive']:.1f} s, "
                     f"estimated {r['estimated']:.1f} s.")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for model in sorted({r["model"] for r in rows}):
        mine = [r for r in rows if r["model"] == model]
        ax.plot([r["batch"] for r in mine], [r["speedup"] for r in mine], marker="o", label=model)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size")
    ax.set_ylabel("speedup of cached over naive sampling")
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
