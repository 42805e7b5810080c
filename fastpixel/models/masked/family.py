"""What the masked-convolution families (PixelCNN, Gated PixelCNN) share: their config's
fields and checks, colour-ordered masks, the masked convolution, the input features and
the output layers. Their cached samplers' common parts are in
fastpixel/sampling/caches/masked.py.

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

from ..config import JsonConfig, check_channels, check_flags, check_labels, check_num_classes, image_size, is_int
from . import categorical


@dataclass
class MaskedConfig(JsonConfig):
    """Fields and checks of both masked families; each family's config sets its defaults.

    color_levels: N levels per sub-pixel (2..256), or with `categorical_inputs` the number
    of codes K (2..4096) of a map of integer codes (B, H, W), read through an embedding.
    Kernel sizes are odd; for RGB the feature counts are divisible by 3 (a group per colour).
    out_hidden_fmaps=None takes the family's count rounded up to a multiple of the channels,
    so that the defaults hold for RGB too.
    """

    image_size: int | tuple[int, int] = 28
    channels: int = 1
    color_levels: int = 256
    num_classes: int | None = None
    categorical_inputs: bool = False
    causal_ksize: int = 7
    hidden_ksize: int = 7
    hidden_fmaps: int = 30
    out_hidden_fmaps: int | None = None
    hidden_layers: int = 6
    default_out_hidden_fmaps = 10  # not a field: what out_hidden_fmaps=None means, before rounding

    def __post_init__(self) -> None:
        self.image_size = image_size(self.image_size)
        if any(s <= 0 for s in self.shape):
            raise ValueError(f"image_size must be positive, got {self.image_size!r}")
        check_channels(self.channels)
        if self.out_hidden_fmaps is None:
            self.out_hidden_fmaps = -(-self.default_out_hidden_fmaps // self.channels) * self.channels
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


def masked_outline(config: MaskedConfig, own: int, shapes: dict[str, tuple[int, ...]], top_features: int,
                   label_features: int) -> tuple[int, dict[str, tuple[int, ...]]]:
    """A masked model's `outline`, given its own layers' tensor count and telling shapes: adds
    what every masked model has (the input embedding, a label bias per block, and the output
    layers reading `top_features`)."""
    labelled = config.num_classes is not None
    shapes = {**shapes, "out_hidden.weight": (config.out_hidden_fmaps, top_features, 1, 1)}
    if labelled:
        shapes["blocks.0.label_bias.weight"] = (config.num_classes, label_features)
    shared = config.categorical_inputs + labelled * config.hidden_layers + 4  # out_hidden and out: weight, bias each
    return own + shared, shapes


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


def gate(x: torch.Tensor, dim: int = 1, out: torch.Tensor | None = None) -> torch.Tensor:
    """tanh(a) * sigmoid(b) of the two halves of the channel axis (dim 1), into `out` if given."""
    a, b = x.chunk(2, dim=dim)
    return torch.mul(torch.tanh(a), torch.sigmoid(b), out=out)


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


class MaskedFamily(nn.Module):
    """What both masked families share: the input features, the output layers (ReLU - 1x1 -
    ReLU - 1x1 to N logits per sub-pixel), and the interface fastpixel's samplers, trainer and
    tools use: forward(x, labels) -> logits (B, C, N, H, W), `levels`, `nll` and `draw`.

    x: images on the 256-level grid in [-1, 1] (B, C, H, W), or integer codes (B, H, W) with
    `categorical_inputs`; the logits of sub-pixel (p, c) depend only on the sub-pixels before
    it in raster order, colours in order within a pixel."""

    config_class: type  # the family's config

    def __init__(self, config: MaskedConfig):
        super().__init__()
        if not isinstance(config, self.config_class):
            raise TypeError(f"{type(self).__name__} needs a fastpixel.{self.config_class.__name__}, "
                            f"got {type(config).__name__}")
        self.config = config
        self.inputs = InputFeatures(config)

    def add_output_layers(self, top_features: int) -> None:
        """The output layers, built last so that parameters are registered from input to output
        (a saved optimiser state maps onto them by that order)."""
        config, colours = self.config, self.config.channels
        self.out_hidden = pointwise(groups(top_features, colours), groups(config.out_hidden_fmaps, colours))
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

    def log_prob(self, output: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """log P of each sub-pixel of x given what precedes it, (B, C, H, W), under forward's output."""
        return categorical.log_prob(output, self.levels(x))

    def level_pmf(self, logits: torch.Tensor, channel: int, earlier: torch.Tensor) -> torch.Tensor:
        """A sub-pixel over its N levels, (B, N) float64, from its logits (B, N), which the
        sampler computed given the earlier colours already (the codec's probability model)."""
        return categorical.pmf(logits)

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
        cfg = self.config
        height, width = cfg.shape
        if cfg.categorical_inputs:
            expected = f"integer codes (batch, {height}, {width}) in 0..{cfg.color_levels - 1}"
            if (not isinstance(x, torch.Tensor) or x.is_floating_point() or x.is_complex() or x.dtype == torch.bool
                    or tuple(x.shape[-2:]) != (height, width) or not (x.dim() == 3 or (x.dim() == 4 and x.shape[1] == 1))):
                raise ValueError(f"x must hold {expected}, got {_describe(x)}")
            if x.numel() and not x.is_meta and (int(x.min()) < 0 or int(x.max()) >= cfg.color_levels):  # meta: shapes only
                raise ValueError(f"x must hold {expected}, got codes from {int(x.min())} to {int(x.max())}")
        else:
            expected = f"(batch, {cfg.channels}, {height}, {width}) on the [-1, 1] grid"
            if (not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() != 4
                    or tuple(x.shape[1:]) != (cfg.channels, height, width)):
                raise ValueError(f"x must be a floating-point tensor {expected}, got {_describe(x)}")
        check_labels(cfg, labels, x.shape[0])


def _describe(x) -> str:
    return f"{x.dtype} of shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
