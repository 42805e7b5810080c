"""The building blocks of PixelCNN++: weight-normalised shifted convolutions, the gated
residual block and the causally masked non-local block.

Every convolution is *shifted*: padded only above (and, for the down-right kind, only to
the left) so that an output never sees its own position or anything after it. The model
adds the final one-row / one-column shift that makes the dependence strict.

In a forward pass `ShiftedConv2d` and `GatedResnet` ask `fastpixel.backend.choose_conv` who
runs them: PyTorch (cuDNN) by default, or the fused Triton kernels of kernels/shifted_conv.py
(a gated block in two launches, forward and backward); nothing else here depends on which.
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from ...backend import choose_conv


# --------------------------------------------------------------------------- nonlinearities
def concat_elu(x: torch.Tensor) -> torch.Tensor:
    """ELU of x and of -x, stacked on the channel axis (keeps both signs' information)."""
    return F.elu(torch.cat([x, -x], dim=1))


NONLINEARITY = {"concat_elu": concat_elu, "elu": F.elu, "relu": F.relu}
CHANNEL_FACTOR = {"concat_elu": 2, "elu": 1, "relu": 1}


def down_shift(x: torch.Tensor) -> torch.Tensor:
    """Move every row one down (a zero row enters at the top)."""
    return F.pad(x, (0, 0, 1, 0))[:, :, :-1, :]


def right_shift(x: torch.Tensor) -> torch.Tensor:
    """Move every column one right (a zero column enters at the left)."""
    return F.pad(x, (1, 0, 0, 0))[:, :, :, :-1]


# --------------------------------------------------------------------------- weight normalisation
class _WeightNormed(nn.Module):
    """Weight normalisation (Salimans & Kingma 2016): weight = g * v / ||v||, one g per output.

    `init_scale` is the standard deviation the output gets from data-dependent
    initialisation (see `data_dependent_init`).
    """

    _out_dim = 0  # which axis of v indexes the outputs

    def __init__(self, v_shape: tuple[int, ...], init_scale: float = 1.0):
        super().__init__()
        v = torch.empty(v_shape)
        if not v.is_meta:  # on the meta device (fastpixel.load checks shapes there), drawing costs a second of imports
            v = torch.randn(v_shape) * 0.05
        self.v = nn.Parameter(v)
        out = v_shape[self._out_dim]
        self.g = nn.Parameter(torch.ones(out))
        self.b = nn.Parameter(torch.zeros(out))
        self.init_scale = init_scale
        self._initializing = False

    def direction(self) -> torch.Tensor:
        """v scaled to unit norm per output."""
        dims = [d for d in range(self.v.dim()) if d != self._out_dim]
        return self.v / torch.linalg.vector_norm(self.v, dim=dims, keepdim=True)

    def weight(self) -> torch.Tensor:
        shape = [-1 if d == self._out_dim else 1 for d in range(self.v.dim())]
        return self.direction() * self.g.view(shape)

    def linear(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The layer's map with `weight` and no bias (the cached sampler calls it on single rows)."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._initializing:
            return self._init_from(x)
        return self.linear(x, self.weight()) + self.b.view(1, -1, 1, 1)

    @torch.no_grad()
    def _init_from(self, x: torch.Tensor) -> torch.Tensor:
        # Choose g and b so that this batch's outputs have mean 0 and std init_scale per channel.
        out = self.linear(x, self.direction())
        mean = out.mean(dim=(0, 2, 3))
        scale = self.init_scale / torch.sqrt(out.var(dim=(0, 2, 3), unbiased=False) + 1e-10)
        self.g.copy_(scale)
        self.b.copy_(-mean * scale)
        return (out - mean.view(1, -1, 1, 1)) * scale.view(1, -1, 1, 1)


class Nin(_WeightNormed):
    """A 1x1 convolution ("network in network"): a dense layer applied at every position."""

    def __init__(self, in_channels: int, out_channels: int, init_scale: float = 1.0):
        super().__init__((out_channels, in_channels, 1, 1), init_scale)

    def linear(self, x, weight):
        return F.conv2d(x, weight)


class ShiftedConv2d(_WeightNormed):
    """A convolution padded so that output (i, j) sees only rows <= i, and, for
    `shift="down_right"`, only columns <= j as well; `shift="down"` is centred horizontally."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: tuple[int, int],
                 shift: str = "down", stride: int = 1, init_scale: float = 1.0):
        super().__init__((out_channels, in_channels, *kernel_size), init_scale)
        kh, kw = kernel_size
        if shift == "down":
            self.padding = ((kw - 1) // 2, (kw - 1) // 2, kh - 1, 0)  # left, right, top, bottom
        elif shift == "down_right":
            self.padding = (kw - 1, 0, kh - 1, 0)
        else:
            raise ValueError(f"shift must be 'down' or 'down_right', got {shift!r}")
        self.kernel_size, self.shift, self.stride = kernel_size, shift, stride

    def linear(self, x, weight):
        return F.conv2d(F.pad(x, self.padding), weight, stride=self.stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fused = None if self._initializing else _fused_convs(x)
        if fused is None:
            return super().forward(x)
        return fused.conv(x, self.weight(), self.b, self.padding, self.stride)


class ShiftedConvTranspose2d(_WeightNormed):
    """A stride-2 transposed convolution, cropped so that it doubles the resolution while
    keeping the same one-sided dependence as `ShiftedConv2d`."""

    _out_dim = 1  # ConvTranspose2d weights are (in, out, kh, kw)

    def __init__(self, in_channels: int, out_channels: int, kernel_size: tuple[int, int],
                 shift: str = "down", init_scale: float = 1.0):
        super().__init__((in_channels, out_channels, *kernel_size), init_scale)
        if shift not in ("down", "down_right"):
            raise ValueError(f"shift must be 'down' or 'down_right', got {shift!r}")
        self.kernel_size, self.shift = kernel_size, shift

    def linear(self, x, weight):
        kh, kw = self.kernel_size
        out = F.conv_transpose2d(x, weight, stride=2, output_padding=1)
        height, width = 2 * x.shape[2], 2 * x.shape[3]
        left = (kw - 1) // 2 if self.shift == "down" else 0
        return out[:, :, :height, left:left + width]


def _fused_convs(x: torch.Tensor):
    """kernels/shifted_conv.py where fastpixel.backend.choose_conv picks Triton, else None."""
    if choose_conv(x.device) != "triton":
        return None
    from ...kernels import shifted_conv  # imports Triton: only when it runs
    return shifted_conv


@contextlib.contextmanager
def data_dependent_init(module: nn.Module):
    """Within this block, every weight-normalised layer's next forward pass sets its g and b
    from the statistics of the batch it sees (the original PixelCNN++'s initialisation)."""
    layers = [m for m in module.modules() if isinstance(m, _WeightNormed)]
    for layer in layers:
        layer._initializing = True
    try:
        yield
    finally:
        for layer in layers:
            layer._initializing = False


# --------------------------------------------------------------------------- blocks
class GatedResnet(nn.Module):
    """x + a * sigmoid(b), with (a, b) from two shifted convolutions of x, a skip input
    through a 1x1 layer, and, for class-conditional models, a learned per-class bias."""

    def __init__(self, channels: int, kernel_size: tuple[int, int], shift: str, nonlinearity: str,
                 dropout: float, skip_channels: int = 0, num_classes: int | None = None):
        super().__init__()
        factor = self.channel_factor = CHANNEL_FACTOR[nonlinearity]
        self.nonlinearity, self.nonlinearity_name = NONLINEARITY[nonlinearity], nonlinearity
        self.conv_in = ShiftedConv2d(factor * channels, channels, kernel_size, shift)
        self.skip = Nin(factor * skip_channels, channels) if skip_channels else None
        self.dropout = nn.Dropout(dropout)
        self.conv_out = ShiftedConv2d(factor * channels, 2 * channels, kernel_size, shift, init_scale=0.1)
        self.class_bias = None
        if num_classes is not None:
            bias = torch.empty(num_classes, 2 * channels)
            if not bias.is_meta:  # no drawing on the meta device (see _WeightNormed)
                bias.normal_()  # nn.Embedding's own first draw, kept so that a seed gives the same model as before
                bias.normal_(0.0, 0.05)
            self.class_bias = nn.Embedding(num_classes, 2 * channels, _weight=bias)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None,
                labels: torch.Tensor | None = None) -> torch.Tensor:
        # The fused kernels (two launches) apply no dropout: with dropout on, PyTorch runs the block.
        dropping = self.training and self.dropout.p > 0
        fused = None if self.conv_in._initializing or dropping else _fused_convs(x)
        if fused is not None:
            return self._fused_forward(fused, x, skip, labels)
        c = self.conv_in(self.nonlinearity(x))
        if self.skip is not None:
            c = c + self.skip(self.nonlinearity(skip))
        c = self.conv_out(self.dropout(self.nonlinearity(c)))
        if self.class_bias is not None:
            c = c + self.class_bias(labels)[:, :, None, None]
        a, b = c.chunk(2, dim=1)
        return x + a * torch.sigmoid(b)

    def _fused_forward(self, fused, x, skip, labels):
        nl, bias, skip_input = self.nonlinearity_name, self.conv_in.b, None
        if self.skip is not None:
            bias = bias + self.skip.b
            skip_input = (skip, self.skip.weight().flatten(1), nl)
        c = fused.conv(x, self.conv_in.weight(), bias, self.conv_in.padding, 1, nl, skip_input)
        class_bias = None if self.class_bias is None else self.class_bias(labels)
        return fused.gated_conv(c, self.conv_out.weight(), self.conv_out.b, self.conv_out.padding, x, nl, class_bias)


class CausalNonLocal(nn.Module):
    """Embedded-Gaussian non-local block (Wang et al. 2018) with a causal mask: the query at
    raster position p attends only to keys at positions <= p. Applied to features that
    already obey the causal invariant, its output at p depends only on what p's own
    features depend on, so the invariant survives."""

    def __init__(self, channels: int):
        super().__init__()
        inner = max(channels // 2, 1)
        self.query = Nin(channels, inner)
        self.key = Nin(channels, inner)
        self.value = Nin(channels, inner)
        self.out = Nin(inner, channels, init_scale=0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = x.shape
        q, k, v = (f(x).flatten(2) for f in (self.query, self.key, self.value))  # (B, d, N)
        scores = torch.einsum("bdi,bdj->bij", q, k) / math.sqrt(q.shape[1])
        n = height * width
        future = torch.ones(n, n, dtype=torch.bool, device=x.device).triu(1)
        attn = scores.masked_fill(future, float("-inf")).softmax(dim=-1)
        y = torch.einsum("bij,bdj->bdi", attn, v).view(batch, -1, height, width)
        return x + self.out(y)


def fused_launch_specs(model: nn.Module, x: torch.Tensor, labels: torch.Tensor | None = None) -> list[tuple]:
    """Every distinct launch of kernels/shifted_conv.py that a training step of `model` on
    x (and labels) makes, forward and backward, for `triton.compile`
    (tests/test_kernels_compile.py). Pass a model and tensors on the meta device: no memory."""
    from ...kernels import shifted_conv

    inside_blocks = {id(c) for m in model.modules() if isinstance(m, GatedResnet) for c in (m.conv_in, m.conv_out)}
    layers = [m for m in model.modules() if isinstance(m, GatedResnet)
              or (isinstance(m, ShiftedConv2d) and id(m) not in inside_blocks)]
    calls = []
    hooks = [m.register_forward_pre_hook(lambda m, args, kwargs: calls.append((m, args, kwargs)), with_kwargs=True)
             for m in layers]
    try:
        model(x, labels)
    finally:
        for hook in hooks:
            hook.remove()
    return shifted_conv.aot_specs(calls)
