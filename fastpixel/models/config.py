"""What every family's configuration shares: the JSON round trip of a config dataclass and
the checks of the fields all families have (image size, classes, flags, labels)."""
from __future__ import annotations

import dataclasses
import json

import torch


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


MAX_PIXELS = 2**31 - 1  # the fused and C++ samplers hold a pixel's raster position in an int32


def image_size(value) -> int | tuple[int, int]:
    """An image size as configs store it: an int for a square, else (height, width)."""
    size = tuple(value) if isinstance(value, (list, tuple)) else value
    if not (is_int(size) or (isinstance(size, tuple) and len(size) == 2 and all(map(is_int, size)))):
        raise ValueError(f"image_size must be an int or (height, width), got {value!r}")
    if isinstance(size, tuple) and size[0] == size[1]:
        size = size[0]  # one spelling per shape, so that equal configs compare equal
    height, width = (size, size) if is_int(size) else size
    if height * width > MAX_PIXELS:
        raise ValueError(f"image_size {value!r} has {height * width} pixels, more than the {MAX_PIXELS} "
                         "a sampler can index")
    return size


def check_channels(value) -> None:
    if not is_int(value) or value not in (1, 3):  # is_int: True and 3.0 compare equal to 1 and 3
        raise ValueError(f"channels must be 1 or 3, got {value!r}")


def check_num_classes(value) -> None:
    if value is not None and (not is_int(value) or value < 2):
        raise ValueError(f"num_classes must be None or an int >= 2, got {value!r}")


def check_flags(config, names) -> None:
    for name in names:
        if not isinstance(getattr(config, name), bool):
            raise ValueError(f"{name} must be True or False, got {getattr(config, name)!r}")


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_labels(config, labels, batch: int) -> None:
    """Raise ValueError unless `labels` suit a batch of `batch` images for this config."""
    if config.num_classes is None:
        if labels is not None:
            raise ValueError("labels were given, but this model is not class-conditional (num_classes is None)")
        return
    if labels is None:
        raise ValueError(f"this model is class-conditional: labels (batch,) in 0..{config.num_classes - 1} are required")
    if not isinstance(labels, torch.Tensor) or labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise ValueError("labels must be an integer tensor of shape (batch,)")
    if labels.shape != (batch,):
        raise ValueError(f"labels must have shape ({batch},), got {tuple(labels.shape)}")
    if batch and not labels.is_meta and (int(labels.min()) < 0 or int(labels.max()) >= config.num_classes):
        raise ValueError(f"labels must lie in 0..{config.num_classes - 1}, got values from {int(labels.min())} to {int(labels.max())}")
