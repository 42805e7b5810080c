"""Images named on a command line: a `.npy` array, a `.png` picture (or a folder of them), or
`DATASET:SPLIT:FIRST-LAST` indices into a data set in a data folder (`mnist:test:0-7`: the
first eight MNIST test images, with their labels)."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .data import DATASETS, SPLITS, load_dataset

_INDICES = re.compile(r"(?P<name>[a-z_0-9]+):(?P<split>[a-z]+):(?P<first>\d+)(?:-(?P<last>\d+))?")


class SourceError(ValueError):
    """A source that cannot be read, or holds no images of the shape asked for."""


@dataclass
class Source:
    """uint8 images (N, C, H, W), or int64 codes (N, H, W), and their labels when the source has them."""
    images: torch.Tensor
    labels: torch.Tensor | None


def read_source(text: str, data_dir: str | Path = "data") -> Source:
    """The images `text` names (see the module docstring); a SourceError says what is wrong."""
    match = _INDICES.fullmatch(text)
    if match and not Path(text).exists():
        return _from_data_set(match, Path(data_dir))
    path = Path(text)
    if path.is_dir():
        pictures = sorted(p for p in path.iterdir() if p.suffix.lower() == ".png")
        if not pictures:
            raise SourceError(f"{text}: the folder holds no .png pictures")
        return Source(torch.cat([_read_png(p) for p in pictures]), None)
    if not path.is_file():
        raise SourceError(f"{text}: no such file or folder, and not DATASET:SPLIT:FIRST-LAST (e.g. mnist:test:0-7)")
    if path.suffix.lower() == ".npy":
        return Source(_read_npy(path), None)
    if path.suffix.lower() == ".png":
        return Source(_read_png(path), None)
    raise SourceError(f"{text}: expected a .npy array, a .png picture, a folder of them, or DATASET:SPLIT:FIRST-LAST")


def _from_data_set(match: re.Match, data_dir: Path) -> Source:
    name, split = match["name"], match["split"]
    if name not in DATASETS or split not in SPLITS:
        raise SourceError(f"{match.string}: the data set must be one of {', '.join(DATASETS)} and the split one of "
                          f"{', '.join(SPLITS)}")
    first = int(match["first"])
    last = first if match["last"] is None else int(match["last"])
    if last < first:
        raise SourceError(f"{match.string}: the last index is below the first")
    data = load_dataset(name, data_dir, split, download=False)  # a DataError names the missing files
    if last >= len(data.images):
        raise SourceError(f"{match.string}: the {split} split of {name} has {len(data.images)} images "
                          f"(indices 0..{len(data.images) - 1})")
    images = data.images[first:last + 1]
    labels = None if data.labels is None else data.labels[first:last + 1]
    return Source(images[:, 0] if name == "codes" else images, labels)


def _read_npy(path: Path) -> torch.Tensor:
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise SourceError(f"{path}: not a readable .npy array ({err})") from None
    if array.dtype == np.uint8 and array.ndim == 3:
        array = array[:, None]  # grey images (N, H, W)
    if array.dtype.kind in "iu" and array.dtype != np.uint8 and array.ndim == 3:
        return torch.from_numpy(array.astype(np.int64))  # a map of codes per image
    if array.dtype != np.uint8 or array.ndim != 4:
        raise SourceError(f"{path}: expected uint8 images (N, C, H, W) or (N, H, W), or integer codes (N, H, W); "
                          f"got {array.dtype} of shape {array.shape}")
    return torch.from_numpy(np.ascontiguousarray(array))


def _read_png(path: Path) -> torch.Tensor:
    try:
        picture = Image.open(path)
        picture.load()
    except OSError as err:
        raise SourceError(f"{path}: not a readable picture ({err})") from None
    grey = picture.mode in ("1", "L", "I", "I;16", "F")
    array = np.asarray(picture.convert("L" if grey else "RGB"))
    return torch.from_numpy(array[None, None] if grey else array.transpose(2, 0, 1)[None].copy())
