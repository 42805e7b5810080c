"""What the masked-convolution families (PixelCNN, Gated PixelCNN) share: their config's
fields and checks, colour-ordered masks, the masked convolution, the input features, and
the per-row state their cached samplers keep for each masked convolution.

Colour ordering (van den Oord et al. 2016a): for RGB every layer's features are split into
three equal groups, one per colour; at the pixel being predicted, group c may read groups
before c (mask A, the first layer: colour c of the image is not known yet) or up to c (mask
B, every later layer). Positions before the pixel in raster order are read in full.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import categorical
from .config import JsonConfig, check_flags, check_num_classes, image_size, is_int


@dataclass
class MaskedConfig(JsonConfig):
    """Fields and checks of both masked families; each family's config sets its defaults.

    color_levels: N levels per sub-pixel (2..256), or with `categorical_inputs` the number
    of codes K (2..4096) of a map of integer codes (B, H, W), read through an embedding.
    Kernel sizes are odd; for RGB the feature counts are divisible by 3 (a group per colour).
    """

    image_size: int | tuple[int, int] = 28
    channels: int = 1
    color_levels: int = 256
    num_classes: int | None = None
    categorical_inputs: bool = False
    causal_ksize: int = 7
    hidden_ksize: int = 7
    hidden_fmaps: int = 30
    out_hidden_fmaps: int = 10
    hidden_layers: int = 6

    def __post_init__(self) -> None:
        self.image_size = image_size(self.image_size)
        if any(s <= 0 for s in self.shape):
            raise ValueError(f"image_size must be positive, got {self.image_size!r}")
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels!r}")
        check_num_classes(self.num_classes)
        check_flags(self, ("categorical_inputs",))
        most = categorical.MAX_CODES if self.categorical_inputs else categorical.MAX_IMAGE_LEVELS
        if not is_int(self.color_levels) or not 2 <= self.color_levels <= most:
            what = "codes (categorical_inputs)" if self.categorical_inputs else "colour levels"
            raise ValueError(f"color_levels must be an int from 2 to {most} {what}, got {self.color_levels!r}")
        if self.categorical_inputs and self.channels != 1:
            raise ValueError("categorical_inputs takes a map of codes: channels must be 1")
        for name, smallest in (("causal_ksize", 3), ("hidden_ksize", 1)):
            value = getattr(self, name)
            if not is_int(value) or value < smallest or value % 2 == 0:
                raise ValueError(f"{name} must be an odd int >= {smallest}, got {value!r}")
        for name in ("hidden_fmaps", "out_hidden_fmaps", "hidden_layers"):
            value = getattr(self, name)
            if not is_int(value) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name in ("hidden_fmaps", "out_hidden_fmaps"):
            if getattr(self, name) % self.channels:
                raise ValueError(f"{name} must be divisible by 3 for RGB (a group of features per colour), "
                                 f"got {getattr(self, name)}")

    @property
    def noise_channels(self) -> int:
        """Uniforms per pixel a sampler consumes: one per sub-pixel."""
        return self.channels

    @property
    def input_channels(self) -> int:
        """Channels the first layer reads: the scaled levels, or a code's embedding."""
        return self.hidden_fmaps if self.categorical_inputs else self.channels


def groups(count: int, colours: int) -> torch.Tensor:
    """The colour group of each of `count` features (equal consecutive blocks)."""
    return torch.arange(count) * colours // count


def gate_groups(half: int, colours: int) -> torch.Tensor:
    """Colour groups of a gate's 2 * half inputs: tanh half, then sigmoid half, grouped alike."""
    return groups(half, colours).repeat(2)


class MaskedConv2d(nn.Module):
    """Output (i, j) reads input rows i-kh+1 .. i and columns j-left .. j-left+kw-1; every tap
    after (i, j) is masked off, and at (i, j) itself output group g reads input groups < g
    (kind "A") or <= g ("B"). Zero padding outside the image."""

    def __init__(self, in_groups: torch.Tensor, out_groups: torch.Tensor, kernel: tuple[int, int], left: int,
                 kind: str):
        super().__init__()
        kh, kw = kernel
        self.kernel, self.left = (kh, kw), left
        bound = 1 / math.sqrt(len(in_groups) * kh * kw)  # PyTorch's default for a convolution
        self.weight = nn.Parameter(torch.empty(len(out_groups), len(in_groups), kh, kw).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(len(out_groups)).uniform_(-bound, bound))
        mask = torch.zeros(len(out_groups), len(in_groups), kh, kw)
        mask[:, :, :kh - 1] = 1
        mask[:, :, kh - 1, :left] = 1
        later = out_groups[:, None] > in_groups[None, :] if kind == "A" else out_groups[:, None] >= in_groups[None, :]
        mask[:, :, kh - 1, left] = later.float()
        self.register_buffer("mask", mask, persistent=False)  # follows from the config: not saved

    def masked_weight(self) -> torch.Tensor:
        return self.weight * self.mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kh, kw = self.kernel
        return F.conv2d(F.pad(x, (self.left, kw - 1 - self.left, kh - 1, 0)), self.masked_weight(), self.bias)


def pointwise(in_groups: torch.Tensor, out_groups: torch.Tensor) -> MaskedConv2d:
    """A 1x1 layer with mask B: group g reads groups <= g of the same position."""
    return MaskedConv2d(in_groups, out_groups, (1, 1), 0, "B")


def gate(x: torch.Tensor) -> torch.Tensor:
    """tanh(a) * sigmoid(b) of the two halves of the channel axis (dim 1)."""
    a, b = x.chunk(2, dim=1)
    return torch.tanh(a) * torch.sigmoid(b)


class InputFeatures(nn.Module):
    """What the first layer reads: the image's levels scaled to [-1, 1], or, for a prior
    over discrete codes, each code's learned embedding."""

    def __init__(self, config: MaskedConfig):
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.color_levels, config.hidden_fmaps) if config.categorical_inputs else None

    def forward(self, level: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """level: integer levels or codes (B, C, H, W) -> features (B, input_channels, H, W)."""
        if self.embedding is None:
            return categorical.scaled(level, self.config.color_levels, dtype)
        return self.embedding(level[:, 0]).permute(0, 3, 1, 2)

    def groups(self) -> torch.Tensor:
        return groups(self.config.input_channels, self.config.channels)


class MaskedFamily(nn.Module):
    """What both masked families share: the input features, the output layers (ReLU - 1x1 -
    ReLU - 1x1 to N logits per sub-pixel), and the interface fastpixel's samplers, trainer and
    tools use: forward(x, labels) -> logits (B, C, N, H, W), `levels`, `nll` and `draw`."""

    config_class: type  # the family's config
    top_features: staticmethod  # config -> features the output layers read

    def __init__(self, config: MaskedConfig):
        super().__init__()
        if not isinstance(config, self.config_class):
            raise TypeError(f"{type(self).__name__} needs a fastpixel.{self.config_class.__name__}, "
                            f"got {type(config).__name__}")
        self.config = config
        colours = config.channels
        self.inputs = InputFeatures(config)
        self.out_hidden = pointwise(groups(self.top_features(config), colours), groups(config.out_hidden_fmaps, colours))
        self.out = pointwise(groups(config.out_hidden_fmaps, colours), groups(colours * config.color_levels, colours))

    def features(self, x: torch.Tensor, labels: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The first layer's input and the labels as int64, once x and labels are checked."""
        self.check_input(x, labels)
        return self.inputs(self.levels(x), self.out.weight.dtype), None if labels is None else labels.long()

    def logits(self, top: torch.Tensor) -> torch.Tensor:
        """The output layers on the top features (B, F, H, W) -> logits (B, C, N, H, W)."""
        logits = self.out(F.relu(self.out_hidden(F.relu(top))))
        batch, _, height, width = logits.shape
        return logits.view(batch, self.config.channels, self.config.color_levels, height, width)

    def levels(self, x: torch.Tensor) -> torch.Tensor:
        """The integer levels (B, C, H, W) the model is asked to predict for input x."""
        if self.config.categorical_inputs:
            return (x if x.dim() == 4 else x.unsqueeze(1)).long()
        return categorical.levels(x, self.config.color_levels)

    def nll(self, output: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Negative log-likelihood in nats per image, (B,), of x under forward's output."""
        return categorical.nll(output, self.levels(x))

    def draw(self, output: torch.Tensor, noise: torch.Tensor, canvas: torch.Tensor, channel: int) -> torch.Tensor:
        """canvas (B, C, 1, 1) with `channel` drawn from output (B, C, N, 1, 1) with noise (B, C, 1, 1)."""
        level = categorical.draw(output[:, channel], noise[:, channel])
        canvas = canvas.clone()
        canvas[:, channel] = self.canvas_values(level, canvas.dtype)
        return canvas

    def canvas_values(self, level: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Drawn levels as the sampler's canvas holds them: codes, or [-1, 1] grid values."""
        if self.config.categorical_inputs:
            return level.to(dtype)
        return categorical.grid_values(level, self.config.color_levels, dtype)

    @property
    def substeps(self) -> int:
        """Draws per pixel: one per colour, in order (colour c is predicted from colours < c)."""
        return self.config.channels

    def check_input(self, x: torch.Tensor, labels: torch.Tensor | None) -> None:
        """Raise ValueError saying what was expected when x or labels do not fit this model."""
        from .model import check_labels
        cfg = self.config
        height, width = cfg.shape
        if cfg.categorical_inputs:
            expected = f"integer codes (batch, {height}, {width}) in 0..{cfg.color_levels - 1}"
            if (not isinstance(x, torch.Tensor) or x.is_floating_point() or x.is_complex() or x.dtype == torch.bool
                    or tuple(x.shape[-2:]) != (height, width) or not (x.dim() == 3 or (x.dim() == 4 and x.shape[1] == 1))):
                raise ValueError(f"x must hold {expected}, got {_describe(x)}")
            if x.numel() and (int(x.min()) < 0 or int(x.max()) >= cfg.color_levels):
                raise ValueError(f"x must hold {expected}, got codes from {int(x.min())} to {int(x.max())}")
        else:
            expected = f"(batch, {cfg.channels}, {height}, {width}) on the [-1, 1] grid"
            if (not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() != 4
                    or tuple(x.shape[1:]) != (cfg.channels, height, width)):
                raise ValueError(f"x must be a floating-point tensor {expected}, got {_describe(x)}")
        check_labels(cfg, labels, x.shape[0])


def _describe(x) -> str:
    return f"{x.dtype} of shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__


# --------------------------------------------------------------------------- cached sampling
class RowState:
    """One masked convolution while a cached sampler fills an image in raster order.

    It keeps its input's last kh-1 rows (a ring, zero-padded like the layer) and the current
    row, filled a pixel and a colour group at a time (not yet computed groups stay zero, and
    the mask gives them zero weight). `start_row` computes the rows-above part of the whole
    row at once, plus the bias and any per-row `extra` term; `at(j, c)` then adds the current
    row's taps for output group c at column j: a single matrix product per step.
    """

    def __init__(self, conv: MaskedConv2d, out_groups: torch.Tensor, colours: int, batch: int, width: int):
        weight = conv.masked_weight().detach()
        self.kh, kw = conv.kernel
        self.left = conv.left
        out, channels = weight.shape[:2]
        self.rows = [torch.nonzero(out_groups == c).flatten() for c in range(colours)]  # output rows of group c
        # (left+1)*Cin by out_c per group: the current row's taps at and before the centre, channels last.
        current = weight[:, :, self.kh - 1, :self.left + 1].permute(0, 2, 1).reshape(out, -1)
        self.step_weight = [current[rows].t().contiguous() for rows in self.rows]
        self.above_weight = weight[:, :, :self.kh - 1]
        self.bias = conv.bias.detach()
        self.pad = (self.left, kw - 1 - self.left)
        self.ring = weight.new_zeros(batch, channels, self.kh - 1, width + kw - 1)
        self.row = weight.new_zeros(batch, width + self.left, channels)
        self.pre: list[torch.Tensor] = []

    def start_row(self, extra: torch.Tensor | None = None) -> None:
        """Before the row's first pixel: the rows-above part, the bias and `extra` (B, out, W)
        of every column, split by output group."""
        width = self.row.shape[1] - self.left
        pre = self.bias.view(1, -1, 1).expand(self.row.shape[0], -1, width)
        if self.kh > 1:
            pre = pre + F.conv2d(self.ring, self.above_weight)[:, :, 0]
        if extra is not None:
            pre = pre + extra
        pre = pre.transpose(1, 2)
        self.pre = [pre[:, :, rows].contiguous() for rows in self.rows]
        self.row.zero_()

    def at(self, j: int, c: int) -> torch.Tensor:
        """Output group c at column j, (B, out_c)."""
        window = self.row[:, j:j + self.left + 1].reshape(self.row.shape[0], -1)
        return torch.addmm(self.pre[c][:, j], window, self.step_weight[c])

    def write(self, j: int, channels: slice, values: torch.Tensor) -> None:
        """Input channels `channels` at column j of the current row."""
        self.row[:, j + self.left, channels] = values

    def write_row(self, values: torch.Tensor) -> None:
        """The whole current row's input at once, (B, Cin, W)."""
        self.row[:, self.left:] = values.transpose(1, 2)

    def end_row(self) -> None:
        """The current row becomes the newest row above."""
        if self.kh > 1:
            self.ring = torch.cat([self.ring[:, :, 1:], F.pad(self.row[:, self.left:].transpose(1, 2), self.pad)[:, :, None]], 2)


class Pointwise:
    """A mask-B 1x1 layer during cached sampling: output group c from input groups <= c."""

    def __init__(self, conv: MaskedConv2d, out_groups: torch.Tensor, in_groups: torch.Tensor, colours: int):
        weight = conv.masked_weight().detach()[:, :, 0, 0]
        bias = conv.bias.detach()
        self.reads = [int((in_groups <= c).sum()) for c in range(colours)]
        rows = [torch.nonzero(out_groups == c).flatten() for c in range(colours)]
        self.weight = [weight[r, :n].t().contiguous() for r, n in zip(rows, self.reads)]
        self.bias = [bias[r] for r in rows]

    def at(self, x: torch.Tensor, c: int) -> torch.Tensor:
        """Output group c from x (B, Cin) (only groups <= c of it are read)."""
        return torch.addmm(self.bias[c], x[:, :self.reads[c]], self.weight[c])


def group_slice(count: int, colours: int, c: int) -> slice:
    """The features of colour group c among `count`."""
    size = count // colours
    return slice(c * size, (c + 1) * size)


class CachedSampler:
    """The loop both masked families' cached samplers share: rows, pixels, then one sub-step
    per colour. A family supplies `start_row`, `step(j, c) -> logits (B, N)` and `end_row`,
    and `inputs`, the RowState of its first layer (whose current row is the image's)."""

    inputs: RowState

    def __init__(self, model: MaskedFamily):
        self.model = model

    def rows(self, x: torch.Tensor, noise: torch.Tensor):
        """Fill the canvas x (B, C, H, W) in place; yield after each row."""
        model, config = self.model, self.model.config
        for i in range(config.shape[0]):
            self.start_row()
            for j in range(config.shape[1]):
                for c in range(config.channels):
                    level = categorical.draw(self.step(j, c), noise[:, c, i, j])
                    self.inputs.write(j, slice(c, c + 1) if not config.categorical_inputs else slice(None),
                                      model.inputs(level[:, None, None, None], self.inputs.row.dtype)[:, :, 0, 0])
                    x[:, c, i, j] = model.canvas_values(level, x.dtype)
            self.end_row()
            yield i

    def start_row(self) -> None:
        raise NotImplementedError

    def step(self, j: int, c: int) -> torch.Tensor:
        raise NotImplementedError

    def end_row(self) -> None:
        raise NotImplementedError
