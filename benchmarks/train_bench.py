"""Training with the fused Triton kernels against plain PyTorch, side by side in one run.

    python benchmarks/train_bench.py --out benchmarks/results --data_dir DATA   # a GPU machine
    python benchmarks/train_bench.py --memory --out benchmarks/results          # any machine: the loss's memory
    python benchmarks/train_bench.py --quick --out /tmp/q                       # seconds, any machine

1. The mixture loss, forward + backward, CIFAR-10 configuration (C 3, K 10, 32x32) at batch
   64: the bytes autograd keeps for the backward pass (every machine: counted on the meta
   device, where it is exact), and on a GPU the time and the peak memory.
2. The training step (forward, loss, backward, Adam), float32 and bf16 autocast: the
   original CIFAR-10 configuration at batch 16 and the MNIST-size one (nr_resnet 3,
   nr_filters 64, K 5) at batch 64; `FASTPIXEL_BACKEND=torch` (cuDNN and the PyTorch loss)
   against `triton` (the fused convolutions and loss). GPU only: interpreted kernels on a
   CPU say nothing about speed.
3. A real run, with --data_dir holding MNIST: the MNIST-size model trained --steps steps from
   the same initialisation on the same batches by `python -m fastpixel.train`, for each
   backend in float32 and bf16; bits/dim of the EMA weights on the first 2000 test images.

Writes `train_cuda.json` and `train_cuda.md` (`train_cpu.*` on a CPU; `train_cpu_real_run.*` for
`--cpu_real_run`) under --out after every case (a run stopped at a time
limit keeps what it measured). `--quick` shrinks every case to a tiny model.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import fastpixel
from fastpixel import mixture, train
from fastpixel.io.data import load_dataset

BACKENDS = ("torch", "triton")
CIFAR = fastpixel.ModelConfig()  # the original configuration
MNIST_SIZE = fastpixel.ModelConfig(image_size=28, channels=1, nr_resnet=3, nr_filters=64, nr_logistic_mix=5)
TINY = fastpixel.ModelConfig(image_size=8, channels=3, nr_resnet=1, nr_filters=8, nr_logistic_mix=2)


@contextlib.contextmanager
def backend(name: str):
    """$FASTPIXEL_BACKEND set to `name` for the block (the layers and the loss read it)."""
    before = os.environ.get("FASTPIXEL_BACKEND")
    os.environ["FASTPIXEL_BACKEND"] = name
    try:
        yield
    finally:
        if before is None:
            del os.environ["FASTPIXEL_BACKEND"]
        else:
            os.environ["FASTPIXEL_BACKEND"] = before


def saved_bytes(fn) -> int:
    """Bytes of the distinct storages autograd saves for the backward pass while fn runs."""
    storages = {}

    def pack(t):
        storage = t.untyped_storage()
        storages[storage._cdata] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def gpu_time_and_peak(fn, repeats: int) -> tuple[float, int]:
    """Median seconds of fn after a warm-up, and its peak memory above what was allocated before."""
    fn()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return statistics.median(times), torch.cuda.max_memory_allocated() - base


def loss_inputs(config: fastpixel.ModelConfig, batch: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    params = torch.randn(batch, config.num_params_out, *config.shape, device=device)
    x = torch.randint(0, 256, (batch, config.channels, *config.shape), device=device) / 127.5 - 1
    return params.requires_grad_(), x


def loss_case(config, batch: int, device: torch.device, repeats: int) -> dict:
    from fastpixel.kernels import mixture_nll  # called directly: the dispatch refuses the meta device

    losses = dict(torch=lambda p, x: mixture.nll(p, x, backend="torch"), triton=mixture_nll.nll)
    row = dict(case="loss", config=config.to_dict(), batch=batch)
    meta_params, meta_x = loss_inputs(config, batch, "meta")
    for name in BACKENDS:
        row[f"{name}_saved_MB"] = saved_bytes(lambda: losses[name](meta_params, meta_x)) / 1e6
    if device.type == "cuda":
        params, x = loss_inputs(config, batch, device)
        for name in BACKENDS:
            def step():
                params.grad = None
                losses[name](params, x).sum().backward()
            row[f"{name}_s"], peak = gpu_time_and_peak(step, repeats)
            row[f"{name}_peak_MB"] = peak / 1e6
    return row


def step_case(config, batch: int, amp: bool, device: torch.device, repeats: int) -> dict:
    row = dict(case="step", config=config.to_dict(), batch=batch, amp="bf16" if amp else "none")
    for name in BACKENDS:
        torch.manual_seed(0)
        model = fastpixel.PixelCNNpp(config).to(device)
        x = torch.randint(0, 256, (batch, config.channels, *config.shape), device=device) / 127.5 - 1
        model.data_init(x)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)

        def step():
            with backend(name):
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                    params = model(x)
                loss = mixture.nll(params.float(), x).mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            return float(loss)

        if device.type == "cuda":
            row[f"{name}_s"], peak = gpu_time_and_peak(step, repeats)
            row[f"{name}_peak_MB"] = peak / 1e6
        else:
            start = time.perf_counter()
            step()
            row[f"{name}_s"] = time.perf_counter() - start  # the flow only: interpreted kernels
    return row


def real_run_case(config, data_dir: Path, steps: int, batch: int, amp: bool, device: torch.device, test_images: int,
                  backends=BACKENDS) -> dict:
    row = dict(case="real run", config=config.to_dict(), batch=batch, amp="bf16" if amp else "none", steps=steps)
    test = load_dataset("mnist", data_dir, "test", download=False)
    for name in backends:
        with tempfile.TemporaryDirectory() as save_dir, backend(name):
            args = ["--data_set", "mnist", "--data_dir", str(data_dir), "--no_download", "--save_dir", save_dir,
                    "--nr_resnet", str(config.nr_resnet), "--nr_filters", str(config.nr_filters),
                    "--nr_logistic_mix", str(config.nr_logistic_mix), "--dropout_p", "0", "--batch_size", str(batch),
                    "--max_steps", str(steps), "--num_samples", "0", "--amp", "bf16" if amp else "none", "--seed", "1"]
            start = time.perf_counter()
            if train.main(args) != 0:
                raise RuntimeError(f"training with FASTPIXEL_BACKEND={name} failed")
            row[f"{name}_train_s"] = time.perf_counter() - start
            model = fastpixel.load(save_dir, device=device)
        with backend("torch"):  # one judge for every run
            row[f"{name}_test_bpd"] = fastpixel.bits_per_dim(model, test.images[:test_images])
    return row


def check_data(data_dir) -> None:
    if not data_dir or not (Path(data_dir) / "mnist").is_dir():
        raise SystemExit(f"train_bench.py: the real run needs --data_dir holding mnist/ (got {data_dir})")


def markdown(result: dict) -> str:
    lines = [f"# Training benchmark on {result['device']}", "",
             f"torch {result['torch']}, triton {result['triton']}, one run ({result['date']}). "
             "Saved MB: what autograd keeps for the backward pass. Peak MB: above what was allocated before.", "",
             "| case | configuration | batch | amp | torch | triton | triton vs torch |", "|---|---|---:|---|---|---|---:|"]
    for row in result["rows"]:
        c = row["config"]
        config = f"{c['nr_resnet']}/{c['nr_filters']}/K{c['nr_logistic_mix']}, {c['channels']}x{c['image_size']}"
        cells, ratio = {name: "-" for name in BACKENDS}, ""
        for name in [b for b in BACKENDS if any(k.startswith(f"{b}_") for k in row)]:
            parts = [f"{row[k]:.1f} saved MB" for k in [f"{name}_saved_MB"] if k in row]
            parts += [f"{row[k] * 1e3:.2f} ms" for k in [f"{name}_s"] if k in row]
            parts += [f"{row[k]:.0f} peak MB" for k in [f"{name}_peak_MB"] if k in row]
            parts += [f"{row[k]:.4f} bits/dim" for k in [f"{name}_test_bpd"] if k in row]
            parts += [f"{row[k]:.0f} s training" for k in [f"{name}_train_s"] if k in row]
            cells[name] = ", ".join(parts)
        if "torch_s" in row and result["device_type"] == "cuda":
            ratio = f"{row['torch_s'] / row['triton_s']:.2f}x faster"
        elif "triton_test_bpd" in row:
            ratio = f"{row['triton_test_bpd'] - row['torch_test_bpd']:+.4f} bits/dim"
        elif "torch_saved_MB" in row:
            ratio = f"{row['triton_saved_MB'] / row['torch_saved_MB']:.3f}x the saved memory"
        lines.append(f"| {row['case']} | {config} | {row['batch']} | {row.get('amp', '-')} | {cells['torch']} | "
                     f"{cells['triton']} | {ratio} |")
    runs = {(r["amp"], name): r[f"{name}_test_bpd"] for r in result["rows"] if r["case"] == "real run"
            for name in BACKENDS if f"{name}_test_bpd" in r}
    lines += ["", *[f"Real run, {name}: bf16 autocast against float32, {runs['bf16', name] - runs['none', name]:+.4f} bits/dim."
                    for name in BACKENDS if ("bf16", name) in runs and ("none", name) in runs]]
    return "\n".join(lines).rstrip() + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="benchmarks/results", help="folder for train_<device>.json and .md")
    parser.add_argument("--data_dir", default=None, help="holds mnist/ for the real run (skipped without it)")
    parser.add_argument("--steps", type=int, default=600, help="optimiser steps of each real run")
    parser.add_argument("--memory", action="store_true", help="only the loss's saved memory (any machine, instant)")
    parser.add_argument("--quick", action="store_true", help="tiny shapes: checks the flow in seconds")
    parser.add_argument("--cpu_real_run", action="store_true",
                        help="only the real run, PyTorch layers, the bundled MNIST model's configuration at batch 32, "
                             "float32 against bf16 autocast (needs --data_dir)")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()})"
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "absent"
    result = dict(device=name, device_type=device.type, torch=torch.__version__, triton=triton_version,
                  date=time.strftime("%Y-%m-%d"), rows=[])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cases = [lambda: loss_case(TINY, 2, device, repeats=2) if args.quick else loss_case(CIFAR, 64, device, repeats=20)]
    if args.quick and not args.memory:
        cases.append(lambda: step_case(TINY, 2, False, device, repeats=2))
    elif not args.memory and device.type == "cuda":
        cases += [lambda amp=amp, c=c, b=b: step_case(c, b, amp, device, repeats=10)
                  for amp in (False, True) for c, b in ((CIFAR, 16), (MNIST_SIZE, 64))]
        if args.data_dir and (Path(args.data_dir) / "mnist").is_dir():
            cases += [lambda amp=amp: real_run_case(MNIST_SIZE, Path(args.data_dir), args.steps, 64, amp, device, 2000)
                      for amp in (False, True)]
    elif args.cpu_real_run:
        check_data(args.data_dir)
        cases = [lambda amp=amp: real_run_case(fastpixel.load("mnist").config, Path(args.data_dir), args.steps, 32, amp,
                                               device, 1000, backends=("torch",)) for amp in (False, True)]
    print(f"training benchmark on {name}: {len(cases)} cases", flush=True)
    for case in cases:
        result["rows"].append(case())
        print(json.dumps(result["rows"][-1]), flush=True)
        stem = f"train_{device.type}" + ("_real_run" if args.cpu_real_run else "")
        (out / f"{stem}.json").write_text(json.dumps(result, indent=1))
        (out / f"{stem}.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
