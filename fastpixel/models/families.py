"""The model families fastpixel serves, by the name files, the trainer and the CLIs use:
"pixelcnnpp" (PixelCNN++, the default), "pixelcnn" (masked) and "gated" (Gated PixelCNN).
The one registry of models: `load`, `sample`, `train` and `eval` go through it. (Each
family's cache is registered beside the engines, in fastpixel/sampling/engines.)"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .masked.gated import GatedConfig, GatedPixelCNN
from .masked.pixelcnn import PixelCNN, PixelCNNConfig
from .pixelcnnpp.config import ModelConfig
from .pixelcnnpp.model import PixelCNNpp


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
