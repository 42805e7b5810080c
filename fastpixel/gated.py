"""The conditional Gated PixelCNN (van den Oord et al. 2016b) and its cached sampler.

Two stacks and no blind spot: the vertical stack sees only the rows above a pixel (its
convolutions cover k columns of the rows above, and later blocks also their input's own
row, which itself depends only on rows above); the horizontal stack sees the pixels to the
left on the current row (masked 1 x (k//2 + 1) convolutions) and, through a 1x1 link, the
vertical stack. Each gated block computes tanh(a) * sigmoid(b) on both stacks, adds a learned
per-class bias, keeps a residual on the horizontal stack and emits a skip connection. The
first ("causal") block reads the image with mask A and has no residual, skip or label bias.
The skips are summed and go through ReLU - 1x1 - ReLU - 1x1 to N logits per sub-pixel.

The cached sampler runs the vertical stack a row at a time (once the row above is final)
and the horizontal stack a pixel and a colour group at a time.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .masked import (CachedSampler, MaskedConfig, MaskedConv2d, MaskedFamily, Pointwise, RowState,
                     gate, gate_groups, group_slice, groups, pointwise)


@dataclass
class GatedConfig(MaskedConfig):
    """A Gated PixelCNN; the defaults are those of the gated PixelCNN seed's command line, but
    with 256 levels (its default is 2). hidden_fmaps is p: each stack carries p features."""


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
    def __init__(self, config: GatedConfig, causal: bool):
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
            self.residual = pointwise(groups(p, colours), groups(p, colours))
            if config.num_classes is not None:
                self.label_bias = nn.Embedding(config.num_classes, 2 * p)
                nn.init.zeros_(self.label_bias.weight)

    def bias(self, labels: torch.Tensor | None) -> torch.Tensor | float:
        """The per-class bias (B, 2p) both stacks add before the gate (0 without labels)."""
        return 0.0 if self.label_bias is None else self.label_bias(labels)


class GatedPixelCNN(MaskedFamily):
    """forward(x, labels=None) -> logits (B, C, N, H, W).

    x: images on the 256-level grid in [-1, 1] (B, C, H, W), or integer codes (B, H, W) with
    `categorical_inputs`; the logits of sub-pixel (p, c) depend only on the sub-pixels
    before it in raster order, colours in order within a pixel."""

    config_class = GatedConfig
    top_features = staticmethod(lambda config: config.hidden_fmaps)

    def __init__(self, config: GatedConfig):
        super().__init__(config)
        self.causal = GatedBlock(config, causal=True)
        self.blocks = nn.ModuleList(GatedBlock(config, causal=False) for _ in range(config.hidden_layers))

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
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
            h = h + block.residual(gated)
        return self.logits(skips)

    def cached_sampler(self, batch: int, labels: torch.Tensor | None) -> "CachedGated":
        return CachedGated(self, batch, labels)


class _Vertical:
    """A vertical convolution's input rows during cached sampling (a ring of its kernel height)."""

    def __init__(self, conv: VerticalConv, batch: int, channels: int, width: int, like: torch.Tensor):
        self.conv, self.pad = conv.conv, conv.pad[:2]
        self.ring = like.new_zeros(batch, channels, conv.rows, width + conv.pad[0] + conv.pad[1])

    def push(self, row: torch.Tensor) -> None:
        """row (B, Cin, W) becomes the newest input row."""
        self.ring = torch.cat([self.ring[:, :, 1:], F.pad(row, self.pad)[:, :, None]], 2)

    def output(self) -> torch.Tensor:
        return self.conv(self.ring)[:, :, 0]


class CachedGated(CachedSampler):
    """A GatedPixelCNN unrolled for sampling: per row, every block's vertical stack and the
    terms the horizontal stack adds from it (link, biases); per pixel and colour group c,
    group c of every block's horizontal stack, then of the skips and output layers.

    A step is a few PyTorch operations per block, each writing where the next one reads:
    the gate writes into `gated` (whose column 0 holds ones, so that the residual's and the
    skips' biases ride in their products) and the residual into the next block's row."""

    def __init__(self, model: GatedPixelCNN, batch: int, labels: torch.Tensor | None):
        super().__init__(model)
        config = model.config
        p, colours, width = config.hidden_fmaps, config.channels, config.shape[1]
        like = model.out.weight.detach()
        self.blocks = [model.causal, *model.blocks]
        self.vertical = [_Vertical(model.causal.vertical, batch, config.input_channels, width, like)]
        self.vertical += [_Vertical(b.vertical, batch, p, width, like) for b in model.blocks]
        self.horizontal = [RowState(b.horizontal, gate_groups(p, colours), colours, batch, width) for b in self.blocks]
        self.inputs = self.horizontal[0]
        hidden = groups(p, colours)
        reads = [int((hidden <= c).sum()) for c in range(colours)]
        # Weights over [1, gate outputs of groups <= c]: the bias, then the masked 1x1 weights.
        self.residual = [[_with_bias(b.residual, hidden, c, n) for c, n in enumerate(reads)] for b in model.blocks]
        self.skip = [torch.stack([_with_bias(b.skip, hidden, c, n) for b in model.blocks]) for c, n in enumerate(reads)]
        self.reads = [n + 1 for n in reads]
        self.out_hidden = Pointwise(model.out_hidden, groups(config.out_hidden_fmaps, colours), hidden, colours)
        self.out = Pointwise(model.out, groups(colours * config.color_levels, colours),
                             groups(config.out_hidden_fmaps, colours), colours)
        with torch.no_grad():
            self.label_bias = [b.bias(labels) for b in model.blocks]
        self.gated = like.new_zeros(len(model.blocks), batch, 1 + p)  # this pixel's gate outputs, per block
        self.gated[:, :, 0] = 1
        self.skips = like.new_zeros(batch, p)
        self.hidden = like.new_zeros(batch, config.out_hidden_fmaps)
        self.p, self.colours = p, colours

    @torch.no_grad()
    def start_row(self) -> None:
        vertical = self.vertical[0].output()
        v = gate(vertical)
        self.horizontal[0].start_row(self._link(self.blocks[0], vertical))
        for n, block in enumerate(self.blocks[1:]):
            self.vertical[n + 1].push(v)
            vertical = self.vertical[n + 1].output()
            bias = self.label_bias[n]
            if not isinstance(bias, float):
                bias = bias[:, :, None]
            self.horizontal[n + 1].start_row(self._link(block, vertical) + bias)
            v = gate(vertical + bias)

    @staticmethod
    def _link(block: GatedBlock, vertical: torch.Tensor) -> torch.Tensor:
        return F.conv2d(vertical[:, :, None], block.link.weight, block.link.bias)[:, :, 0].detach()

    @torch.no_grad()
    def step(self, j: int, c: int) -> torch.Tensor:
        group = group_slice(self.p, self.colours, c)
        gated_group = slice(1 + group.start, 1 + group.stop)
        reads = self.reads[c]
        rows = self.horizontal
        _gate_into(rows[0].at(j, c), rows[1].row[:, j + rows[1].left, group])  # the causal block: no residual
        last = len(rows) - 2
        for n in range(last + 1):
            _gate_into(rows[n + 1].at(j, c), self.gated[n, :, gated_group])
            if n < last:  # the last block's horizontal output feeds nothing but its skip
                here = rows[n + 1].row[:, j + rows[n + 1].left, group]
                torch.addmm(here, self.gated[n, :, :reads], self.residual[n][c],
                            out=rows[n + 2].row[:, j + rows[n + 2].left, group])
        torch.sum(torch.bmm(self.gated[:, :, :reads], self.skip[c]), dim=0, out=self.skips[:, group])
        out_group = group_slice(self.hidden.shape[1], self.colours, c)
        torch.clamp(self.out_hidden.at(torch.relu(self.skips), c), min=0, out=self.hidden[:, out_group])
        return self.out.at(self.hidden, c)

    def end_row(self) -> None:
        self.vertical[0].push(self.inputs.row[:, self.inputs.left:].transpose(1, 2))


def _gate_into(x: torch.Tensor, out: torch.Tensor) -> None:
    """tanh(a) * sigmoid(b) of x's halves, written into `out`."""
    a, b = x.chunk(2, dim=1)
    torch.mul(torch.tanh(a), torch.sigmoid(b), out=out)


def _with_bias(conv, in_groups: torch.Tensor, c: int, reads: int) -> torch.Tensor:
    """A mask-B 1x1 layer's group-c outputs as one matrix over [1, inputs of groups <= c]."""
    weight = conv.masked_weight().detach()[:, :, 0, 0]
    rows = torch.nonzero(in_groups == c).flatten()  # input and output groups are alike here
    return torch.cat([conv.bias.detach()[rows, None], weight[rows, :reads]], dim=1).t().contiguous()
