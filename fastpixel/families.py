"""The model families fastpixel serves, by the name files, the trainer and the CLIs use:
"pixelcnnpp" (PixelCNN++, the default), "pixelcnn" (masked) and "gated" (Gated PixelCNN)."""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .config import ModelConfig
from .gated import GatedConfig, GatedPixelCNN
from .model import PixelCNNpp
from .pixelcnn import PixelCNN, PixelCNNConfig


@dataclass(frozen=True)
class Family:
    name: str
    title: str          # in messages: "a Gated PixelCNN"
    config: type
    model: type

    @property
    def format(self) -> str:
        """The checkpoint format tag of this family's model files."""
        return f"fastpixel.{self.model.__name__}/2"


FAMILIES = {f.name: f for f in (Family("pixelcnnpp", "PixelCNN++", ModelConfig, PixelCNNpp),
                                Family("pixelcnn", "PixelCNN", PixelCNNConfig, PixelCNN),
                                Family("gated", "Gated PixelCNN", GatedConfig, GatedPixelCNN))}
NAMES = tuple(FAMILIES)
MODEL_TYPES = tuple(f.model for f in FAMILIES.values())


def family_of(model: nn.Module) -> Family:
    """The family of a model; a TypeError for anything else."""
    for family in FAMILIES.values():
        if type(model) is family.model:
            return family
    raise TypeError(f"model must be a fastpixel model ({', '.join(t.__name__ for t in MODEL_TYPES)}), "
                    f"got {type(model).__name__}")


def family_named(name: str) -> Family:
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r}; families: {', '.join(NAMES)}")
    return FAMILIES[name]
