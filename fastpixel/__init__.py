"""fastpixel: PixelCNN++, PixelCNN and Gated PixelCNN with fast, exact sampling.

Where things live: `models/` (the families), `sampling/` (the public `sample`, the caches and
the engines that run them), `io/` (files: checkpoints, converters, data, grids), the command
lines beside this file (`python -m fastpixel.sample|train|eval|convert`), `backend.py` (who
runs what), `extension.py` (the C++ engine's build) and `kernels/` (Triton kernels only).
"""
import sys
import types

from .usage import quiet_interrupt_while_importing

quiet_interrupt_while_importing()  # before torch: `python -m fastpixel.train` then Ctrl-C gives no traceback
from . import io, models, sampling  # noqa: F401  (bound on import: `fastpixel.io.data.load_dataset` works)
from .backend import BackendError
from .extension import BuildError
from .io.checkpoint import CheckpointError, load, save
from .io.converters import ConvertError
from .io.data import DataError
from .models.masked.gated import GatedConfig, GatedPixelCNN
from .models.masked.pixelcnn import PixelCNN, PixelCNNConfig
from .models.pixelcnnpp import mixture
from .models.pixelcnnpp.config import ModelConfig
from .models.pixelcnnpp.model import PixelCNNpp
from .sampling import bits_per_dim, decode, encode, log_prob, sample
from .sampling.codec import CodecError

sys.modules[f"{__name__}.mixture"] = mixture  # the public module's name: `from fastpixel.mixture import nll` works

__all__ = ["ModelConfig", "PixelCNNpp", "PixelCNNConfig", "PixelCNN", "GatedConfig", "GatedPixelCNN", "mixture",
           "sample", "bits_per_dim", "log_prob", "encode", "decode", "save", "load",
           "CheckpointError", "DataError", "ConvertError", "CodecError", "BackendError", "BuildError"]
__version__ = "0.1.0"


class _Package(types.ModuleType):
    """`fastpixel.sample` stays the function when the command line of the same name,
    `fastpixel/sample.py`, is imported (the import system would bind the module over it); the
    module is still `sys.modules["fastpixel.sample"]`, and `from fastpixel.sample import main` works."""

    def __setattr__(self, name: str, value) -> None:
        if name == "sample" and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
