"""Why the test extra asks for Triton 3.7 or newer: the kernels loop over runtime sizes
(`range(0, KW * CIN, BLOCK_K)` in kernels/column_conv.py), and Triton 3.6's interpreter turns
such a bound into an int with int() of a one-element NumPy array, which NumPy 2.4 refuses
("only 0-dimensional arrays can be converted to Python scalars"). Triton 3.7 squeezes the
array first. Measured: Triton 3.6.0 with NumPy 2.4.6 fails all the interpreted kernel tests of
column_conv; 3.6.0 with NumPy 2.3.5, and 3.7.0 and 3.9.0 with 2.4.6, pass them."""
import re
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from tests.conftest import DEVICE  # noqa: E402


@triton.jit
def _sum_first(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    total = tl.zeros((BLOCK,), dtype=tl.float32)
    for start in range(0, n, BLOCK):  # a runtime bound, as the kernels have
        offs = start + tl.arange(0, BLOCK)
        total += tl.load(x_ptr + offs, mask=offs < n, other=0.0)
    tl.store(out_ptr, tl.sum(total))


def test_the_installed_triton_runs_a_loop_over_a_runtime_size():
    x = torch.arange(10, dtype=torch.float32, device=DEVICE)
    out = torch.zeros(1, dtype=torch.float32, device=DEVICE)
    _sum_first[(1,)](x, out, 7, BLOCK=4)
    assert out.item() == sum(range(7))


def test_setup_asks_for_the_triton_whose_interpreter_runs_the_kernels():
    setup = (Path(__file__).resolve().parents[1] / "setup.py").read_text()
    assert re.search(r'_TRITON = "triton>=3\.7;', setup)
