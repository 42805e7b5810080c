"""fastpixel: PixelCNN++, PixelCNN and Gated PixelCNN with fast, exact sampling."""
from .usage import quiet_interrupt_while_importing

quiet_interrupt_while_importing()  # before torch: `python -m fastpixel.train` then Ctrl-C gives no traceback
from . import mixture
from .checkpoint import load, save
from .config import ModelConfig
from .gated import GatedConfig, GatedPixelCNN
from .model import PixelCNNpp
from .pixelcnn import PixelCNN, PixelCNNConfig
from .sampling import bits_per_dim, sample

__all__ = ["ModelConfig", "PixelCNNpp", "PixelCNNConfig", "PixelCNN", "GatedConfig", "GatedPixelCNN", "mixture",
           "sample", "bits_per_dim", "save", "load"]
__version__ = "0.1.0"
