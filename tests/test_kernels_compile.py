"""Every Triton kernel compiles for real GPUs, checked on any machine (no GPU needed).

The interpreter that runs the kernel tests on the CPU accepts code that the compiler
rejects, so each kernel is also compiled ahead of time to a cubin for sm_80 and sm_90,
with the signature and constexprs its launcher really uses for two real configurations:
the bundled MNIST model and the original CIFAR-10 one, batch 16, in float32, float64 and
bfloat16.

What is compiled is what the fused sampler launches: `fastpixel.fused_step.aot_specs`
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
from fastpixel.fused_step import aot_specs
from fastpixel.kernels import mixture_nll

archs, batch = json.loads(sys.argv[1])
kernels = sorted(f"{info.name}.{name}" for info in pkgutil.iter_modules(fastpixel.kernels.__path__)
                 for name, value in vars(importlib.import_module(f"fastpixel.kernels.{info.name}")).items()
                 if isinstance(value, triton.runtime.JITFunction) and name.endswith("_kernel"))
print(json.dumps(dict(kernels=kernels)), flush=True)
configs = {"mnist": fastpixel.load("mnist").config, "cifar": fastpixel.ModelConfig()}  # the defaults are CIFAR's
for name, config in configs.items():
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        for fn, signature, constexprs, options in aot_specs(config, batch, dtype) + mixture_nll.aot_specs(config, batch, dtype):
            for arch in archs:
                start = time.perf_counter()
                source = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs)
                compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
                kernel = f"{fn.__module__.rsplit('.', 1)[-1]}.{fn.__name__}"
                print(json.dumps(dict(kernel=kernel, config=name, dtype=str(dtype), arch=arch,
                                      cubin=len(compiled.asm["cubin"]), seconds=time.perf_counter() - start)), flush=True)
"""


def test_every_kernel_compiles_to_a_cubin_for_sm80_and_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", _SCRIPT, json.dumps([ARCHS, BATCH])], env=env, capture_output=True,
                            text=True, cwd=Path(__file__).resolve().parents[1], timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    every_kernel, compiled = set(lines[0]["kernels"]), lines[1:]
    assert every_kernel >= {"column_conv._column_conv_kernel", "column_copy._column_copy_kernel",
                            "mixture_sample._mixture_sample_kernel", "mixture_nll._mixture_nll_kernel",
                            "mixture_nll._mixture_nll_backward_kernel"}
    assert {line["kernel"] for line in compiled} == every_kernel
    assert {(line["config"], line["dtype"], line["arch"]) for line in compiled} == {
        (c, d, a) for c in ("mnist", "cifar") for d in ("torch.float32", "torch.float64", "torch.bfloat16") for a in ARCHS}
    empty = [line for line in compiled if line["cubin"] <= 0]
    assert not empty, f"empty cubins: {empty}"
