"""PixelCNN's cached sampler: at the start of each row, every k x k convolution's taps on
the rows above for the whole row; per pixel and colour group c, the current row's taps and
group c of the 1x1 layers."""
from __future__ import annotations

import torch

from ...models.masked.family import groups
from ...models.masked.pixelcnn import PixelCNN
from .masked import CachedSampler, Pointwise, Product, RowState, Runs, group_slice


class CachedPixelCNN(CachedSampler):
    """A PixelCNN unrolled for sampling: per pixel and colour group c, group c of every layer."""

    def __init__(self, model: PixelCNN, batch: int, labels: torch.Tensor | None):
        config = model.config
        h, colours, width = config.hidden_fmaps, config.channels, config.shape[1]
        stream, inner = groups(2 * h, colours), groups(h, colours)
        with torch.no_grad():
            self.convs = [RowState(b.conv, inner, colours, batch, width, bias=b.bias(labels)) for b in model.blocks]
        self.reduce = [Pointwise(b.reduce, inner, stream, colours) for b in model.blocks]
        self.expand = [Pointwise(b.expand, stream, inner, colours) for b in model.blocks]
        like = model.out.weight.detach()
        self.stream = like.new_zeros(batch, len(model.blocks) + 1, 2 * h)  # this pixel's stream, per block
        self.inner = like.new_zeros(batch, len(model.blocks), h)            # this pixel's k x k outputs
        self.h, self.colours = h, colours
        super().__init__(model, RowState(model.causal, stream, colours, batch, width), self.stream[:, -1])

    def products(self, c: int) -> list[Product]:
        outer, inner = group_slice(2 * self.h, self.colours, c), group_slice(self.h, self.colours, c)
        plan = [self.inputs.product(c, Runs.of(self.stream[:, 0, outer]))]
        for n, conv in enumerate(self.convs):
            plan += [self.reduce[n].product(c, self.stream[:, n], conv.input(inner), relu_a=True, epilogue="relu"),
                     conv.product(c, Runs.of(self.inner[:, n, inner]), epilogue="relu"),
                     self.expand[n].product(c, self.inner[:, n], Runs.of(self.stream[:, n + 1, outer]),
                                            init=Runs.of(self.stream[:, n, outer]))]
        return plan

    @torch.no_grad()
    def start_row(self) -> None:
        for conv in [self.inputs, *self.convs]:
            conv.start_row()

    def end_row(self) -> None:
        for conv in [self.inputs, *self.convs]:
            conv.end_row()
