"""What the masked-convolution families (PixelCNN, Gated PixelCNN) share: their config's
fields and checks, colour-ordered masks, the masked convolution, the input features, and
their cached samplers' common parts: the per-row state of each masked convolution, the
sub-step as a plan of products, and the sampling loop.

Colour ordering (van den Oord et al. 2016a): for RGB every layer's features are split into
three equal groups, one per colour; at the pixel being predicted, group c may read groups
before c (mask A, the first layer: colour c of the image is not known yet) or up to c (mask
B, every later layer). Positions before the pixel in raster order are read in full.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import categorical
from .config import JsonConfig, check_flags, check_num_classes, image_size, is_int
from .model import check_labels


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
# A sub-step (one pixel, one colour group) is a plan: a list of `Product`s over buffers
# allocated once, then the categorical draw. PyTorch runs the plan op by op (`TorchPixels`);
# the C++ engine runs a whole pixel's plans, draws included, in one call
# (fastpixel/cext_masked.py). Both run the same plan on the same buffers.

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

    def rows(self, x: torch.Tensor, noise: torch.Tensor, backend: str = "torch",
             on_logits: Callable[[int, int, torch.Tensor], None] | None = None):
        """Fill the canvas x (B, C, H, W) in place, each pixel by `backend` ("torch" or
        "cext"); yield after each row. on_logits(i, j, logits (B, C, N)) sees every pixel's."""
        if backend == "cext":
            from .cext_masked import EnginePixels
            pixel = EnginePixels(self, noise)
        else:
            pixel = TorchPixels(self, noise)
        height, width = self.config.shape
        with torch.no_grad():
            for i in range(height):
                self.start_row()
                for j in range(width):
                    pixel(i, j)
                    if on_logits is not None:
                        on_logits(i, j, self.logits)
                self.end_row()
                x[:, :, i] = self.model.canvas_values(self.levels, x.dtype)
                yield i

    def products(self, c: int) -> list[Product]:
        raise NotImplementedError

    def start_row(self) -> None:
        raise NotImplementedError

    def end_row(self) -> None:
        raise NotImplementedError


class TorchPixels:
    """A pixel with PyTorch operators: per colour, its plan's products, then the draw."""

    def __init__(self, sampler: CachedSampler, noise: torch.Tensor):
        self.sampler, self.noise = sampler, noise

    def __call__(self, i: int, j: int) -> None:
        s = self.sampler
        for c, plan in enumerate(s.plan):
            for product in plan:
                product(j)
            level = categorical.draw(s.logits[:, c], self.noise[:, c, i, j])
            s.levels[:, c, j] = level
            s.features[c].at(j).copy_(s.table[level])
