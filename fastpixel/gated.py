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

from .masked import (CachedSampler, MaskedConfig, MaskedConv2d, MaskedFamily, Pointwise, Product,
                     RowState, Runs, gate, gate_groups, group_slice, groups, pointwise, row_windows, shift_up,
                     window_matrix)


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
            if block.residual is not None:
                h = h + block.residual(gated)
        return self.logits(skips)

    def cached_sampler(self, batch: int, labels: torch.Tensor | None) -> "CachedGated":
        return CachedGated(self, batch, labels)


class _Vertical:
    """A vertical convolution's input rows during cached sampling (B, rows, W + 2r, Cin), its
    kernel height of them, channels last; `output()` is its output row as one product."""

    def __init__(self, conv: VerticalConv, batch: int, channels: int, width: int, like: torch.Tensor):
        self.kw, self.pad = conv.conv.kernel_size[1], conv.pad[0]
        self.rows = like.new_zeros(batch, conv.rows, width + 2 * self.pad, channels)
        self.weight, self.bias = window_matrix(conv.conv.weight.detach()), conv.conv.bias.detach()
        self.out = like.new_empty(batch * width, self.weight.shape[1])

    def newest(self) -> torch.Tensor:
        """Every row moves up one; returns the newest (B, W, Cin), to be written."""
        shift_up(self.rows)
        return self.rows[:, -1, self.pad:self.rows.shape[2] - self.pad]

    def output(self) -> torch.Tensor:
        """The output row, (B * W, Cout)."""
        return torch.addmm(self.bias, row_windows(self.rows, self.kw), self.weight, out=self.out)


class CachedGated(CachedSampler):
    """A GatedPixelCNN unrolled for sampling: per row, every block's vertical stack and the
    terms the horizontal stack adds from it (link, biases); per pixel and colour group c,
    group c of every block's horizontal stack (gate written into the next block's row, or
    into `gated`, then the residual), all skips in one product, and the output layers."""

    def __init__(self, model: GatedPixelCNN, batch: int, labels: torch.Tensor | None):
        config = model.config
        p, colours, width = config.hidden_fmaps, config.channels, config.shape[1]
        like = model.out.weight.detach()
        blocks = [model.causal, *model.blocks]
        with torch.no_grad():
            self.label_bias = [0.0] + [b.bias(labels) for b in model.blocks]
        self.vertical = [_Vertical(b.vertical, batch, config.input_channels if n == 0 else p, width, like)
                         for n, b in enumerate(blocks)]
        self.link = [b.link.weight.detach()[:, :, 0, 0].t().contiguous() for b in blocks]
        self.horizontal = [RowState(b.horizontal, gate_groups(p, colours), colours, batch, width,
                                    bias=b.link.bias.detach() + bias) for b, bias in zip(blocks, self.label_bias)]
        hidden = groups(p, colours)
        self.residual = [Pointwise(b.residual, hidden, hidden, colours) for b in model.blocks[:-1]]
        self.skip = [Pointwise(b.skip, hidden, hidden, colours) for b in model.blocks]
        self.gated = like.new_zeros(batch, len(model.blocks), p)  # this pixel's gate outputs, per block
        self.skips = like.new_zeros(batch, p)
        self.p, self.colours = p, colours
        super().__init__(model, self.horizontal[0], self.skips)

    def products(self, c: int) -> list[Product]:
        group = group_slice(self.p, self.colours, c)
        rows = self.horizontal
        plan = [rows[0].product(c, rows[1].input(group), epilogue="gate")]  # the causal block: no residual
        last = len(rows) - 2
        for n in range(last + 1):
            plan.append(rows[n + 1].product(c, Runs.of(self.gated[:, n, group]), epilogue="gate"))
            if n < last:  # the last block's horizontal output feeds nothing but its skip
                plan.append(self.residual[n].product(c, self.gated[:, n], rows[n + 2].input(group),
                                                     init=rows[n + 1].input(group)))
        reads = self.skip[0].reads[c]
        plan.append(Product(Runs.of(self.gated[:, :, :reads]), torch.cat([s.weight[c] for s in self.skip]),
                            Runs.of(self.skips[:, group]), bias=sum(s.bias[c] for s in self.skip)))
        return plan

    @torch.no_grad()
    def start_row(self) -> None:
        batch, width = self.skips.shape[0], self.config.shape[1]
        for n, (vertical, horizontal) in enumerate(zip(self.vertical, self.horizontal)):
            out = vertical.output()
            horizontal.start_row((out, self.link[n]))
            if n + 1 < len(self.vertical):  # the next block's vertical input: this row's gate
                x = out.view(batch, width, -1)
                bias = self.label_bias[n]
                gate(x if isinstance(bias, float) else x + bias[:, None], dim=2, out=self.vertical[n + 1].newest())

    def end_row(self) -> None:
        left, width = self.inputs.left, self.config.shape[1]
        self.vertical[0].newest().copy_(self.inputs.row[:, left:left + width])
        for horizontal in self.horizontal:
            horizontal.end_row()
