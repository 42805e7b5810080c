"""PixelCNN with masked convolutions (van den Oord et al. 2016a).

A k x k mask-A convolution reads the image; residual blocks of ReLU - 1x1 - ReLU - k x k
(mask B) - ReLU - 1x1 follow, on a stream of 2h features (h inside the block); then
ReLU - 1x1 - ReLU - 1x1 gives N logits per sub-pixel. Class conditioning adds a learned
per-class bias after each block's k x k convolution. The masks zero every tap after the
centre, so a pixel never sees the part of the row above that lies right of the filter's
reach (the "blind spot" the gated family removes).

Its cached sampler is fastpixel/sampling/caches/pixelcnn.py.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .family import MaskedConfig, MaskedConv2d, MaskedFamily, groups, masked_outline, pointwise


@dataclass
class PixelCNNConfig(MaskedConfig):
    """A PixelCNN: hidden_fmaps is h (the residual stream carries 2h features), hidden_layers
    the number of residual blocks; 3x3 mask-B convolutions as in the paper."""

    hidden_ksize: int = 3
    hidden_fmaps: int = 48
    default_out_hidden_fmaps = 30
    hidden_layers: int = 7


def _masked(config: PixelCNNConfig, in_channels: int, out_channels: int, ksize: int, kind: str) -> MaskedConv2d:
    """A k x k masked convolution centred on its output (rows below the centre are not stored)."""
    colours = config.channels
    return MaskedConv2d(groups(in_channels, colours), groups(out_channels, colours), (ksize // 2 + 1, ksize),
                        ksize // 2, kind)


class ResidualBlock(nn.Module):
    config_class = PixelCNNConfig

    def __init__(self, config: PixelCNNConfig):
        super().__init__()
        h, colours = config.hidden_fmaps, config.channels
        self.reduce = pointwise(groups(2 * h, colours), groups(h, colours))
        self.conv = _masked(config, h, h, config.hidden_ksize, "B")
        self.expand = pointwise(groups(h, colours), groups(2 * h, colours))
        self.label_bias = None
        if config.num_classes is not None:
            self.label_bias = nn.Embedding(config.num_classes, h)
            nn.init.zeros_(self.label_bias.weight)

    def bias(self, labels: torch.Tensor | None) -> torch.Tensor | float:
        """The per-class bias (B, h) added after the k x k convolution (0 without labels)."""
        return 0.0 if self.label_bias is None else self.label_bias(labels)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        bias = self.bias(labels)
        if labels is not None:
            bias = bias[:, :, None, None]
        t = self.conv(F.relu(self.reduce(F.relu(x)))) + bias
        return x + self.expand(F.relu(t))


class PixelCNN(MaskedFamily):
    """The masked PixelCNN: forward(x, labels=None) -> logits (B, C, N, H, W), as MaskedFamily says."""

    config_class = PixelCNNConfig

    def __init__(self, config: PixelCNNConfig):
        super().__init__(config)
        self.causal = _masked(config, config.input_channels, 2 * config.hidden_fmaps, config.causal_ksize, "A")
        self.blocks = nn.ModuleList(ResidualBlock(config) for _ in range(config.hidden_layers))
        self.add_output_layers(2 * config.hidden_fmaps)

    @staticmethod
    def outline(config: PixelCNNConfig) -> tuple[int, dict[str, tuple[int, ...]]]:
        """How many tensors __init__ makes for `config`, and a few shapes that show every width
        (for fastpixel.load, as PixelCNNpp.outline says)."""
        h, ck, hk = config.hidden_fmaps, config.causal_ksize, config.hidden_ksize
        shapes = {"causal.weight": (2 * h, config.input_channels, ck // 2 + 1, ck),
                  "blocks.0.conv.weight": (h, h, hk // 2 + 1, hk)}
        own = 2 + 6 * config.hidden_layers  # causal, then reduce, conv and expand per block: weight, bias each
        return masked_outline(config, own, shapes, 2 * h, h)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        features, labels = self.features(x, labels)
        stream = self.causal(features)
        for block in self.blocks:
            stream = block(stream, labels)
        return self.logits(stream)
