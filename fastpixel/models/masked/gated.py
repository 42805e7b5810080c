"""The conditional Gated PixelCNN (van den Oord et al. 2016b).

Two stacks and no blind spot: the vertical stack sees only the rows above a pixel (its
convolutions cover k columns of the rows above, and later blocks also their input's own
row, which itself depends only on rows above); the horizontal stack sees the pixels to the
left on the current row (masked 1 x (k//2 + 1) convolutions) and, through a 1x1 link, the
vertical stack. Each gated block computes tanh(a) * sigmoid(b) on both stacks, adds a learned
per-class bias, keeps a residual on the horizontal stack and emits a skip connection. The
first ("causal") block reads the image with mask A and has no residual, skip or label bias.
The skips are summed and go through ReLU - 1x1 - ReLU - 1x1 to N logits per sub-pixel.

Its cached sampler is fastpixel/sampling/caches/gated.py.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .family import MaskedConfig, MaskedConv2d, MaskedFamily, gate, gate_groups, groups, masked_outline, pointwise


@dataclass
class GatedConfig(MaskedConfig):
    """A Gated PixelCNN. hidden_fmaps is p: each stack carries p features. The defaults (7x7
    kernels, p = 30, 6 gated blocks, 10 output features (12 for RGB), 256 levels) are a small model that
    trains on MNIST on a CPU; `mnist-gated` is larger (5x5, p = 48, 7 blocks, 64)."""


class VerticalConv(nn.Module):
    """Output row i reads input rows i-k//2 .. i-1 (`above_only`, for the image) or
    i-k//2 .. i (for a vertical stack, whose row i already depends only on rows above),
    across the k columns centred on the output's."""

    def __init__(self, in_channels: int, out_channels: int, ksize: int, above_only: bool):
        super().__init__()
        r = ksize // 2
        self.rows = r if above_only else r + 1
        self.conv = nn.Conv2d(in_channels, out_channels, (self.rows, ksize))
        self.pad = (r, r, r, -1 if above_only else 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, self.pad))


class GatedBlock(nn.Module):
    """The causal block (mask A; no skip, residual or label bias) or a gated block; the last
    block has no residual either, since nothing reads its horizontal output but its skip."""

    def __init__(self, config: GatedConfig, causal: bool, last: bool = False):
        super().__init__()
        p, colours = config.hidden_fmaps, config.channels
        in_channels = config.input_channels if causal else p
        ksize = config.causal_ksize if causal else config.hidden_ksize
        self.vertical = VerticalConv(in_channels, 2 * p, ksize, above_only=causal)
        self.horizontal = MaskedConv2d(groups(in_channels, colours), gate_groups(p, colours), (1, ksize // 2 + 1),
                                       ksize // 2, "A" if causal else "B")
        self.link = nn.Conv2d(2 * p, 2 * p, 1)  # the vertical stack knows nothing of the current row: no mask
        self.skip = self.residual = self.label_bias = None
        if not causal:
            self.skip = pointwise(groups(p, colours), groups(p, colours))
            if not last:
                self.residual = pointwise(groups(p, colours), groups(p, colours))
            if config.num_classes is not None:
                self.label_bias = nn.Embedding(config.num_classes, 2 * p)
                nn.init.zeros_(self.label_bias.weight)

    def bias(self, labels: torch.Tensor | None) -> torch.Tensor | float:
        """The per-class bias (B, 2p) both stacks add before the gate (0 without labels)."""
        return 0.0 if self.label_bias is None else self.label_bias(labels)


class GatedPixelCNN(MaskedFamily):
    """The Gated PixelCNN: forward(x, labels=None) -> logits (B, C, N, H, W), as MaskedFamily says."""

    config_class = GatedConfig

    def __init__(self, config: GatedConfig):
        super().__init__(config)
        self.causal = GatedBlock(config, causal=True)
        self.blocks = nn.ModuleList(GatedBlock(config, causal=False, last=n == config.hidden_layers - 1)
                                    for n in range(config.hidden_layers))
        self.add_output_layers(config.hidden_fmaps)

    @staticmethod
    def outline(config: GatedConfig) -> tuple[int, dict[str, tuple[int, ...]]]:
        """How many tensors __init__ makes for `config`, and a few shapes that show every width
        (for fastpixel.load, as PixelCNNpp.outline says)."""
        p, ck, hk = config.hidden_fmaps, config.causal_ksize, config.hidden_ksize
        shapes = {"causal.vertical.conv.weight": (2 * p, config.input_channels, ck // 2, ck),
                  "blocks.0.vertical.conv.weight": (2 * p, p, hk // 2 + 1, hk)}
        own = 6 + 10 * config.hidden_layers - 2  # weight and bias of each vertical, horizontal, link, skip and residual
        return masked_outline(config, own, shapes, p, 2 * p)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, C, N, H, W) of every sub-pixel's N levels given the pixels before it, for
        images x (B, C, H, W) on the [-1, 1] grid (codes (B, H, W) for a prior over codes) and
        one label per image for a class-conditional model. The vertical stack sees the rows
        above, the horizontal stack the pixels to the left: no blind spot."""
        features, labels = self.features(x, labels)
        vertical = self.causal.vertical(features)
        h = gate(self.causal.horizontal(features) + self.causal.link(vertical))
        v = gate(vertical)
        skips = 0.0
        for block in self.blocks:
            vertical = block.vertical(v)
            bias = block.bias(labels)
            if labels is not None:
                bias = bias[:, :, None, None]
            gated = gate(block.horizontal(h) + block.link(vertical) + bias)
            v = gate(vertical + bias)
            skips = skips + block.skip(gated)
            if block.residual is not None:
                h = h + block.residual(gated)
        return self.logits(skips)
