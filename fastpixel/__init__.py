"""fastpixel: PixelCNN++, PixelCNN and Gated PixelCNN with fast, exact sampling.

Where things live: `models/` (the families), `sampling/` (the public `sample`, the caches and
the engines that run them), `io/` (files: checkpoints, converters, data, grids), the command
lines beside this file (`python -m fastpixel.sample|train|eval|convert`), `backend.py` (who
runs what), `extension.py` (the C++ engine's build) and `kernels/` (Triton kernels only).
"""
import sys

from .usage import quiet_interrupt_while_importing

quiet_interrupt_while_importing()  # before torch: `python -m fastpixel.train` then Ctrl-C gives no traceback
from .io.checkpoint import load, save
from .models.masked.gated import GatedConfig, GatedPixelCNN
from .models.masked.pixelcnn import PixelCNN, PixelCNNConfig
from .models.pixelcnnpp import mixture
from .models.pixelcnnpp.config import ModelConfig
from .models.pixelcnnpp.model import PixelCNNpp
from .sampling import bits_per_dim, decode, encode, log_prob, sample

sys.modules[f"{__name__}.mixture"] = mixture  # the public module's name: `from fastpixel.mixture import nll` works

__all__ = ["ModelConfig", "PixelCNNpp", "PixelCNNConfig", "PixelCNN", "GatedConfig", "GatedPixelCNN", "mixture",
           "sample", "bits_per_dim", "log_prob", "encode", "decode", "save", "load"]
__version__ = "0.1.0"
