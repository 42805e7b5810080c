"""The masked families' pixels in C++ (`csrc/step.cpp`: the PRODUCT and CATEGORICAL_DRAW
ops): a cached sampler's plan (`fastpixel/masked.py`), every colour's products and then its
draw, packed once into op descriptors over the sampler's own buffers, so that a whole
pixel is one call into the engine. The per-row work stays with the sampler (PyTorch)."""
from __future__ import annotations

import torch

from .cext_step import OpList, load_engine, pack_op
from .masked import EPILOGUES, CachedSampler, Product, Runs

_PRODUCT, _DRAW = 8, 9  # csrc/step.cpp `Kind`


def _runs(runs: Runs | None) -> list[int]:
    """A Runs as the engine's six slots: address, batch stride, column stride, count, gap, length."""
    if runs is None:
        return [0] * 6
    view = runs.view
    return [view.data_ptr(), view.stride(0), runs.column, view.shape[1], view.stride(1), view.shape[2]]


class EnginePixels:
    """pixel(i, j): every colour's sub-step of pixel (i, j), draws and feature writes
    included, in one call; the uniforms are noise (B, C, H, W)."""

    def __init__(self, sampler: CachedSampler, noise: torch.Tensor):
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
        head = [self.position, self.width, batch]
        ops = []
        for c, plan in enumerate(sampler.plan):
            ops += [pack_op(_PRODUCT, head + self._product(p), slots) for p in plan]
            levels = sampler.levels[:, c]
            ops.append(pack_op(_DRAW, head + [
                sampler.logits[:, c], sampler.logits.stride(0), sampler.logits.shape[2],
                self.noise[:, c], self.noise.stride(0), sampler.table, *_runs(sampler.features[c]),
                levels.data_ptr(), levels.stride(0), levels.stride(1)], slots))
        self.call = OpList(run, ops, [self.noise, sampler])

    @staticmethod
    def _product(p: Product) -> list:
        k = p.a.view.shape[1] * p.a.view.shape[2]
        if not p.weight.is_contiguous() or p.weight.shape[0] != k:
            raise ValueError(f"a product's weight must be a contiguous ({k}, N) matrix, got {tuple(p.weight.shape)}")
        return [*_runs(p.a), p.relu_a, p.weight, p.weight.shape[1], *_runs(p.init), p.bias,
                EPILOGUES.index(p.epilogue), *_runs(p.out)]

    def __call__(self, i: int, j: int) -> None:
        self._position[0] = i * self.width + j
        self.call()

