"""PixelCNN++'s configuration: a validated dataclass that round-trips through JSON."""
from __future__ import annotations

from dataclasses import dataclass

from ..config import JsonConfig, check_channels, check_flags, check_num_classes, image_size, is_int

NONLINEARITIES = ("concat_elu", "elu", "relu")


@dataclass
class ModelConfig(JsonConfig):
    """Everything that decides a PixelCNN++'s architecture (and nothing about training).

    `image_size` is an int for square images or (height, width); both must be divisible
    by 4 because the network works at full, half and quarter resolution.
    """

    image_size: int | tuple[int, int] = 32
    channels: int = 3
    nr_resnet: int = 5
    nr_filters: int = 160
    nr_logistic_mix: int = 10
    num_classes: int | None = None
    dropout: float = 0.5
    resnet_nonlinearity: str = "concat_elu"
    coordconv: bool = False
    nonlocal_block: bool = False

    def __post_init__(self) -> None:
        self.image_size = image_size(self.image_size)
        if any(s <= 0 or s % 4 for s in self.shape):
            raise ValueError(f"image_size must be positive and divisible by 4 in both dimensions, got {self.image_size!r}")
        check_channels(self.channels)
        for name in ("nr_resnet", "nr_filters", "nr_logistic_mix"):
            value = getattr(self, name)
            if not is_int(value) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        check_num_classes(self.num_classes)
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be a float in [0, 1), got {self.dropout!r}")
        if self.resnet_nonlinearity not in NONLINEARITIES:
            raise ValueError(f"resnet_nonlinearity must be one of {', '.join(NONLINEARITIES)}, got {self.resnet_nonlinearity!r}")
        check_flags(self, ("coordconv", "nonlocal_block"))

    @property
    def num_params_out(self) -> int:
        """Output channels: per mixture component a logit, C means, C log-scales, and for RGB 3 coupling coefficients."""
        from .mixture import num_params
        return num_params(self.channels, self.nr_logistic_mix)

    @property
    def input_channels(self) -> int:
        """Channels the first layers read: the image, a channel of ones and, with CoordConv, the coordinates."""
        return self.channels + 1 + (2 if self.coordconv else 0)

    @property
    def categorical_inputs(self) -> bool:
        """PixelCNN++ always reads images (the masked families may read maps of codes)."""
        return False

    @property
    def noise_channels(self) -> int:
        """Uniforms per pixel a sampler consumes: one per component (to choose it), one per channel."""
        return self.nr_logistic_mix + self.channels
