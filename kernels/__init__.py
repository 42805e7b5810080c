"""Triton kernels, installed as `fastpixel.kernels`.

One file per kernel family, each holding, in this order: the plain-PyTorch reference, the
`@triton.jit` kernel, its launcher, and the function callers use. No model knowledge lives
here, and nothing of fastpixel above it is imported (tests/test_layout.py checks): may
import torch and triton only. `mixture.py` is the discretised logistic mixture in plain
PyTorch, the reference of `mixture_nll` and `mixture_sample` and what `fastpixel.mixture`
runs where they do not. The cached sampler's per-pixel work (`fastpixel/sampling/engines/fused.py`) is made of:

- `column_conv`: one output column of a shifted convolution, with the nonlinearity
  prologue, the skip input, the cache write and the gated residual epilogue fused;
- `column_copy`: a column of channels moved between buffers at the current pixel;
- `mixture_sample`: a pixel drawn from the discretised logistic mixture.

Training has its own, each registered as a `torch.library.custom_op` with its gradient:
`mixture_nll`, the mixture's negative log-likelihood (and its focal form), which
`fastpixel.mixture.nll` and `focal_nll` call where `fastpixel.backend.choose_loss` says; and
`shifted_conv`, PixelCNN++'s shifted convolutions with the nonlinearity before them and the
bias, skip input, class bias and gated residual after them fused, which
`fastpixel.models.pixelcnnpp.layers` calls where `fastpixel.backend.choose_conv` says.

What each computes on which tensors is an op bound once (`ops.py`: ColumnConv, ColumnCopy,
SamplePixel) that reads the pixel's position from a device tensor, so a CUDA graph can
replay it; `ops.py` does not import Triton, and the C++ engine runs the same ops. Kernels
are tested on the CPU under TRITON_INTERPRET=1 and on a GPU when one is present;
tests/test_kernels_compile.py compiles every launch the fused sampler and the loss make for
sm_80 and sm_90 on any machine.
"""
