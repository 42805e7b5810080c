"""How much memory a model's work takes, counted on the meta device, which allocates nothing:
its weights and all its layers' outputs (training keeps them for the backward pass), and the
peak a no-grad forward pass holds at once (sampling). Training and sampling scale these by
what they were measured to keep alive, to refuse before any work a request whose memory
cannot exist."""
from __future__ import annotations

import functools
import hashlib
import json
import os
import sys
import tempfile
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ..extension import build_dir
from ..usage import signals_held


def values_held(model_class: type, config) -> tuple[int, int]:
    """(values in the weights, values output by all layers for one image)."""
    outputs = [0]

    def count(module, inputs, output):
        if isinstance(output, torch.Tensor):
            outputs[0] += output.numel()

    with signals_held(), torch.device("meta"):  # the first meta-device work imports Triton
        model = model_class(config)
        hooks = [m.register_forward_hook(count) for m in model.modules() if not list(m.children())]
        codes = config.categorical_inputs
        x = torch.zeros((1, *config.shape), dtype=torch.long) if codes else torch.zeros((1, config.channels, *config.shape))
        model(x, None if config.num_classes is None else torch.zeros(1, dtype=torch.long))
    for hook in hooks:
        hook.remove()
    return sum(p.numel() for p in model.parameters()), outputs[0]


class _LiveBytes(TorchDispatchMode):
    """Follows the bytes held by tensors as ops make them and Python frees them: the peak is
    what a forward pass needs at once. A view is not counted (it shares its base's memory)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        returns = func._schema.returns
        for i, t in enumerate(out if isinstance(out, (tuple, list)) else [out]):
            if isinstance(t, torch.Tensor) and not (i < len(returns) and returns[i].alias_info is not None):
                size = t.untyped_storage().nbytes()
                self.live += size
                self.peak = max(self.peak, self.live)
                weakref.finalize(t, self._free, size)
        return out

    def _free(self, size: int) -> None:
        self.live -= size


def forward_peak(model_class: type, config, dtype: torch.dtype = torch.float32) -> int:
    """Bytes a no-grad forward pass holds at once for each image of its batch (the peak at two
    images less the peak at one: what the weights alone make is not per image). Remembered per
    configuration, in this process and on disk beside the compiled engines: following a pass
    takes a second, most of it PyTorch's first meta-device operations, which a draw from the
    command line would otherwise pay at every start."""
    return _forward_peak(model_class, type(config), config.to_json(), dtype)


@functools.lru_cache(maxsize=16)
def _forward_peak(model_class: type, config_class: type, config_json: str, dtype: torch.dtype) -> int:
    key = f"{model_class.__qualname__} {_code_digest(model_class)} {config_json} {dtype} torch {torch.__version__}"
    path = build_dir() / "footprints.json"
    known = _remembered(path)
    if isinstance(known.get(key), int):
        return known[key]
    peak = _count_forward_peak(model_class, config_class.from_json(config_json), dtype)
    _remember(path, {**known, key: peak})
    return peak


def _code_digest(model_class: type) -> str:
    """A digest of the source of the model's package: a count is stale once its layers change."""
    package = Path(sys.modules[model_class.__module__].__file__).parent
    return hashlib.sha256(b"".join(f.read_bytes() for f in sorted(package.glob("*.py")))).hexdigest()[:16]


def _remembered(path: Path) -> dict:
    """The counts on disk; none when the file is absent, unreadable or not a JSON object."""
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return known if isinstance(known, dict) else {}


def _remember(path: Path, known: dict) -> None:
    """Writes the counts whole or not at all (a temporary file, then a rename): processes may
    share the file. A read-only or full disk costs the count again next time, nothing more."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    except OSError:
        return
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(known, f, indent=1)
        os.replace(name, path)
    except OSError:
        Path(name).unlink(missing_ok=True)


def _count_forward_peak(model_class: type, config, dtype: torch.dtype) -> int:
    peaks = []
    with signals_held(), torch.device("meta"), torch.no_grad():  # the first meta-device work imports Triton
        model = model_class(config).to(dtype).eval()
        for batch in (1, 2):
            codes = config.categorical_inputs
            shape = (batch, *config.shape) if codes else (batch, config.channels, *config.shape)
            x = torch.zeros(shape, dtype=torch.long if codes else dtype)
            labels = None if config.num_classes is None else torch.zeros(batch, dtype=torch.long)
            with _LiveBytes() as live:
                model(x, labels)
            peaks.append(live.peak)
    return peaks[1] - peaks[0]
