"""What the masked families' cached samplers share (PixelCNN: caches/pixelcnn.py, Gated
PixelCNN: caches/gated.py): the per-row state of each masked convolution, the sub-step as a
plan of products over buffers allocated once, and the output layers and draw.

A sub-step (one pixel, one colour group) is a plan: a list of `Product`s, then the
categorical draw. Who runs the plan is an engine's business (fastpixel/sampling/engines):
PyTorch op by op, or the C++ engine a whole pixel, draws included, in one call; both run
the same plan on the same buffers.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ...models.masked.family import MaskedConv2d, MaskedFamily, gate, groups


@dataclass(frozen=True)
class Runs:
    """Each image's values at the current column j: `view` (B, count, length) holds them at
    column 0 (`count` runs of `length` contiguous elements), and column j's lie `column * j`
    elements further (column 0: the same values at every column)."""

    view: torch.Tensor
    column: int = 0

    @staticmethod
    def of(t: torch.Tensor, column: int = 0) -> "Runs":
        """Runs of a (B, K) view (one run) or a (B, count, length) one."""
        view = t if t.dim() == 3 else t[:, None]
        if view.shape[2] > 1 and view.stride(2) != 1:
            raise ValueError("a run's elements must be contiguous")
        return Runs(view, column)

    def at(self, j: int) -> torch.Tensor:
        """The values at column j, (B, count * length): a view for one run."""
        view = self.view
        if self.column and j:
            view = view.as_strided(view.shape, view.stride(), view.storage_offset() + j * self.column)
        return view.flatten(1)


EPILOGUES = ("none", "relu", "gate")


@dataclass(frozen=True)
class Product:
    """out = epilogue(init + bias + a @ weight) at column j, a read through ReLU with `relu_a`;
    the gate's epilogue takes the N outputs as halves (x, y) and gives tanh(x) * sigmoid(y)."""

    a: Runs
    weight: torch.Tensor        # (K, N)
    out: Runs
    init: Runs | None = None    # a per-row term's column, or a residual
    bias: torch.Tensor | None = None
    relu_a: bool = False
    epilogue: str = "none"

    def __call__(self, j: int) -> None:
        a = self.a.at(j)
        if self.relu_a:
            a = F.relu(a)
        base = self.bias if self.init is None else self.init.at(j) if self.bias is None else self.init.at(j) + self.bias
        out = self.out.at(j)
        if self.epilogue == "gate":
            gate(torch.addmm(base, a, self.weight), out=out)
            return
        torch.addmm(base, a, self.weight, out=out)
        if self.epilogue == "relu":
            out.clamp_(min=0)


def row_windows(rows: torch.Tensor, kw: int) -> torch.Tensor:
    """Every output column's window of kw columns over all rows: rows (B, R, W + kw - 1, C)
    to (B * W, R * kw * C), ordered (row, column, channel) like `window_matrix`'s rows."""
    batch, count, columns, channels = rows.shape
    sb, sr, sc, sk = rows.stride()
    windows = rows.as_strided((batch, columns - kw + 1, count, kw, channels), (sb, sc, sr, sc, sk), rows.storage_offset())
    return windows.flatten(2).flatten(0, 1)


def shift_up(rows: torch.Tensor) -> None:
    """rows (B, R, ...): every row moves up one, in place (the newest keeps its values)."""
    if rows.shape[1] > 1:
        rows[:, :-1] = rows[:, 1:].clone()


def window_matrix(weight: torch.Tensor) -> torch.Tensor:
    """A convolution's weight (out, C, R, kw) as the matrix (R * kw * C, out) of row_windows."""
    return weight.permute(2, 3, 1, 0).reshape(-1, weight.shape[0]).contiguous()


class RowState:
    """One masked convolution while a cached sampler fills an image in raster order.

    `rows` (B, kh, W + kw - 1, Cin) holds its input's kh-1 rows above (zero-padded like the
    layer) and the current row, filled a pixel and a colour group at a time (groups not yet
    computed stay zero, and the mask gives them zero weight). `start_row` computes the
    per-row term `pre` (B, W, out) of every column: the bias, the rows-above taps and any
    `extra` product; `product(c, ...)` then adds the current row's taps for output group c
    at column j: one matrix product per sub-step. Buffers are allocated once.
    """

    def __init__(self, conv: MaskedConv2d, out_groups: torch.Tensor, colours: int, batch: int, width: int,
                 bias: torch.Tensor | float = 0.0):
        weight = conv.masked_weight().detach()
        self.kh, self.kw = conv.kernel
        self.left = conv.left
        out, channels = weight.shape[:2]
        rows = [torch.nonzero(out_groups == c).flatten() for c in range(colours)]  # output rows of group c
        # (left+1)*Cin by out_c per group: the current row's taps at and before the centre, channels last.
        current = weight[:, :, self.kh - 1, :self.left + 1].permute(0, 2, 1).reshape(out, -1)
        self.step_weight = [current[r].t().contiguous() for r in rows]
        self.group_runs = [_runs(r) for r in rows]
        self.above_weight = window_matrix(weight[:, :, :self.kh - 1])
        # the layer's bias plus `bias` ((out,), or per image (B, out)) at every column: (out,) or (B * W, out)
        constant = conv.bias.detach() + bias
        self.constant = constant if constant.dim() == 1 else constant[:, None].expand(-1, width, -1).reshape(-1, out)
        self.rows = weight.new_zeros(batch, self.kh, width + self.kw - 1, channels)
        self.row = self.rows[:, -1]
        self.pre = weight.new_empty(batch, width, out)
        self.pre.view(-1, out).copy_(self.constant.expand(batch * width, out))

    def start_row(self, extra: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """Before the row's first pixel: pre = bias + rows-above taps + extra[0] @ extra[1]
        (extra[0]: (B * W, K), columns in order)."""
        products = [(row_windows(self.rows[:, :-1], self.kw), self.above_weight)] if self.kh > 1 else []
        products += [extra] if extra is not None else []
        pre = self.pre.view(-1, self.pre.shape[2])
        for n, (a, weight) in enumerate(products):
            if n == 0:
                torch.addmm(self.constant, a, weight, out=pre)
            else:
                pre.addmm_(a, weight)

    def product(self, c: int, out: Runs, epilogue: str = "none") -> Product:
        """Output group c at the current column: its window of the current row times the
        current row's taps, plus its per-row term."""
        batch, width, count = self.pre.shape
        offset, runs, gap, length = self.group_runs[c]
        term = self.pre.as_strided((batch, runs, length), (width * count, gap, 1), self.pre.storage_offset() + offset)
        window = self.row[:, :self.left + 1].view(batch, 1, -1)
        return Product(Runs.of(window, self.row.shape[2]), self.step_weight[c], out, init=Runs(term, count),
                       epilogue=epilogue)

    def input(self, channels: slice) -> Runs:
        """Where input channels `channels` of the current row's column j go."""
        return Runs.of(self.row[:, self.left, channels], self.row.shape[2])

    def end_row(self) -> None:
        """The current row becomes the newest row above; the new current row is zeros."""
        shift_up(self.rows)
        self.row.zero_()


def _runs(indices: torch.Tensor) -> tuple[int, int, int, int]:
    """Sorted indices as (offset, count, gap, length): `count` evenly spaced runs of `length`
    consecutive indices (a colour group of a layer, or of a gate's two halves)."""
    starts = [0] + [n for n in range(1, len(indices)) if indices[n] != indices[n - 1] + 1]
    count, length = len(starts), len(indices) // len(starts)
    gap = int(indices[starts[1]] - indices[0]) if count > 1 else length
    expected = int(indices[0]) + gap * torch.arange(count)[:, None] + torch.arange(length)
    if not torch.equal(indices, expected.flatten()):
        raise ValueError("a colour group's outputs are not evenly spaced runs")
    return int(indices[0]), count, gap, length


class Pointwise:
    """A mask-B 1x1 layer during cached sampling: output group c from input groups <= c."""

    def __init__(self, conv: MaskedConv2d, out_groups: torch.Tensor, in_groups: torch.Tensor, colours: int):
        weight = conv.masked_weight().detach()[:, :, 0, 0]
        bias = conv.bias.detach()
        self.reads = [int((in_groups <= c).sum()) for c in range(colours)]
        rows = [torch.nonzero(out_groups == c).flatten() for c in range(colours)]
        self.weight = [weight[r, :n].t().contiguous() for r, n in zip(rows, self.reads)]
        self.bias = [bias[r] for r in rows]

    def product(self, c: int, x: torch.Tensor, out: Runs, **options) -> Product:
        """Output group c from x (B, Cin) (only groups <= c of it are read)."""
        return Product(Runs.of(x[:, :self.reads[c]]), self.weight[c], out, bias=self.bias[c], **options)


def group_slice(count: int, colours: int, c: int) -> slice:
    """The features of colour group c among `count`."""
    size = count // colours
    return slice(c * size, (c + 1) * size)


class CachedSampler:
    """What both masked families' cached samplers share: the output layers, the draw, the
    levels and logits of the pixel, and the sampling loop (rows, pixels, then one sub-step
    per colour). A family supplies its first layer's RowState `inputs` (whose current row
    holds the image's features), the buffer `final` (B, F) the output layers read through
    ReLU, `products(c)` (its share of colour c's plan, which ends by writing `final`'s
    group c), `start_row` and `end_row`."""

    def __init__(self, model: MaskedFamily, inputs: RowState, final: torch.Tensor):
        config = self.config = model.config
        colours, n = config.channels, config.color_levels
        batch, width = final.shape[0], config.shape[1]
        self.model, self.inputs = model, inputs
        self.hidden = final.new_zeros(batch, config.out_hidden_fmaps)
        self.logits = final.new_zeros(batch, colours, n)  # the pixel's, every colour
        self.levels = torch.zeros(batch, colours, width, dtype=torch.int64)  # the row's drawn levels
        with torch.no_grad():  # the input features of each level: (N, features of one colour)
            self.table = model.inputs(torch.arange(n).view(n, 1, 1, 1), final.dtype)[:, :, 0, 0].contiguous()
        self.features = [inputs.input(slice(None) if config.categorical_inputs else slice(c, c + 1))
                         for c in range(colours)]
        hidden = groups(config.out_hidden_fmaps, colours)
        out_hidden = Pointwise(model.out_hidden, hidden, groups(final.shape[1], colours), colours)
        out = Pointwise(model.out, groups(colours * n, colours), hidden, colours)
        self.plan = [self.products(c) + [
            out_hidden.product(c, final, Runs.of(self.hidden[:, group_slice(config.out_hidden_fmaps, colours, c)]),
                               relu_a=True, epilogue="relu"),
            out.product(c, self.hidden, Runs.of(self.logits[:, c]))] for c in range(colours)]

    def take(self, c: int, j: int, level: torch.Tensor) -> None:
        """Colour c of the pixel at column j is `level` (B,): into the row's levels and the
        first layer's input."""
        self.levels[:, c, j] = level
        self.features[c].at(j).copy_(self.table[level])

    def write_row(self, x: torch.Tensor, i: int) -> None:
        """Row i of the canvas x (B, C, H, W) from the row's drawn levels."""
        x[:, :, i] = self.model.canvas_values(self.levels, x.dtype)

    def products(self, c: int) -> list[Product]:
        raise NotImplementedError

    def start_row(self) -> None:
        raise NotImplementedError

    def end_row(self) -> None:
        raise NotImplementedError
