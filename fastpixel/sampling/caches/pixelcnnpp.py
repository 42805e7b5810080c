"""The incremental activation cache: exact sampling at about the cost of one forward pass.

Naive sampling runs the whole network once per pixel. Here every activation is computed
once, at the first step where everything it depends on is known:

- The `u` stream (rows above only) is computed a whole row at a time, at the start of each
  image row: its row r depends on image rows < r alone. Half- and quarter-resolution rows
  are due at every 2nd and 4th image row, and their transposed convolutions write the two
  finer rows they produce into a small buffer that the finer rows read later.
- The `ul` stream (rows above and pixels to the left) is computed one pixel at a time.
  Half- and quarter-resolution positions are due when both the row and the column are
  multiples of 2 or 4; their transposed convolutions write 2x2 blocks into row buffers.
- Each shifted convolution keeps only the rows of its input its filter still needs
  (`ConvCache`: kernel-height rows of the padded input width), so memory grows with the
  image width, not its area. The non-local block keeps a key/value cache like a
  transformer's (one entry per quarter-resolution position).
- Everything a `ul` convolution can know at the start of a row (its bias and class bias,
  the rows above's share of its filter, and its skip input from `u`) is folded into one
  per-row term, so the per-pixel work is the current row's share alone: one small matrix
  product per convolution, on a window that is a view of the cache (no copies).
- Activations are kept channels-last, (batch, [width,] channels), so that a pixel's
  channels are contiguous and a 1x1 layer is a plain `F.linear`.

The network is walked in exactly the order of `PixelCNNpp.forward`, level by level; the
parameters at each step equal a full forward pass on the partial image (to rounding), and
the same noise is consumed, so the images equal the naive sampler's.

This file is the cache and its reference steps in PyTorch (`start_row`, `step`, `commit`);
who runs a pixel's steps is an engine's choice (fastpixel/sampling/engines): PyTorch calls
these methods, the Triton and C++ engines run the same plan over the same buffers.
"""
from __future__ import annotations

import math
import weakref
from typing import Callable

import torch
import torch.nn.functional as F

from ...models.pixelcnnpp.layers import GatedResnet, Nin, ShiftedConv2d
from ...models.pixelcnnpp.model import LEVELS, PixelCNNpp

# A layer's filter in the layouts the caches read, kept from one sampler to the next (a
# sampler is built per call; weight normalisation and the copy are a tenth of a batch-1
# draw) until its parameters change: in place (their version counters) or replaced (their
# addresses: the entry holds the parameters it was made from, so no other tensor can take
# their place at the same address, e.g. after `.to()`).
_FILTERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _filter(layer: ShiftedConv2d) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's weight (Cout, Cin, kh, kw) and the same as one matrix whose rows follow a
    flattened window (kh, kw, Cin): (kh * kw * Cin, Cout)."""
    params = list(layer.parameters())
    kept = _FILTERS.get(layer)
    if kept is not None:
        held, versions, filters = kept
        if len(held) == len(params) and all(p.data_ptr() == h.data_ptr() and p.dtype == h.dtype and p._version == v
                                            for p, h, v in zip(params, held, versions)):
            return filters
    weight = layer.weight().detach()
    out_channels, in_channels, kh, kw = weight.shape
    window = weight.permute(2, 3, 1, 0).reshape(kh * kw * in_channels, out_channels).contiguous()
    _FILTERS[layer] = ([p.detach() for p in params], [p._version for p in params], (weight, window))
    return weight, window


class ConvCache:
    """The last kernel-height rows of one shifted convolution's input, zero-padded as the
    layer pads it, channels last: (B, kh, padded width, Cin).

    Per row of the input: `new_row()` (the oldest row leaves), then `write` values into the
    newest row (all at once or column by column). A whole output row comes from
    `conv()`; single outputs from `conv(col)`, after `start_pixels()` has folded the bias
    and the older rows' share of the filter into a per-column term.
    """

    def __init__(self, layer: ShiftedConv2d, batch: int, width: int, bias: torch.Tensor | None = None):
        # (Cout, Cin, kh, kw), and as one matrix: the newest row's share is its last kw * Cin
        # rows, the older rows' share the ones before
        self.weight, self.window_weight = _filter(layer)
        out_channels, in_channels, kh, self.kw = self.weight.shape
        left, right = layer.padding[:2]
        self.bias = (layer.b.detach() if bias is None else bias).expand(batch, out_channels)
        self.rows = self.weight.new_zeros(batch, kh, left + width + right, in_channels)
        self.left, self.width, self.stride = left, width, layer.stride
        self.newest_weight = self.window_weight[(kh - 1) * self.kw * in_channels:]
        out_width = (left + width + right - self.kw) // self.stride + 1
        # (B, Wout, Cout), refilled in place by start_pixels: a fixed buffer, which captured steps may read
        self.from_older = self.weight.new_zeros(batch, out_width, out_channels)

    def new_row(self) -> None:
        if self.rows.shape[1] > 1:  # kernels are at most 2 rows high
            self.rows[:, 0].copy_(self.rows[:, 1])
        self.rows[:, -1].zero_()

    def write(self, values: torch.Tensor, col: int | None = None) -> None:
        """values (B, width, Cin) for the whole row, or (B, Cin) at column `col`."""
        if col is None:
            self.rows[:, -1, self.left:self.left + self.width] = values
        else:
            self.rows[:, -1, self.left + col] = values

    def _conv_rows(self, rows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.conv2d(rows.permute(0, 3, 1, 2), weight, stride=self.stride)[:, :, 0].transpose(1, 2)

    def start_pixels(self, extra: torch.Tensor | None = None) -> None:
        """Before an output row is computed pixel by pixel: bias + the older rows' share
        (+ `extra`, a per-row term (B, Wout, Cout) the caller wants added)."""
        term = self.bias[:, None]
        if self.rows.shape[1] > 1:
            term = term + self._conv_rows(self.rows[:, :-1], self.weight[:, :, :-1])
        if extra is not None:
            term = term + extra
        self.from_older.copy_(term.expand_as(self.from_older))

    def conv(self, col: int | None = None) -> torch.Tensor:
        """The output row (B, Wout, Cout), or the output at column `col` (B, Cout)."""
        if col is None:
            return self._conv_rows(self.rows, self.weight) + self.bias[:, None]
        start = self.stride * col
        window = self.rows[:, -1, start:start + self.kw].flatten(1)  # a view: (B, kw * Cin)
        return torch.addmm(self.from_older[:, col], window, self.newest_weight)


class Pointwise:
    """A 1x1 layer on (..., Cin), optionally reading only some of its input channels."""

    def __init__(self, layer: Nin, in_channels: list[int] | None = None, with_bias: bool = True):
        weight = layer.weight().detach()[:, :, 0, 0]
        self.weight = (weight if in_channels is None else weight[:, in_channels]).contiguous()
        self.bias = layer.b.detach() if with_bias else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


def _nonlinearity(block: GatedResnet) -> Callable[[torch.Tensor], torch.Tensor]:
    """The block's nonlinearity on channels-last activations."""
    if block.channel_factor == 2:  # concat_elu
        return lambda x: F.elu(torch.cat([x, -x], dim=-1))
    return block.nonlinearity


class Block:
    """One gated residual block on a whole row or at one column. Its skip input arrives
    already through the skip layer (`skip_term`), or folded into `start_pixels`."""

    def __init__(self, block: GatedResnet, batch: int, width: int, labels: torch.Tensor | None):
        self.nonlinearity = _nonlinearity(block)
        class_bias = None
        if block.class_bias is not None:
            class_bias = block.conv_out.b.detach() + block.class_bias(labels)
        self.conv_in = ConvCache(block.conv_in, batch, width)
        self.conv_out = ConvCache(block.conv_out, batch, width, bias=class_bias)
        self.caches = [self.conv_in, self.conv_out]

    def start_pixels(self, skip_term: torch.Tensor | None = None) -> None:
        self.conv_in.start_pixels(skip_term)
        self.conv_out.start_pixels()

    def __call__(self, x: torch.Tensor, skip_term: torch.Tensor | None = None, col: int | None = None) -> torch.Tensor:
        self.conv_in.write(self.nonlinearity(x), col)
        c = self.conv_in.conv(col)
        if skip_term is not None:
            c = c + skip_term
        self.conv_out.write(self.nonlinearity(c), col)
        a, b = self.conv_out.conv(col).chunk(2, dim=-1)
        return x + a * torch.sigmoid(b)


def _skip_halves(block: GatedResnet, channels: int) -> tuple[Pointwise, Pointwise]:
    """Split the skip layer of a down-pass `ul` block, nin(nl(cat(u, ul))), into a part
    that reads nl(u) (with the bias) and a part that reads nl(ul); their sum is the layer."""
    # nl(cat(u, ul)) holds, for each copy f (x and -x for concat_elu), the u channels then the ul channels.
    copies = range(block.channel_factor)
    u_part = [f * 2 * channels + i for f in copies for i in range(channels)]
    ul_part = [f * 2 * channels + channels + i for f in copies for i in range(channels)]
    return Pointwise(block.skip, u_part), Pointwise(block.skip, ul_part, with_bias=False)


class CachedNonLocal:
    """The causal non-local block one position at a time, with a key/value cache."""

    def __init__(self, block, batch: int, positions: int, like: torch.Tensor):
        self.query, self.key, self.value, self.out = (Pointwise(m) for m in (block.query, block.key, block.value, block.out))
        inner = self.query.weight.shape[0]
        self.keys = like.new_zeros(batch, positions, inner)
        self.values = like.new_zeros(batch, positions, inner)
        self.scale = 1 / math.sqrt(inner)

    def __call__(self, x: torch.Tensor, position: int) -> torch.Tensor:
        self.keys[:, position] = self.key(x)
        self.values[:, position] = self.value(x)
        seen = slice(0, position + 1)
        scores = torch.bmm(self.keys[:, seen], self.query(x)[:, :, None])[:, :, 0] * self.scale
        y = torch.bmm(scores.softmax(dim=-1)[:, None], self.values[:, seen])[:, 0]
        return x + self.out(y)


class CachedNetwork:
    """A PixelCNN++ unrolled for generation: `start_row(r)` once image rows < r are final,
    then `step(r, c)` gives the mixture parameters (B, P) at (r, c), and `commit(r, c, x)`
    hands back the sampled pixel (B, C) in [-1, 1]."""

    def __init__(self, model: PixelCNNpp, batch: int, labels: torch.Tensor | None):
        cfg = self.config = model.config
        self.height, self.width = cfg.shape
        nf = cfg.nr_filters
        widths = [self.width >> level for level in range(LEVELS)]
        self.nonlinearity = _nonlinearity(model.up_u[0][0])
        param = next(model.parameters())

        # Input layers. Their outputs are shifted one row down (u, ul "above") or one column
        # right (ul "left"), so each reads the image row / pixel before the one it serves.
        self.u_init = ConvCache(model.u_init, batch, self.width)
        self.ul_init_above = ConvCache(model.ul_init_above, batch, self.width)
        self.ul_init_left = ConvCache(model.ul_init_left, batch, self.width)
        # The input's channels beyond the image (ones, CoordConv rows and columns), (H, W, n).
        zeros = param.new_zeros(1, cfg.channels, *cfg.shape)
        self.constant_features = model.input_features(zeros)[0, cfg.channels:].permute(1, 2, 0)

        def blocks(stream, level):
            return [Block(b, batch, widths[level], labels) for b in stream[level]]

        self.up_u = [blocks(model.up_u, level) for level in range(LEVELS)]
        self.up_ul = [blocks(model.up_ul, level) for level in range(LEVELS)]
        self.down_u = [blocks(model.down_u, level) for level in range(LEVELS)]
        self.down_ul = [blocks(model.down_ul, level) for level in range(LEVELS)]
        self.up_ul_skip = [[Pointwise(b.skip) for b in model.up_ul[level]] for level in range(LEVELS)]
        self.down_u_skip = [[Pointwise(b.skip) for b in model.down_u[level]] for level in range(LEVELS)]
        self.down_ul_skip = [[_skip_halves(b, nf) for b in model.down_ul[level]] for level in range(LEVELS)]
        # The stride-2 convolutions read level L; their outputs are level L + 1's positions.
        self.downsample_u = [ConvCache(m, batch, widths[level]) for level, m in enumerate(model.downsample_u)]
        self.downsample_ul = [ConvCache(m, batch, widths[level]) for level, m in enumerate(model.downsample_ul)]
        # upsample_*[L] turns a level L + 1 position into a 2x2 block of level L, written
        # into *_from_below[L], (B, 2 rows, width of L, C), which level L reads a row later.
        self.upsample_u = [(m, m.weight().detach(), m.b.detach()) for m in model.upsample_u]
        self.upsample_ul = [(m.weight().detach().permute(0, 2, 3, 1).flatten(1), m.b.detach()) for m in model.upsample_ul]
        self.u_from_below = [param.new_zeros(batch, 2, widths[level], nf) for level in range(LEVELS - 1)]
        self.ul_from_below = [param.new_zeros(batch, 2, widths[level], nf) for level in range(LEVELS - 1)]
        self.nonlocal_block = None
        if model.nonlocal_block is not None:
            positions = (self.height >> (LEVELS - 1)) * widths[-1]
            self.nonlocal_block = CachedNonLocal(model.nonlocal_block, batch, positions, param)
        self.out = Pointwise(model.out)

        # The caches whose input is at level L roll over when a row of level L starts.
        self.caches_of_level = [[self.ul_init_left], [], []]
        for level in range(LEVELS):
            for block in self.up_u[level] + self.up_ul[level] + self.down_u[level] + self.down_ul[level]:
                self.caches_of_level[level] += block.caches
            if level < LEVELS - 1:
                self.caches_of_level[level] += [self.downsample_u[level], self.downsample_ul[level]]
        self.ul_above = None  # (B, W, nf): the ul stream's share from the row above, set by start_row

    def state_tensors(self, include_nonlocal: bool = True) -> list[torch.Tensor]:
        """Every tensor the cache keeps between steps (what its memory is made of)."""
        tensors = [self.u_init.rows, self.ul_init_above.rows] + [c.rows for caches in self.caches_of_level for c in caches]
        tensors += [c.from_older for caches in self.caches_of_level for c in caches]
        tensors += self.u_from_below + self.ul_from_below
        if include_nonlocal and self.nonlocal_block is not None:
            tensors += [self.nonlocal_block.keys, self.nonlocal_block.values]
        return tensors

    # ------------------------------------------------------------------ the u stream, per row
    def start_row(self, r: int) -> None:
        """Compute the u stream of row r (and the coarser rows due with it), and fold every
        per-row term the ul stream will read along row r."""
        levels = [level for level in range(LEVELS) if r % (1 << level) == 0]
        for level in levels:
            for cache in self.caches_of_level[level]:
                cache.new_row()

        # Image row r - 1 is final: the input layers read it (down_shift: row 0 sees zeros).
        if r == 0:
            u = self.ul_above = self.u_init.bias.new_zeros(self.u_init.bias.shape[0], self.width, self.u_init.bias.shape[1])
        else:
            u = self.u_init.conv()
            self.ul_above = self.ul_init_above.conv()
        for cache in (self.u_init, self.ul_init_above):
            cache.new_row()
        self.ul_init_left.start_pixels()

        up = {}
        for level in levels:
            if level > 0:
                u = self.downsample_u[level - 1].conv()
                self.downsample_ul[level - 1].start_pixels()
            up[level] = [u]
            for block in self.up_u[level]:
                u = block(u)
                up[level].append(u)
            if level < LEVELS - 1:
                self.downsample_u[level].write(u)
            for block, skip, x in zip(self.up_ul[level], self.up_ul_skip[level], up[level][1:]):
                block.start_pixels(skip(self.nonlinearity(x)))

        for level in reversed(levels):
            i = r >> level
            u = up[level].pop() if level == LEVELS - 1 else self.u_from_below[level][:, i % 2]
            for block, skip, ul_block, (u_half, _), x in zip(self.down_u[level], self.down_u_skip[level], self.down_ul[level],
                                                              self.down_ul_skip[level], reversed(up[level])):
                u = block(u, skip(self.nonlinearity(x)))
                ul_block.start_pixels(u_half(self.nonlinearity(u)))
            if level > 0:
                layer, weight, bias = self.upsample_u[level - 1]
                rows = layer.linear(u.transpose(1, 2)[:, :, None], weight) + bias[:, None, None]
                self.u_from_below[level - 1].copy_(rows.permute(0, 2, 3, 1))

    # ------------------------------------------------------------------ the ul stream, per pixel
    def step(self, r: int, c: int) -> torch.Tensor:
        """Mixture parameters (B, P) at (r, c); start_row(r) and every earlier commit done."""
        ul = self.ul_above[:, c]
        if c > 0:  # right_shift: column 0 sees zeros
            ul = ul + self.ul_init_left.conv(c - 1)
        levels = [level for level in range(LEVELS) if r % (1 << level) == 0 and c % (1 << level) == 0]

        up = {}
        for level in levels:
            col = c >> level
            if level > 0:
                ul = self.downsample_ul[level - 1].conv(col)
            up[level] = [ul]
            for block in self.up_ul[level]:
                ul = block(ul, col=col)
                up[level].append(ul)
            if level < LEVELS - 1:
                self.downsample_ul[level].write(ul, col)

        for level in reversed(levels):
            i, col = r >> level, c >> level
            if level == LEVELS - 1:
                ul = up[level].pop()
                if self.nonlocal_block is not None:
                    ul = self.nonlocal_block(ul, i * (self.width >> level) + col)
            else:
                ul = self.ul_from_below[level][:, i % 2, col]
            for block, (_, ul_half), x in zip(self.down_ul[level], self.down_ul_skip[level], reversed(up[level])):
                ul = block(ul, ul_half(self.nonlinearity(x)), col)
            if level > 0:
                weight, bias = self.upsample_ul[level - 1]
                square = torch.mm(ul, weight).view(ul.shape[0], 2, 2, -1) + bias
                self.ul_from_below[level - 1][:, :, 2 * col:2 * col + 2] = square
        return self.out(F.elu(ul))

    def commit(self, r: int, c: int, pixel: torch.Tensor) -> None:
        """Hand the sampled pixel (B, C) to the input layers."""
        features = torch.cat([pixel, self.constant_features[r, c].expand(pixel.shape[0], -1)], dim=1)
        for cache in (self.u_init, self.ul_init_above, self.ul_init_left):
            cache.write(features, c)
