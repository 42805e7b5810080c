"""The README's numbers for `fastpixel.convert` (not a test: it takes minutes).

The bundled MNIST model is written out as each source would have saved it (a pclucas14
state_dict; an openai TensorFlow checkpoint with Polyak averages), converted back, and
compared with tests/test_convert.py's transcriptions of the sources on the real MNIST test
set: mixture parameters (max |difference|) and bits/dim under the sources' own likelihood,
tiny-bin fallback included. Then sampling time, naive against cached, for converted models.

    python benchmarks/measure_convert.py --images 1000
"""
import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import fastpixel  # noqa: E402
from fastpixel import convert  # noqa: E402
from fastpixel.models.pixelcnnpp.layers import ShiftedConvTranspose2d  # noqa: E402
from tests.test_convert import (SHARED_DATA, OpenAIModel, pclucas14_forward, pclucas14_state_dict,  # noqa: E402
                                source_nll, unpack, unpack_fastpixel, write_bundle)
from fastpixel.io.data import load_dataset  # noqa: E402


def export(model):
    """The model's effective weights as pclucas14 and openai would store them (C = 1: the
    output layouts agree with fastpixel's, so no rows move)."""
    pc, tf, counters = {}, {}, {}
    for name, pc_name in convert._layers(model):
        module = model.get_submodule(name)
        w, b = module.weight().detach().double(), module.b.detach().double()
        transposed = isinstance(module, ShiftedConvTranspose2d)
        kind = "deconv2d" if transposed else "dense" if name.endswith(".skip") or name == "out" else "conv2d"
        tf_name = f"model/{kind}_{counters.setdefault(kind, 0)}"
        counters[kind] += 1
        v = w[:, :, 0, 0] if kind == "dense" else w
        pc[f"{pc_name}.weight_v"], pc[f"{pc_name}.bias"] = v.float(), b.float()
        pc[f"{pc_name}.weight_g"] = v.flatten(1).norm(dim=1).view(-1, *[1] * (v.dim() - 1)).float()
        tf_v = v.T if kind == "dense" else w.permute(2, 3, 1, 0)
        out_axis = {"conv2d": 3, "deconv2d": 2, "dense": 1}[kind]
        tf_g = torch.linalg.vector_norm(tf_v, dim=[d for d in range(tf_v.dim()) if d != out_axis])
        for key, value in (("V", tf_v), ("g", tf_g), ("b", b)):
            tf[f"{tf_name}/{key}/ExponentialMovingAverage"] = value.float().numpy()
    return pc, tf


def timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=10000)
    parser.add_argument("--sources", default="pclucas14,openai", help="which conversions to compare (comma-separated)")
    parser.add_argument("--work", default="/tmp/fastpixel_convert_measure")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)
    test = load_dataset("mnist", SHARED_DATA, "test", download=False)
    images = test.images[:args.images]
    bundled = fastpixel.load("mnist").config
    pc, tf = export(fastpixel.load("mnist"))
    torch.save(pc, work / "mnist_pclucas14.pth")
    write_bundle(work / "mnist_openai.ckpt", tf)
    sources = {
        "pclucas14": (lambda dtype: convert.from_pclucas14(work / "mnist_pclucas14.pth", dtype=dtype),
                      lambda x: pclucas14_forward({k: v.double() for k, v in pc.items()}, x.permute(0, 3, 1, 2),
                                                   bundled.nr_resnet)),
        "openai": (lambda dtype: convert.from_openai(work / "mnist_openai.ckpt", dtype=dtype),
                   lambda x: OpenAIModel(tf, ema=True)(x, nr_resnet=bundled.nr_resnet, nr_filters=bundled.nr_filters,
                                                       nr_logistic_mix=bundled.nr_logistic_mix)),
    }
    for source in args.sources.split(","):
        converted, reference = sources[source]
        models = {dtype: converted(dtype) for dtype in (torch.float64, torch.float32)}
        worst = {dtype: 0.0 for dtype in models}
        theirs = 0.0
        fallback_bins = 0
        for start in range(0, len(images), 500):
            x = images[start:start + 500].double() / 127.5 - 1
            ref = reference(x.permute(0, 2, 3, 1))
            theirs += float(source_nll(ref, x.permute(0, 2, 3, 1)).sum())
            logits, means, log_scales, _ = unpack(ref, 1)
            inv = torch.exp(-log_scales.clamp(min=-7))
            centered = x.permute(0, 2, 3, 1).unsqueeze(-1) - means
            mass = torch.sigmoid(inv * (centered + 1 / 255)) - torch.sigmoid(inv * (centered - 1 / 255))
            inner = (x.permute(0, 2, 3, 1).unsqueeze(-1).abs() < 0.999)
            fallback_bins += int(((mass <= 1e-5) & inner).sum())
            with torch.no_grad():
                for dtype, model in models.items():
                    params = model(x.to(dtype))
                    for ours, them in zip(unpack_fastpixel(params, 1), unpack(ref, 1)):
                        if them is not None:
                            worst[dtype] = max(worst[dtype], float((ours.double() - them).abs().max()))
        theirs /= images.numel() * np.log(2)
        ours = {dtype: fastpixel.bits_per_dim(m, images) for dtype, m in models.items()}
        print(f"{source}: {len(images)} MNIST test images; max |param diff| float64 {worst[torch.float64]:.2e}, "
              f"float32 {worst[torch.float32]:.2e}; bits/dim source {theirs:.6f}, fastpixel float64 "
              f"{ours[torch.float64]:.6f} (diff {ours[torch.float64] - theirs:+.2e}), float32 {ours[torch.float32]:.6f} "
              f"(diff {ours[torch.float32] - theirs:+.2e}); component bins under 1e-5 (fallback): {fallback_bins}")

    # Sampling speed of converted models: the bundled one, and pclucas14's default CIFAR-10 architecture.
    torch.save({k: v.float() for k, v in pclucas14_state_dict(3, nr_resnet=5, nr_filters=160, nr_mix=10).items()},
               work / "cifar_pclucas14.pth")
    for name, model in (("bundled MNIST via pclucas14", convert.from_pclucas14(work / "mnist_pclucas14.pth")),
                        ("pclucas14 CIFAR-10 default 5/160/10", convert.from_pclucas14(work / "cifar_pclucas14.pth"))):
        pixels = model.config.shape[0] * model.config.shape[1]
        for batch in (1, 16):
            x = torch.zeros(batch, model.config.channels, *model.config.shape)
            with torch.no_grad():
                model(x)
                forward = min(timed(lambda: model(x)) for _ in range(3))
            fastpixel.sample(model, batch, fast=True, seed=0)  # builds the C++ engine once
            cached = min(timed(lambda: fastpixel.sample(model, batch, fast=True, seed=0)) for _ in range(2))
            print(f"{name}, batch {batch}: naive {forward * pixels:.1f} s (est.: one forward {forward * 1000:.1f} ms x {pixels}), "
                  f"cached {cached:.2f} s, speedup {forward * pixels / cached:.0f}x")
        if model.config.channels == 1:  # small enough to run naive sampling in full
            naive = timed(lambda: fastpixel.sample(model, 1, fast=False, seed=0))
            print(f"{name}, batch 1: naive measured in full {naive:.1f} s")


if __name__ == "__main__":
    main()
