"""Triton kernels, installed as `fastpixel.kernels`.

One file per kernel family, each holding, in this order: the plain-PyTorch reference, the
`@triton.jit` kernel, its launcher, the autograd Function when training needs one, and the
function callers use. No model knowledge lives here. Kernels are tested on the CPU under
TRITON_INTERPRET=1 and on a GPU when one is present. A file whose kernels the samplers launch
also defines `aot_specs(config, batch, dtype)`, the launches as (jit function, signature,
constexprs, options); tests/test_kernels_compile.py compiles them for sm_80 and sm_90 on any machine.
"""
