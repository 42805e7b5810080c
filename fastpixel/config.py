"""Model configurations: validated dataclasses that round-trip through JSON. PixelCNN++'s is
here; the masked families' configs (fastpixel.masked) share the round trip and the checks."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

NONLINEARITIES = ("concat_elu", "elu", "relu")


class JsonConfig:
    """The JSON round trip of a config dataclass: every field, and no other."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict):
        """The config `to_dict` gave: every field, and no other (a default taken for a missing
        field would silently build a different model)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} fields {unknown}; known fields are {sorted(known)}")
        missing = sorted(known - set(data))
        if missing:
            raise ValueError(f"{cls.__name__} fields {missing} are missing")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{cls.__name__} JSON is not valid JSON: {err}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{cls.__name__} JSON must be an object")
        return cls.from_dict(data)

    @property
    def shape(self) -> tuple[int, int]:
        """(height, width) of the images."""
        size = self.image_size
        return (size, size) if isinstance(size, int) else size


def image_size(value) -> int | tuple[int, int]:
    """An image size as configs store it: an int for a square, else (height, width)."""
    size = tuple(value) if isinstance(value, (list, tuple)) else value
    if not (is_int(size) or (isinstance(size, tuple) and len(size) == 2 and all(map(is_int, size)))):
        raise ValueError(f"image_size must be an int or (height, width), got {value!r}")
    if isinstance(size, tuple) and size[0] == size[1]:
        size = size[0]  # one spelling per shape, so that equal configs compare equal
    return size


def check_num_classes(value) -> None:
    if value is not None and (not is_int(value) or value < 2):
        raise ValueError(f"num_classes must be None or an int >= 2, got {value!r}")


def check_flags(config, names) -> None:
    for name in names:
        if not isinstance(getattr(config, name), bool):
            raise ValueError(f"{name} must be True or False, got {getattr(config, name)!r}")


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


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
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels!r}")
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
    def categorical_inputs(self) -> bool:
        """PixelCNN++ always reads images (the masked families may read maps of codes)."""
        return False

    @property
    def noise_channels(self) -> int:
        """Uniforms per pixel a sampler consumes: one per component (to choose it), one per channel."""
        return self.nr_logistic_mix + self.channels
