"""Every Triton kernel compiles for real GPUs, checked on any machine (no GPU needed).

The interpreter that runs the kernel tests on the CPU accepts code that the compiler
rejects, so each kernel is also compiled ahead of time to a cubin for sm_80 and sm_90,
with the signature and constexprs its launcher really uses for two real configurations:
the bundled MNIST model and the original CIFAR-10 one, batch 16, in float32, float64 and
bfloat16; training's convolutions (`fastpixel.models.pixelcnnpp.layers.fused_launch_specs`) for the
CIFAR-10 one with a class bias, in float32 and bfloat16.

What is compiled is what the fused sampler launches: `fastpixel.sampling.engines.fused.aot_specs`
lists every distinct launch of its steps, each as (jit function, signature, constexprs,
options), for a model configuration, batch and dtype; and so does what training launches:
`fastpixel.kernels.mixture_nll.aot_specs` lists the loss and its gradient, plain and focal.
The test also checks that every kernel in kernels/ is among them. The compiles run in one
subprocess, because `@triton.jit` returns an interpreter object when TRITON_INTERPRET is set at import
(tests/conftest.py sets it). Compiled kernels land in Triton's cache, so a rerun of
unchanged kernels takes seconds.
"""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")

ARCHS = (80, 90)
BATCH = 16

_SCRIPT = r"""
import importlib, json, pkgutil, sys, time
import torch, triton
from triton.backends.compiler import GPUTarget
import fastpixel, fastpixel.kernels
from fastpixel.sampling.engines.fused import aot_specs
from fastpixel.kernels import mixture_nll
from fastpixel.models.pixelcnnpp.layers import fused_launch_specs

archs, batch, part, parts = json.loads(sys.argv[1])
kernels = sorted(f"{info.name}.{name}" for info in pkgutil.iter_modules(fastpixel.kernels.__path__)
                 for name, value in vars(importlib.import_module(f"fastpixel.kernels.{info.name}")).items()
                 if isinstance(value, triton.runtime.JITFunction) and name.endswith("_kernel"))
print(json.dumps(dict(kernels=kernels)), flush=True)
configs = {"mnist": fastpixel.load("mnist").config, "cifar": fastpixel.ModelConfig()}  # the defaults are CIFAR's
jobs = [(name, dtype, spec) for name, config in configs.items() for dtype in (torch.float32, torch.float64, torch.bfloat16)
        for spec in aot_specs(config, batch, dtype) + mixture_nll.aot_specs(config, batch, dtype)]
# training's convolutions: the CIFAR configuration with a class bias, in training's dtypes
def training_specs(config, dtype):
    with torch.device("meta"):
        model = fastpixel.PixelCNNpp(config).to(dtype)
        x, labels = torch.empty(batch, config.channels, *config.shape, dtype=dtype), torch.zeros(batch, dtype=torch.long)
        return fused_launch_specs(model, x, labels)


jobs += [("cifar", dtype, spec) for dtype in (torch.float32, torch.bfloat16)
         for spec in training_specs(fastpixel.ModelConfig(num_classes=10), dtype)]
for name, dtype, (fn, signature, constexprs, options) in jobs[part::parts]:
    for arch in archs:
        start = time.perf_counter()
        source = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs)
        compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
        kernel = f"{fn.__module__.rsplit('.', 1)[-1]}.{fn.__name__}"
        print(json.dumps(dict(kernel=kernel, config=name, dtype=str(dtype), arch=arch,
                              cubin=len(compiled.asm["cubin"]), seconds=time.perf_counter() - start)), flush=True)
"""


def test_every_kernel_compiles_to_a_cubin_for_sm80_and_sm90():
    """The compiles are split between as many processes as there are cores (each is single-threaded)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    parts = max(1, min(4, len(os.sched_getaffinity(0))))
    workers = [subprocess.Popen([sys.executable, "-c", _SCRIPT, json.dumps([ARCHS, BATCH, part, parts])], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                cwd=Path(__file__).resolve().parents[1]) for part in range(parts)]
    compiled = []
    for worker in workers:
        stdout, stderr = worker.communicate(timeout=900)
        assert worker.returncode == 0, stderr[-4000:]
        first, *rest = [json.loads(line) for line in stdout.splitlines()]
        every_kernel = set(first["kernels"])
        compiled += rest
    assert every_kernel >= {"column_conv._column_conv_kernel", "column_copy._column_copy_kernel",
                            "mixture_sample._mixture_sample_kernel", "mixture_nll._mixture_nll_kernel",
                            "mixture_nll._mixture_nll_backward_kernel", "shifted_conv._conv_kernel",
                            "shifted_conv._gate_backward_kernel", "shifted_conv._conv_input_grad_kernel",
                            "shifted_conv._conv_weight_grad_kernel"}
    assert {line["kernel"] for line in compiled} == every_kernel
    assert {(line["config"], line["dtype"], line["arch"]) for line in compiled} == {
        (c, d, a) for c in ("mnist", "cifar") for d in ("torch.float32", "torch.float64", "torch.bfloat16") for a in ARCHS}
    empty = [line for line in compiled if line["cubin"] <= 0]
    assert not empty, f"empty cubins: {empty}"
