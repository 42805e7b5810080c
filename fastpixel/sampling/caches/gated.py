"""The Gated PixelCNN's cached sampler: the vertical stack a row at a time (once the row
above is final), the horizontal stack a pixel and a colour group at a time."""
from __future__ import annotations

import torch

from ...models.masked.family import gate, gate_groups, groups
from ...models.masked.gated import GatedPixelCNN, VerticalConv
from .masked import CachedSampler, Pointwise, Product, RowState, Runs, group_slice, row_windows, shift_up, window_matrix


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
