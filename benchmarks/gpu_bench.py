"""Naive against cached PyTorch against cached Triton + CUDA graphs, side by side in one run.

    python benchmarks/gpu_bench.py --out benchmarks/results        # on a GPU machine
    python benchmarks/gpu_bench.py --quick --out /tmp/q             # seconds, any machine

Models: the bundled MNIST model, and the original CIFAR configuration (nr_resnet 5,
nr_filters 160, mix 10; random weights after data-dependent initialisation), float32, at
batch 1, 16, 64 and 256. Naive sampling is one forward pass per pixel: it is estimated as
(one forward pass) x H*W. Each cached run is timed after one warm-up run of the same
(model, batch), which compiles the Triton kernels and whose graph captures are counted
in the reported first-run time. Writes `gpu.json` and `gpu.md` (device named) under --out.
`--quick` shrinks everything to a tiny model on whatever device there is (the Triton
backend under TRITON_INTERPRET=1 on a CPU), so a test can check the script runs.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

import fastpixel
from fastpixel import backend as backends


def models(quick: bool, device: torch.device) -> dict[str, fastpixel.PixelCNNpp]:
    torch.manual_seed(0)
    if quick:
        configs = {"tiny": fastpixel.ModelConfig(image_size=4, channels=3, nr_resnet=1, nr_filters=8,
                                                 nr_logistic_mix=2)}
        built = {}
    else:
        configs = {"cifar": fastpixel.ModelConfig(image_size=32, channels=3, nr_resnet=5, nr_filters=160,
                                                  nr_logistic_mix=10)}
        built = {"mnist (bundled)": fastpixel.load("mnist", device=device)}
    for name, cfg in configs.items():
        model = fastpixel.PixelCNNpp(cfg).to(device)
        model.data_init(torch.rand(8, cfg.channels, *cfg.shape, device=device) * 2 - 1)
        built[name] = model.eval()
    return built


def timed(fn) -> tuple[float, object]:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start, result


def measure(name: str, model: fastpixel.PixelCNNpp, batch: int, methods: list[str]) -> dict:
    cfg = model.config
    param = next(model.parameters())
    x = torch.zeros(batch, cfg.channels, *cfg.shape, device=param.device)
    with torch.no_grad():
        model(x)  # warm-up (cuDNN's choices)
        forward = min(timed(lambda: model(x))[0] for _ in range(3))
    row = dict(model=name, batch=batch, config=cfg.to_dict(), forward_s=forward,
               naive_estimated_s=forward * cfg.shape[0] * cfg.shape[1])
    images = {}
    for method in methods:
        def run():
            return fastpixel.sample(model, batch, fast=True, seed=0, backend=method)
        row[f"{method}_first_s"], _ = timed(run)
        row[f"{method}_s"], images[method] = timed(run)
        print(f"  {name} batch {batch}: cached {method} {row[f'{method}_s']:.3f} s "
              f"(first run {row[f'{method}_first_s']:.2f} s)", flush=True)
    if len(images) == 2:
        a, b = images.values()
        row["images_differing"] = int((a != b).flatten(1).any(dim=1).sum())
    return row


def markdown(result: dict) -> str:
    methods = result["methods"]
    lines = [f"# Sampling speed on {result['device']}", "",
             f"torch {result['torch']}, triton {result['triton']}, float32, one run ({result['date']}). "
             "Naive = one forward pass x H*W (estimated). Cached times exclude a warm-up run "
             "(kernel compilation; graph capture happens in every run).", "",
             "| model | batch | naive est. (s) | " + " | ".join(f"cached {m} (s)" for m in methods)
             + " | " + " | ".join(f"speedup {m} vs naive" for m in methods)
             + (" | triton vs torch | images differing |" if len(methods) == 2 else " |"),
             "|---|---:|---:|" + "---:|" * (2 * len(methods)) + ("---:|---:|" if len(methods) == 2 else "")]
    for row in result["rows"]:
        cells = [row["model"], str(row["batch"]), f"{row['naive_estimated_s']:.1f}"]
        cells += [f"{row[f'{m}_s']:.3f}" for m in methods]
        cells += [f"{row['naive_estimated_s'] / row[f'{m}_s']:.0f}x" for m in methods]
        if len(methods) == 2:
            cells += [f"{row['torch_s'] / row['triton_s']:.1f}x", str(row["images_differing"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="benchmarks/results", help="folder for gpu.json and gpu.md")
    parser.add_argument("--quick", action="store_true", help="a tiny model at batch 2: seconds")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    methods = [m for m in ("torch", "triton") if backends.why_unavailable(m, device) is None]
    batches = (2,) if args.quick else (1, 16, 64, 256)
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()})"
    print(f"benchmarking on {name}: {', '.join(methods)}", flush=True)
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "absent"
    result = dict(device=name, torch=torch.__version__, triton=triton_version, methods=methods,
                  date=time.strftime("%Y-%m-%d"), rows=[])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for model_name, model in models(args.quick, device).items():
        for batch in batches:
            result["rows"].append(measure(model_name, model, batch, methods))
            # after every case, so a run stopped at its time limit keeps what it measured
            (out / "gpu.json").write_text(json.dumps(result, indent=1))
            (out / "gpu.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
