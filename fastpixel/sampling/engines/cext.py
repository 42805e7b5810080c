"""The C++ engine (`csrc/step.cpp`, built by fastpixel/extension.py): a cache's steps
packed once into op descriptors over the cache's own buffers, and run by the CPU engine.

PixelCNN++ (`CextSteps`): the same work as `CachedNetwork`, row and pixel.

- A pixel's step is the Triton engine's step plan: `fused.FusedSteps` walks the
  model once into a fixed list of bound launches (column convolutions, column copies, the
  non-local block, the mixture draw, the position's advance); each is packed here into one
  op descriptor holding the arguments its Triton kernel gets, tensors as addresses.
- A row's work is `CachedNetwork.start_row` walked the same way (`_RowOps`): shifts of the
  caches' rows, writes of a fresh row, and row convolutions (the u stream's blocks and
  the ul stream's per-row terms), plus the fused input layer's per-row term.

A step or a row is then one call into C++, with no PyTorch operator on the way.

The masked families (`EnginePixels`): the PRODUCT and CATEGORICAL_DRAW ops run a cached
sampler's plan (fastpixel/sampling/caches/masked.py), every colour's products and then its
draw, so that a whole pixel is one call into the engine; the per-row work stays with the
sampler (PyTorch).
"""
from __future__ import annotations

import ctypes
from typing import Callable

import numpy as np
import torch

from ... import extension
from ...kernels.ops import NONLINEARITIES, ColumnConv, ColumnCopy, Op, SamplePixel
from ...models.pixelcnnpp.model import LEVELS
from ..caches.masked import EPILOGUES, CachedSampler, Product, Runs
from ..caches.pixelcnnpp import Block, CachedNetwork, ConvCache, Pointwise
from .fused import Advance, FusedSteps, GraphableNonLocal, step_pattern
from .pytorch import MaskedPixels

_DTYPES = (torch.float32, torch.float64)
# op kinds (csrc/step.cpp `Kind`), and the constexprs each Triton kernel's C++ twin reads after its arguments
_CONSTEXPRS = {ColumnConv: (0, ("KW", "STRIDE", "LEVEL", "FRESH", "STORE", "NL", "HAS_SKIP", "SKIP_NL", "GATE")),
               ColumnCopy: (1, ()),
               SamplePixel: (2, ("CHANNELS", "HAS_IMAGE"))}
_ADVANCE, _ROW_SHIFT, _ROW_WRITE, _ROW_CONV, _NONLOCAL, _PRODUCT, _DRAW = 3, 4, 5, 6, 7, 8, 9
_PERIOD = 1 << (LEVELS - 1)  # the coarsest level's stride


def pack_op(kind: int, values: list, slots: int) -> np.ndarray:
    """One op descriptor: its kind, then its arguments (tensors as addresses, None as 0)."""
    if len(values) >= slots:
        raise ValueError(f"an op has {len(values)} arguments, more than the engine's {slots - 1}")
    op = [kind] + [0] * (slots - 1)
    for i, v in enumerate(values, 1):  # one pass, plain ints first: a sampler packs hundreds of ops
        if type(v) is int:
            op[i] = v
        elif isinstance(v, torch.Tensor):
            if v.dtype == torch.int64:
                raise ValueError("the C++ engine reads the position as int32")
            op[i] = v.data_ptr()
        elif v is not None:
            op[i] = int(v)
    return np.array(op, dtype=np.int64)


def panel_columns(dtype: torch.dtype, pixel: bool) -> int:
    """The width of the panels this build's tiles read a pixel's filters in, or a row's
    (csrc/step.cpp `Filter`; each has its own tile)."""
    return extension.load().fp_panel_columns(torch.empty(0, dtype=dtype).element_size(), pixel)


def engine_filter(weight: torch.Tensor, panel: int) -> torch.Tensor:
    """A (k, n) filter as the engine's tiles read it: panels of `panel` columns, one after
    another, each k x panel contiguous (the last one narrower)."""
    k, n = weight.shape
    whole = n - n % panel  # the columns of whole panels
    panels = weight[:, :whole].reshape(k, whole // panel, panel).transpose(0, 1).reshape(-1)
    return torch.cat([panels, weight[:, whole:].reshape(-1)]) if whole < n else panels


def _pack(launch: Op | Advance | GraphableNonLocal, slots: int, panel: int, keep: list) -> np.ndarray:
    """A step plan's launch as an op, its filters in panels of `panel` columns. Tensors made
    here for the engine go into `keep`."""
    if isinstance(launch, Advance):
        return pack_op(_ADVANCE, [launch.position], slots)
    if isinstance(launch, GraphableNonLocal):
        block, x = launch.block, launch.x
        layers = [(layer.weight.t().contiguous(), layer.bias) for layer in (block.query, block.key, block.value, block.out)]
        keep.extend(layers)
        inner = block.keys.shape[2]
        return pack_op(_NONLOCAL, [launch.position, launch.width, launch.level, launch.width >> launch.level,
                               x, x.stride(0), launch.out, launch.out.stride(0), x.shape[0], x.shape[1], inner,
                               *(t for layer in layers for t in layer), block.keys, block.values, block.keys.shape[1]],
                   slots)
    kind, names = _CONSTEXPRS[type(launch)]
    args = [*launch.args, *(int(launch.constexprs[name]) for name in names)]
    if isinstance(launch, ColumnConv):  # its filter, and the skip's, laid out for the tiles
        for i in (4, 12) if launch.constexprs["HAS_SKIP"] else (4,):
            args[i] = engine_filter(args[i], panel)
            keep.append(args[i])
        args.append(panel)
    return pack_op(kind, args, slots)


class OpList:
    """A run of packed ops: one call into the engine."""

    def __init__(self, run: Callable[[ctypes.c_void_p, int], None], ops: list[np.ndarray], keep: list):
        self.ops, self.keep = np.stack(ops), keep  # kept here: the engine reads them at every call
        self.run, self.address, self.count = run, ctypes.c_void_p(self.ops.ctypes.data), len(ops)

    def __call__(self) -> None:
        self.run(self.address, self.count)


def load_engine(dtype: torch.dtype) -> tuple[Callable[[ctypes.c_void_p, int], None], int]:
    """The engine's entry point for `dtype` and its op size. Raises extension.BuildError."""
    library = extension.load()
    return library.fp_run_float64 if dtype == torch.float64 else library.fp_run_float32, library.fp_op_slots()


def engine_call(launches: list, dtype: torch.dtype) -> Callable[[], None]:
    """One call into the engine that runs a step plan's `launches` in order, on tensors of
    `dtype` (float32 or float64), packed now. Raises extension.BuildError when there is no engine."""
    run, slots = load_engine(dtype)
    keep: list = []
    panel = panel_columns(dtype, pixel=True)
    return OpList(run, [_pack(launch, slots, panel, keep) for launch in launches], keep)


class _RowOps:
    """CachedNetwork.start_row as ops over the network's own buffers, plus the fused input
    layer's per-row term (FusedSteps.left_term). Which ops run depends only on whether the
    row is the first and on its index mod 4 (the levels due, and which row of the coarser
    levels' 2-row buffers is read), so there are at most five lists, each packed once."""

    def __init__(self, net: CachedNetwork, left_term: torch.Tensor):
        self.net, self.left_term = net, left_term
        self.nl = NONLINEARITIES.index(net.config.resnet_nonlinearity)
        self.run, self.slots = load_engine(left_term.dtype)
        self.panel = panel_columns(left_term.dtype, pixel=False)
        self.keep: list[torch.Tensor] = []  # what the engine reads and no one else holds
        # each weight laid out once for all the row lists, kept beside its source so that no
        # other tensor takes the source's address while the key names it
        self.filters: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        batch, width, nf = left_term.shape
        widths = [width >> level for level in range(LEVELS)]
        new = left_term.new_zeros
        self.up = [[new(batch, w, nf) for _ in range(len(net.up_u[level]) + 1)] for level, w in enumerate(widths)]
        self.down = [[new(batch, w, nf) for _ in net.down_u[level]] for level, w in enumerate(widths)]
        self.scratch = [new(batch, w, nf) for w in widths]  # a block's first convolution's output
        self.plans: dict[tuple[bool, int], OpList] = {}

    def __call__(self, r: int) -> None:
        key = (r == 0, r % _PERIOD)
        if key not in self.plans:
            self.plans[key] = OpList(self.run, self._walk(r), self.keep)
        self.plans[key]()

    def _walk(self, r: int) -> list[np.ndarray]:
        """The ops of row r, in the order of CachedNetwork.start_row."""
        net, ops = self.net, []
        levels = [level for level in range(LEVELS) if r % (1 << level) == 0]
        for level in levels:
            ops += [self._shift(cache) for cache in net.caches_of_level[level]]
        u = self.up[0][0]
        if r == 0:  # down_shift: the first row sees zeros
            ops += [self._zeros(u), self._zeros(self.left_term)]
        else:
            ops += [self._conv(net.u_init, u), self._conv(net.ul_init_above, self.left_term)]
        ops += [self._shift(net.u_init), self._shift(net.ul_init_above)]
        # right_shift: column c reads ul_init_left's column c - 1
        ops.append(self._conv(net.ul_init_left, self.left_term[:, 1:], older=True, accumulate=True))

        for level in levels:
            acts = self.up[level]
            if level > 0:
                ops.append(self._conv(net.downsample_u[level - 1], acts[0]))
                ops.append(self._conv(net.downsample_ul[level - 1], net.downsample_ul[level - 1].from_older, older=True))
            for block, x, out in zip(net.up_u[level], acts, acts[1:]):
                ops += self._block(block, x, out, level)
            if level < LEVELS - 1:
                ops.append(self._write(acts[-1], net.downsample_u[level], NONLINEARITIES.index("identity")))
            for block, skip, x in zip(net.up_ul[level], net.up_ul_skip[level], acts[1:]):
                ops += self._start_pixels(block, skip, x)

        for level in reversed(levels):
            acts = self.up[level]
            if level == LEVELS - 1:
                u, skips = acts[-1], acts[-2::-1]
            else:
                u, skips = net.u_from_below[level][:, (r >> level) % 2], acts[::-1]
            for block, skip, ul_block, (u_half, _), x, out in zip(net.down_u[level], net.down_u_skip[level],
                                                                  net.down_ul[level], net.down_ul_skip[level],
                                                                  skips, self.down[level]):
                ops += self._block(block, u, out, level, skip=(x, skip))
                ops += self._start_pixels(ul_block, u_half, out)
                u = out
            if level > 0:
                ops += self._upsample(level - 1, u)
        return ops

    # ------------------------------------------------------------------ ops
    def _kept(self, t: torch.Tensor) -> torch.Tensor:
        self.keep.append(t)
        return t

    def _filter(self, weight: torch.Tensor) -> torch.Tensor:
        key = (weight.data_ptr(), weight.shape, weight.stride())
        if key not in self.filters:
            self.filters[key] = weight, engine_filter(weight, self.panel)
        return self.filters[key][1]

    def _shift(self, cache: ConvCache) -> np.ndarray:
        rows = cache.rows
        return pack_op(_ROW_SHIFT, [rows, rows.stride(0), rows.shape[0], rows.shape[1], rows.stride(1)], self.slots)

    def _write(self, x: torch.Tensor, cache: ConvCache, nl: int) -> np.ndarray:
        dst = cache.rows[:, -1, cache.left:]
        return pack_op(_ROW_WRITE, [x, x.stride(0), x.stride(1), dst, dst.stride(0), dst.stride(1),
                                x.shape[0], cache.width, x.shape[2], nl], self.slots)

    def _row_conv(self, src: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, out: torch.Tensor, *,
                  kw: int = 1, stride: int = 1, skip: tuple[torch.Tensor, Pointwise] | None = None,
                  residual: torch.Tensor | None = None, accumulate: bool = False) -> np.ndarray:
        """out (B, W, N) from src (B, rows, columns, CIN) through weight (rows * kw * CIN, N
        or 2N with the gate), bias (B or broadcast, N or 2N); see csrc/step.cpp row_conv."""
        batch, width, n = out.shape
        if src.stride(3) != 1 or weight.stride(1) != 1 or out.stride(2) != 1:
            raise ValueError("the engine's row convolutions read and write contiguous channels")
        bias = self._kept(bias.expand(batch, -1))  # per image or broadcast (stride 0), channels contiguous
        x, skip_weight = (None, None) if skip is None else (skip[0], self._filter(skip[1].weight.t()))
        return pack_op(_ROW_CONV, [
            src, src.stride(0), src.stride(1), src.stride(2), src.shape[1], src.shape[3], kw, stride, src.shape[2],
            self._filter(weight), bias, bias.stride(0),
            x, *((x.stride(0), x.stride(1), x.shape[2]) if x is not None else (0, 0, 0)), self.nl, skip_weight,
            residual, *((residual.stride(0), residual.stride(1)) if residual is not None else (0, 0)), residual is not None,
            out, out.stride(0), out.stride(1), accumulate, batch, width, n, self.panel], self.slots)

    def _conv(self, cache: ConvCache, out: torch.Tensor, *, older: bool = False, skip=None, residual=None,
              accumulate: bool = False) -> np.ndarray:
        """The cache's whole output row (`conv()`), or with `older` the share of its rows
        above the newest plus its bias (`start_pixels`), + a skip input through its 1x1 layer."""
        kh = cache.rows.shape[1] - (1 if older else 0)
        weight = cache.window_weight[:kh * cache.kw * cache.rows.shape[3]]
        bias = cache.bias if skip is None else self._kept(cache.bias + skip[1].bias)
        return self._row_conv(cache.rows[:, :kh], weight, bias, out, kw=cache.kw, stride=cache.stride, skip=skip,
                              residual=residual, accumulate=accumulate)

    def _zeros(self, out: torch.Tensor) -> np.ndarray:
        """out = 0: a row convolution over no rows with a zero bias."""
        return self._row_conv(out[:, None][:, :0], out.new_zeros(0, out.shape[2]), self._kept(out.new_zeros(out.shape[2])),
                              out)

    def _block(self, block: Block, x: torch.Tensor, out: torch.Tensor, level: int, skip=None) -> list[np.ndarray]:
        """Block on a whole row: x in, out = x + a * sigmoid(b)."""
        c = self.scratch[level]
        return [self._write(x, block.conv_in, self.nl),
                self._conv(block.conv_in, c, skip=skip),
                self._write(c, block.conv_out, self.nl),
                self._conv(block.conv_out, out, residual=x)]

    def _start_pixels(self, block: Block, skip: Pointwise, x: torch.Tensor) -> list[np.ndarray]:
        """Block.start_pixels(skip(nl(x)))."""
        return [self._conv(block.conv_in, block.conv_in.from_older, older=True, skip=(x, skip)),
                self._conv(block.conv_out, block.conv_out.from_older, older=True)]

    def _upsample(self, level: int, u: torch.Tensor) -> list[np.ndarray]:
        """The transposed convolution from level + 1 into the two rows of u_from_below[level]:
        per output row, a row convolution whose outputs are pairs of columns."""
        layer, weight, bias = self.net.upsample_u[level]
        rows = self.net.u_from_below[level]
        batch, _, width, nf = rows.shape
        pairs = _pair_weights(layer, weight)
        return [self._row_conv(u[:, None], pairs[dy], bias.repeat(2), rows[:, dy].reshape(batch, width // 2, 2 * nf),
                               kw=pairs.shape[1] // weight.shape[0]) for dy in range(2)]


def _pair_weights(layer, weight: torch.Tensor) -> torch.Tensor:
    """A stride-2 transposed convolution's weight (CIN, COUT, kh, kw), cropped as
    `layer.linear` crops it, as per-output-row matrices (kh, taps * CIN, 2 * COUT): output
    columns 2m and 2m + 1 of row dy are the input columns m .. m + taps - 1 times matrix dy."""
    cin, cout, kh, kw = weight.shape
    left = (kw - 1) // 2 if layer.shift == "down" else 0  # the crop, as in ShiftedConvTranspose2d.linear
    # output column 2m + e (after the crop) = input column m + d through kernel column kx = e + left - 2d
    taps = {(e, kx): (e + left - kx) // 2 for e in range(2) for kx in range(kw) if (e + left - kx) % 2 == 0}
    assert min(taps.values()) >= 0, "the crop reads no column left of the pair's own"
    pairs = weight.new_zeros(kh, max(taps.values()) + 1, cin, 2, cout)
    for (e, kx), d in taps.items():
        pairs[:, d, :, e] = weight[:, :, :, kx].permute(2, 0, 1)
    return pairs.flatten(1, 2).flatten(2)


class CextSteps:
    """PixelCNN++'s cached sampler run by the C++ engine, row by row and pixel by pixel
    (the engines' Steps, as FusedSteps)."""

    def __init__(self, net: CachedNetwork, x: torch.Tensor, noise: torch.Tensor, prefix: torch.Tensor | None = None):
        if x.dtype not in _DTYPES:
            raise ValueError(f"the C++ engine runs float32 and float64 models, not {x.dtype}")
        if x.device.type != "cpu":
            raise ValueError(f"the C++ engine runs on the CPU, and the model is on {x.device}")
        self.plan = FusedSteps(net, x, noise, prefix)  # keeps every buffer the ops point at alive
        self.params = self.plan.params
        launches = [self.plan.step_launches[due] for due in range(1, LEVELS + 1)]
        # a pixel's step depends on (r, c) mod 4 alone: looked up, not worked out, at each pixel
        self._steps = self._by_position([engine_call(plan, x.dtype) for plan in launches])
        self._decided = self._by_position([tuple(engine_call(part, x.dtype) for part in self.plan.decide_launches[due])
                                           for due in range(1, LEVELS + 1)])
        if prefix is not None:  # steps with the prefix's pixel for every image; and, for some, split at the draw
            self._known = self._by_position([engine_call(self.plan.known_launches[due], x.dtype)
                                             for due in range(1, LEVELS + 1)])
            self._halves = self._by_position([(engine_call(before + drawn, x.dtype), engine_call(after, x.dtype))
                                              for before, drawn, after in self.plan.parts.values()])
        self._rows = _RowOps(net, self.plan.left_term)

    @staticmethod
    def _by_position(per_pattern: list) -> list[list]:
        """What each (r mod 4, c mod 4) runs, from what each step pattern runs."""
        return [[per_pattern[step_pattern(r, c) - 1] for c in range(_PERIOD)] for r in range(_PERIOD)]

    def start_row(self, r: int) -> None:
        self._rows(r)

    def step(self, r: int, c: int, known: torch.Tensor | bool | None = None) -> None:
        if known is None or known is True:
            (self._steps if known is None else self._known)[r % _PERIOD][c % _PERIOD]()
            return
        up_to_draw, rest = self._halves[r % _PERIOD][c % _PERIOD]
        up_to_draw()
        self.plan.take_known(r, c, known)
        rest()

    def decide(self, r: int, c: int, decide) -> None:
        before, after = self._decided[r % _PERIOD][c % _PERIOD]
        before()
        self.plan.take_decided(r, c, decide)
        after()

    def end_row(self, r: int) -> None:
        """Nothing: every buffer a row fills was written by its steps."""


# --------------------------------------------------------------------------- the masked families
def _runs(runs: Runs | None) -> list[int]:
    """A Runs as the engine's six slots: address, batch stride, column stride, count, gap, length."""
    if runs is None:
        return [0] * 6
    view = runs.view
    return [view.data_ptr(), view.stride(0), runs.column, view.shape[1], view.stride(1), view.shape[2]]


class EnginePixels(MaskedPixels):
    """A masked family's cached sampler with every colour's sub-step of a pixel, draws and
    feature writes included, in one call into the engine; rows as MaskedPixels."""

    def __init__(self, sampler: CachedSampler, x: torch.Tensor, noise: torch.Tensor, prefix: torch.Tensor | None = None):
        super().__init__(sampler, x, noise, prefix)
        dtype = sampler.logits.dtype
        if dtype not in (torch.float32, torch.float64) or sampler.logits.device.type != "cpu":
            raise ValueError(f"the C++ engine runs float32 and float64 models on the CPU, not {dtype} on "
                             f"{sampler.logits.device}")
        run, slots = load_engine(dtype)
        self.width = sampler.config.shape[1]
        self.position = torch.zeros(1, dtype=torch.int32)
        self._position = self.position.numpy()  # the same memory: set without a PyTorch operator
        self.noise = noise.to(torch.float64).contiguous()
        batch = len(self.noise)
        head, panel, filters = [self.position, self.width, batch], panel_columns(dtype, pixel=True), []
        ops = []  # per colour: its products, then its draw
        for c, plan in enumerate(sampler.plan):
            levels = sampler.levels[:, c]
            products = [pack_op(_PRODUCT, head + self._product(p, panel, filters), slots) for p in plan]
            ops.append(products + [pack_op(_DRAW, head + [
                sampler.logits[:, c], sampler.logits.stride(0), sampler.logits.shape[2],
                self.noise[:, c], self.noise.stride(0), sampler.table, *_runs(sampler.features[c]),
                levels.data_ptr(), levels.stride(0), levels.stride(1)], slots)])
        self.call = OpList(run, [op for colour in ops for op in colour], [self.noise, sampler, filters])
        # known pixels: a colour at a time, with its draw (some images known) or without (all)
        self.colour_calls = [OpList(run, colour, [self.noise, sampler, filters]) for colour in ops]
        self.colour_products = [OpList(run, colour[:-1], [sampler, filters]) for colour in ops]

    @staticmethod
    def _product(p: Product, panel: int, filters: list) -> list:
        """A product's slots, its weight laid out for the tiles (kept in `filters`)."""
        k = p.a.view.shape[1] * p.a.view.shape[2]
        if p.weight.shape[0] != k:
            raise ValueError(f"a product's weight must be a ({k}, N) matrix, got {tuple(p.weight.shape)}")
        filters.append(engine_filter(p.weight, panel))
        return [*_runs(p.a), p.relu_a, filters[-1], p.weight.shape[1], *_runs(p.init), p.bias,
                EPILOGUES.index(p.epilogue), *_runs(p.out), panel]

    def decide(self, i: int, j: int, decide) -> None:
        self._position[0] = i * self.width + j
        for c, products in enumerate(self.colour_products):
            products()
            self.sampler.take(c, j, decide(i, j, c, self.sampler.logits[:, c]))

    def step(self, i: int, j: int, known: torch.Tensor | bool | None = None) -> None:
        self._position[0] = i * self.width + j
        if known is None:
            self.call()
            return
        calls = self.colour_products if known is True else self.colour_calls
        for c, call in enumerate(calls):  # a colour's products (and draw), then the prefix's level taken
            call()
            self.sampler.take(c, j, self.level(c, i, j, known, self.sampler.levels[:, c, j]))

