"""The Triton engine: PixelCNN++'s cached sampler's pixel step as fused Triton launches,
replayed through CUDA graphs.

`CachedNetwork` (fastpixel/sampling/caches/pixelcnnpp.py) stays the one cache: its buffers, its per-row work (the `u`
stream and the folded per-row terms, a few large cuDNN calls per row) and its layout.
What this file replaces is its per-pixel `step` + `commit`, a few hundred small PyTorch
operators per pixel, by a fixed list of launches over the same buffers:

- per `ul` gated residual block, two `ColumnConv` launches: the input convolution with
  the nonlinearity prologue, the skip input and the write into the cache; then the output
  convolution with the gate and residual epilogue;
- the input, downsampling, upsampling and output layers, one launch each; column moves
  between buffers (`ColumnCopy`); one fused launch draws the pixel from the mixture.

No launch takes the pixel's position as a Python number: each reads the flat index p from
one device tensor, which the step's last operation advances. Which resolutions are due at
a pixel depends only on (row mod 4, column mod 4), so there are three step patterns
(full resolution only; full and half; all three). On CUDA each is captured once into a
CUDA graph and a pixel costs one replay; where capture fails the launches run one by
one, after a one-line notice. On CPU tensors (Triton's interpreter) they always run one
by one: the same code, which is how it is tested without a GPU.
"""
from __future__ import annotations

import warnings
from typing import Callable

import torch

from ...kernels.ops import Column, ColumnConv, ColumnCopy, Op, SamplePixel
from ...models.pixelcnnpp.model import LEVELS, PixelCNNpp
from ..caches.pixelcnnpp import CachedNetwork

Launch = Callable[[], None]


class FusedSteps:
    """The pixel steps of one batch (the engines' Steps): `start_row(r)`, then `step(r, c)`
    for each pixel in raster order, which leaves the mixture parameters in `params` and the
    pixel in the image x (B, C, H, W), contiguous."""

    def __init__(self, net: CachedNetwork, x: torch.Tensor, noise: torch.Tensor, prefix: torch.Tensor | None = None):
        if not x.is_contiguous():
            raise ValueError("the image being filled must be contiguous")
        noise = noise.contiguous()
        cfg = net.config
        self.net, self.image = net, x
        self.width = x.shape[3]
        self.nl = cfg.resnet_nonlinearity
        self.position = torch.zeros(1, dtype=torch.int32, device=x.device)
        # the ul stream's share of the row above plus the left input's older rows, at each column
        self.left_term = self._buffer(self.width, cfg.nr_filters)
        self.params = self._buffer(cfg.num_params_out)
        self._scratch = self._buffer(cfg.nr_filters)  # a block's first convolution's output, read by its second
        up, ups = self._up_pass()
        down = self._down_pass(ups)
        draw, *rest = self._finish(noise)
        # A step at which the `due` finest levels are computed, in three parts: the launches up to
        # the mixture's parameters, the draw, and what hands the pixel on (to the input layers).
        self.parts = {due: ([launch for level in range(due) for launch in up[level]]
                            + [launch for level in reversed(range(due)) for launch in down[level]], [draw], rest)
                      for due in range(1, LEVELS + 1)}
        self.step_launches = {due: before + drawn + after for due, (before, drawn, after) in self.parts.items()}
        # With levels decided outside (the codec), the pixel is taken from `decided` instead of drawn.
        self.decided = self._buffer(x.shape[1])
        take = ColumnCopy(self.position, self.decided[:, None], self.pixel[:, None], x.shape[1], width=self.width)
        self.decide_launches = {due: (before, [take] + after) for due, (before, _, after) in self.parts.items()}
        # With a prefix, the steps at which every image's pixel is known read it from the prefix,
        # channels last (B, H * W, C), instead of drawing it (the image already holds it).
        self.known_launches = {}
        if prefix is not None:
            self._prefix = prefix.to(x.dtype).flatten(2).transpose(1, 2).contiguous()
            take = ColumnCopy(self.position, self._prefix, self.pixel[:, None], x.shape[1], width=self.width,
                              src_at=Column(scale=1, row_mask=-1, row_columns=self.width))
            self.known_launches = {due: before + [take] + after for due, (before, _, after) in self.parts.items()}
        self._graphs = _GraphCache(enabled=x.is_cuda)

    def _buffer(self, *shape: int) -> torch.Tensor:
        return self.image.new_zeros(self.image.shape[0], *shape)

    def _block(self, block, x: torch.Tensor, out: torch.Tensor, level: int, skip=None) -> list[Launch]:
        """A gated residual block at the pixel's column of `level`: x (B, nf) in, out (B, nf)."""
        first, second = block.conv_in, block.conv_out
        return [ColumnConv(self.position, first.rows[:, -1], first.newest_weight, first.from_older, self._scratch,
                           width=self.width, kw=first.kw, level=level, x=x, nonlinearity=self.nl, store=True, skip=skip),
                ColumnConv(self.position, second.rows[:, -1], second.newest_weight, second.from_older, out,
                           width=self.width, kw=second.kw, level=level, x=self._scratch, nonlinearity=self.nl,
                           store=True, residual=x)]

    def _up_pass(self) -> tuple[list[list[Launch]], list[list[torch.Tensor]]]:
        """Per level: the level's input, then one output per block, all kept for the down pass's skips."""
        net, pos, width = self.net, self.position, self.width
        nf = self.left_term.shape[-1]
        launches_of_level, activations = [], []
        for level in range(LEVELS):
            acts = [self._buffer(nf) for _ in range(len(net.up_ul[level]) + 1)]
            if level == 0:  # ul = left_term[c] + the committed pixel left of c through ul_init_left
                first = net.ul_init_left
                launches = [ColumnConv(pos, first.rows[:, -1], first.newest_weight, self.left_term, acts[0],
                                       width=width, kw=1, col_shift=-1)]
            else:
                ds = net.downsample_ul[level - 1]
                launches = [ColumnConv(pos, ds.rows[:, -1], ds.newest_weight, ds.from_older, acts[0],
                                       width=width, kw=ds.kw, stride=2, level=level)]
            for block, x, out in zip(net.up_ul[level], acts, acts[1:]):
                launches += self._block(block, x, out, level)
            if level < LEVELS - 1:  # into the downsampling cache, whose left padding is one column
                ds = net.downsample_ul[level]
                launches.append(ColumnCopy(pos, acts[-1][:, None], ds.rows[:, -1], nf, width=width,
                                           dst_at=Column(level=level, scale=1, offset=ds.left)))
            launches_of_level.append(launches)
            activations.append(acts)
        return launches_of_level, activations

    def _down_pass(self, ups: list[list[torch.Tensor]]) -> list[list[Launch]]:
        """Per level, coarsest first. Level L's input comes from the up pass (coarsest) or from
        the 2x2 block the level below wrote into ul_from_below[L] (row parity, column); the
        finest level ends in the output layer."""
        net, pos, width = self.net, self.position, self.width
        nf = self.left_term.shape[-1]
        widths = [width >> level for level in range(LEVELS)]
        launches_of_level: list[list[Launch]] = [[] for _ in range(LEVELS)]
        for level in reversed(range(LEVELS)):
            launches = launches_of_level[level]
            if level == LEVELS - 1:
                x = ups[level].pop()
                if net.nonlocal_block is not None:
                    nonlocal_block = GraphableNonLocal(net.nonlocal_block, pos, x, width, level)
                    launches.append(nonlocal_block)
                    x = nonlocal_block.out
            else:
                x = self._buffer(nf)
                below = net.ul_from_below[level].flatten(1, 2)  # (B, 2 * W_L, nf): row parity, then column
                launches.append(ColumnCopy(pos, below, x[:, None], nf, width=width,
                                           src_at=Column(level=level, scale=1, row_mask=1, row_columns=widths[level])))
            for block, (_, ul_half), skip in zip(net.down_ul[level], net.down_ul_skip[level], reversed(ups[level])):
                out = self._buffer(nf)
                launches += self._block(block, x, out, level, skip=(skip, ul_half.weight.t().contiguous(), self.nl))
                x = out
            if level > 0:  # the 2x2 block of level L - 1 this position produces, one row of it at a time
                weight, bias = net.upsample_ul[level - 1]
                square = self._buffer(4 * nf)
                launches.append(ColumnConv(pos, None, weight.contiguous(), bias.repeat(4), square, width=width, kw=1,
                                           x=x))
                rows = net.ul_from_below[level - 1].flatten(1, 2)
                for half in range(2):
                    launches.append(ColumnCopy(pos, square[:, None, 2 * nf * half:], rows, 2 * nf, width=width,
                                               dst_at=Column(level=level, scale=2, offset=half * widths[level - 1])))
            else:
                launches.append(ColumnConv(pos, None, net.out.weight.t().contiguous(), net.out.bias, self.params,
                                           width=width, kw=1, x=x, nonlinearity="elu"))
        return launches_of_level

    def _finish(self, noise: torch.Tensor) -> list[Launch]:
        """Draw the pixel, hand it with the constant input channels to the three input
        layers, and advance the position."""
        net, pos, width = self.net, self.position, self.width
        channels = self.image.shape[1]
        features = self._buffer(net.constant_features.shape[-1] + channels)
        pixel = self.pixel = self._buffer(channels)
        constants = net.constant_features.flatten(0, 1).contiguous()[None]  # (1, H * W, n): read at p
        launches: list[Launch] = [
            SamplePixel(self.params, noise.flatten(2), pos, channels, pixel, self.image.flatten(2)),
            ColumnCopy(pos, pixel[:, None], features[:, None], channels, width=width),
            ColumnCopy(pos, constants, features[:, None, channels:], constants.shape[-1], width=width,
                       src_at=Column(scale=1, row_mask=-1, row_columns=width)),
        ]
        for layer in (net.u_init, net.ul_init_above, net.ul_init_left):
            launches.append(ColumnCopy(pos, features[:, None], layer.rows[:, -1], features.shape[1], width=width,
                                       dst_at=Column(scale=1, offset=layer.left)))
        launches.append(Advance(pos))
        return launches

    def start_row(self, r: int) -> None:
        """The per-row work (CachedNetwork.start_row), then the fused input layer's per-row
        term. Row 0 is special; after it the work depends only on r mod 4 (which levels are
        due, and so which rows of the coarser levels' buffers are read)."""
        def work():
            self.net.start_row(r)
            self.left_term.copy_(self.net.ul_above)
            self.left_term[:, 1:] += self.net.ul_init_left.from_older[:, :-1]  # column c reads column c - 1

        self._graphs.run(("row", r == 0, _due_levels(r)), work)

    def step(self, r: int, c: int, known: torch.Tensor | bool | None = None) -> None:
        """Pixel (r, c); the device position must already point at it (it does, in raster order).
        Known in every image, the prefix's pixel replaces the draw; known in some (a (B,) bool
        tensor), the step runs launch by launch and those images take the prefix's pixel after it."""
        due = step_pattern(r, c)
        if known is None or known is True:
            plans = self.step_launches if known is None else self.known_launches
            self._graphs.run(("step", due, known), lambda: self._run(plans[due]))
            return
        before, drawn, after = self.parts[due]
        self._run(before + drawn)
        self.take_known(r, c, known)
        self._run(after)

    def decide(self, r: int, c: int, decide) -> None:
        """Pixel (r, c) with its levels from decide(r, c, channel, params), launch by launch."""
        before, after = self.decide_launches[step_pattern(r, c)]
        self._run(before)
        self.take_decided(r, c, decide)
        self._run(after)

    def take_decided(self, r: int, c: int, decide) -> None:
        """Between a step's parameters and the rest: each channel's level from `decide`, into
        `decided` (which the rest reads) and the image."""
        for channel in range(self.decided.shape[1]):
            self.decided[:, channel] = decide(r, c, channel, self.params).to(self.decided.dtype) / 127.5 - 1
        self.image[:, :, r, c] = self.decided

    def take_known(self, r: int, c: int, known: torch.Tensor) -> None:
        """After the draw: the images `known` names take the prefix's pixel, in the pixel the
        input layers read next and in the image."""
        p = r * self.width + c
        self.pixel.copy_(torch.where(known[:, None], self._prefix[:, p], self.pixel))
        self.image[:, :, r, c] = self.pixel

    def end_row(self, r: int) -> None:
        """Nothing: every buffer a row fills was written by its steps."""

    @staticmethod
    def _run(launches: list) -> None:
        for launch in launches:
            launch()


def _due_levels(index: int) -> int:
    """How many of the finest levels have a position at this row (or column) index."""
    return next(due for due in range(LEVELS, 0, -1) if index % (1 << (due - 1)) == 0)


def step_pattern(r: int, c: int) -> int:
    """How many of the finest levels are computed at pixel (r, c): 1, 2 or 3."""
    return min(_due_levels(r), _due_levels(c))


class _GraphCache:
    """Runs work for a key eagerly the first time (which compiles its kernels), captures it
    then into a CUDA graph, and afterwards replays the graph. Capturing records without
    running, so the state stays that of the eager run. Where capture fails, the work runs
    eagerly from then on, after a one-line warning."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.graphs: dict[object, torch.cuda.CUDAGraph | None] = {}

    def run(self, key: object, work: Callable[[], None]) -> None:
        graph = self.graphs.get(key)
        if graph is not None:
            graph.replay()
            return
        work()
        if self.enabled and key not in self.graphs:
            self.graphs[key] = self._capture(work)

    @staticmethod
    def _capture(work: Callable[[], None]) -> torch.cuda.CUDAGraph | None:
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                work()
        except Exception as err:  # noqa: BLE001 -- whatever capture rejects, plain launches still work
            warnings.warn(f"fastpixel: CUDA graph capture failed ({type(err).__name__}: {err}); the fused steps "
                          "run launch by launch", RuntimeWarning, stacklevel=2)
            torch.cuda.synchronize()
            return None
        return graph


class Advance:
    """The step's last operation: the position moves to the next pixel."""

    def __init__(self, position: torch.Tensor):
        self.position = position

    def __call__(self) -> None:
        self.position.add_(1)


class GraphableNonLocal:
    """The cached causal non-local block at a position held in a device tensor: the key and
    value are written into the cache at that position, and the positions not yet reached
    are masked by an additive bias of -inf, so every shape stays fixed."""

    def __init__(self, block, position: torch.Tensor, x: torch.Tensor, width: int, level: int):
        self.block, self.x, self.position, self.width, self.level = block, x, position, width, level
        self.out = torch.empty_like(x)
        self.key, self.value = torch.empty_like(block.keys[:, 0]), torch.empty_like(block.keys[:, 0])
        positions = block.keys.shape[1]
        self.bias = x.new_full((1, positions, 1), float("-inf"))  # (1, positions, 1): a position per column
        self.zero = x.new_zeros(1, 1, 1)
        at = Column(level=level, scale=1, row_mask=-1, row_columns=width >> level)
        inner = self.key.shape[1]
        self.writes = [ColumnCopy(position, self.key[:, None], block.keys, inner, width=width, dst_at=at),
                       ColumnCopy(position, self.value[:, None], block.values, inner, width=width, dst_at=at),
                       ColumnCopy(position, self.zero, self.bias, 1, width=width, dst_at=at)]

    def __call__(self) -> None:
        b = self.block
        torch.addmm(b.key.bias, self.x, b.key.weight.t(), out=self.key)
        torch.addmm(b.value.bias, self.x, b.value.weight.t(), out=self.value)
        for write in self.writes:
            write()
        scores = torch.bmm(b.query(self.x)[:, None], b.keys.transpose(1, 2)) * b.scale + self.bias.transpose(1, 2)
        y = torch.bmm(scores.softmax(dim=-1), b.values)[:, 0]
        torch.add(self.x, b.out(y), out=self.out)


def aot_specs(config, batch: int, dtype: torch.dtype) -> list[tuple]:
    """Every distinct kernel launch of the fused steps for a model `config` at `batch` in
    `dtype`, as (jit function, signature, constexprs, options) for `triton.compile`: what
    tests/test_kernels_compile.py compiles for real GPUs. Built on the meta device: no memory."""
    with torch.device("meta"):
        model = PixelCNNpp(config).to(dtype)
        labels = None if config.num_classes is None else torch.zeros(batch, dtype=torch.long)
        x = torch.empty(batch, config.channels, *config.shape, dtype=dtype)
        noise = torch.empty(batch, config.nr_logistic_mix + config.channels, *config.shape, dtype=torch.float64)
        steps = FusedSteps(CachedNetwork(model, batch, labels), x, noise)
    launches = [launch for launches in steps.step_launches.values() for launch in launches
                if isinstance(launch, Op)]
    specs = {}
    for launch in launches:
        fn, signature, constexprs, options = launch.aot_spec()
        specs[(fn, *signature.items(), *constexprs.items(), *options.items())] = (fn, signature, constexprs, options)
    return list(specs.values())
