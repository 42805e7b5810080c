"""Image data sets in their standard formats: MNIST and Fashion-MNIST (IDX files), CIFAR-10 (the
python batches) and downsampled ImageNet (npz), read from a data directory; and maps of discrete
codes (e.g. a VQ-VAE's), for the masked families' categorical inputs. Files that can be had
without a login are downloaded there when missing, and kept only once their md5 matches.

Every reader checks what it reads, so a truncated or foreign file fails here, with its name,
instead of later as a shape error deep inside training.
"""
from __future__ import annotations

import gzip
import hashlib
import http.client
import math
import os
import pickle
import tarfile
import urllib.error
import urllib.request
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from tqdm.auto import tqdm

from .checkpoint import new_folders_removed_if_empty, write_atomically

try:
    from numpy._core.multiarray import _reconstruct  # numpy >= 2
except ImportError:
    from numpy.core.multiarray import _reconstruct

DATASETS = ("mnist", "fashion_mnist", "cifar10", "imagenet32", "imagenet64", "codes")
SPLITS = ("train", "test")
_TIMEOUT = 30  # seconds a download may stall before it counts as failed


@dataclass
class ImageSet:
    """A split of a data set: uint8 images (N, C, H, W), or int64 codes (N, 1, H, W), and int64
    labels (N,) in 0 .. num_classes - 1."""
    images: torch.Tensor
    labels: torch.Tensor | None
    num_classes: int | None


class DataError(ValueError):
    """Missing, corrupt or unreadable data; the message says which file and what to do."""


def load_dataset(name: str, data_dir: str | os.PathLike, split: str = "train", download: bool = True) -> ImageSet:
    """The `split` ("train" or "test"; ImageNet's test split is its validation set) of data set `name`,
    read from `data_dir`. Missing files are downloaded there when `download` is set and the data set
    allows it; otherwise a DataError says which files to put where."""
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; expected one of {', '.join(DATASETS)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    if name == "codes":
        return _read_codes(Path(data_dir), split)
    spec = _SPECS[name]
    images, labels = spec.read(spec, Path(data_dir), split, download)
    return ImageSet(torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64)), spec.num_classes)


@dataclass(frozen=True)
class _Spec:
    title: str  # the data set's name in messages
    read: Callable  # (spec, data_dir, split, download) -> (uint8 images (N, C, H, W), labels (N,))
    folders: tuple[str, ...]  # subfolders of data_dir searched, in order, before data_dir itself
    home: str  # where a person gets the files
    num_classes: int
    url: str | None = None  # downloads come from url + file name; None: the files need a login
    md5: dict[str, str] = field(default_factory=dict)  # downloaded file -> its published md5
    size: int = 0  # image side, for formats that come in several sizes


# Finding files, and downloading the missing ones.

def _search_dirs(spec: _Spec, data_dir: Path) -> list[Path]:
    # A data set's own folder comes first: MNIST and Fashion-MNIST files have the same names.
    return [data_dir / sub for sub in spec.folders] + [data_dir]


def _find(names, dirs: list[Path], suffixes=("",)) -> dict[str, Path | None]:
    """Where each file is: the first of dirs that holds it under one of the suffixes, or None."""
    return {name: next((d / (name + s) for d in dirs for s in suffixes if (d / (name + s)).is_file()), None)
            for name in names}


def _locate(spec: _Spec, data_dir: Path, split: str, names, download: bool, suffixes=("",)) -> list[Path]:
    """Each file's path, after downloading the missing ones (under the last suffix) into the data
    set's own folder; a DataError says what to put where when that is not possible."""
    dirs = _search_dirs(spec, data_dir)
    found = _find(names, dirs, suffixes)
    missing = [name + suffixes[-1] for name, path in found.items() if path is None]
    if missing:
        _download_missing(spec, data_dir, split, dirs[0], missing, download)
        found = _find(names, dirs, suffixes)
    return list(found.values())


def _download_missing(spec: _Spec, data_dir: Path, split: str, folder: Path, files: list[str], download: bool) -> None:
    """Download `files` into `folder`, or raise a DataError that says why not and what to put where."""
    def missing(reason: str) -> DataError:
        listing = "".join(f"\n  {f}" for f in files)
        return DataError(f"{spec.title} {split} files are missing from {data_dir}; {reason}.\n"
                         f"Put these files in {folder}:{listing}\nfrom {spec.home}")

    if spec.url is None:
        raise missing("they need a login to download, so fastpixel never fetches them")
    if not download:
        raise missing("download=False, so nothing was fetched")
    with new_folders_removed_if_empty(folder):
        for file in files:
            url = spec.url + file
            try:
                _download(url, folder / file, spec.md5[file])
            except (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException) as err:
                why = "the server refused" if isinstance(err, urllib.error.HTTPError) else "this machine seems offline"
                raise missing(f"downloading {url} failed ({err}): {why}") from None


def _download(url: str, dest: Path, md5: str) -> None:
    """Fetch url to dest, kept only if its md5 is the published one: a partial or wrong file never stays."""
    def fetch_and_check(tmp: str) -> None:
        _fetch(url, Path(tmp))
        digest = _md5(tmp)
        if digest != md5:
            raise DataError(f"{url} downloaded with md5 {digest}, expected {md5} (corrupted on the way, or changed "
                            f"upstream); nothing was saved to {dest}. Try again, or put the file there yourself")

    write_atomically(dest, fetch_and_check)


def _fetch(url: str, dest: Path) -> None:
    """Download url to dest with a progress bar: the one function that touches the network."""
    with urllib.request.urlopen(url, timeout=_TIMEOUT) as response, open(dest, "wb") as f:
        size = int(response.headers.get("Content-Length") or 0) or None
        with tqdm(total=size, unit="B", unit_scale=True, desc=url.rsplit("/", 1)[-1]) as bar:
            while chunk := response.read(1 << 20):
                f.write(chunk)
                bar.update(len(chunk))


def _md5(path: str | Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _check_labels(path: Path, labels: np.ndarray, count: int, first: int, num_classes: int) -> None:
    """labels must number `count` (one per image) and lie in first .. first + num_classes - 1."""
    if labels.shape != (count,):
        raise DataError(f"{path} holds labels of shape {labels.shape} for {count} images; expected ({count},)")
    if count and (labels.min() < first or labels.max() >= first + num_classes):
        raise DataError(f"{path} holds labels from {labels.min()} to {labels.max()}, "
                        f"expected {first} .. {first + num_classes - 1}")


# MNIST and Fashion-MNIST: IDX files, gzipped or not.

_IDX_IMAGES, _IDX_LABELS = 2051, 2049  # magic numbers: uint8 data with 3 dimensions, and with 1


def _read_mnist(spec: _Spec, data_dir: Path, split: str, download: bool) -> tuple[np.ndarray, np.ndarray]:
    """One IDX file of 28x28 images and one of labels per split."""
    prefix = "train" if split == "train" else "t10k"
    names = (f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte")
    images_path, labels_path = _locate(spec, data_dir, split, names, download, suffixes=("", ".gz"))
    images = _read_idx(images_path, _IDX_IMAGES, (28, 28), (spec.title, names[0]))
    labels = _read_idx(labels_path, _IDX_LABELS, (), (spec.title, names[1]))
    _check_labels(labels_path, labels, len(images), 0, spec.num_classes)
    return images[:, None], labels


# SHA-256 of the uncompressed official files (the gzip around them differs between sources). MNIST and
# Fashion-MNIST share file names, so only the contents tell which data set a folder holds.
_KNOWN_IDX = {
    "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db": ("MNIST", "train-images-idx3-ubyte"),
    "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5": ("MNIST", "train-labels-idx1-ubyte"),
    "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7": ("MNIST", "t10k-images-idx3-ubyte"),
    "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2": ("MNIST", "t10k-labels-idx1-ubyte"),
    "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888": ("Fashion-MNIST", "train-images-idx3-ubyte"),
    "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9": ("Fashion-MNIST", "train-labels-idx1-ubyte"),
    "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b": ("Fashion-MNIST", "t10k-images-idx3-ubyte"),
    "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34": ("Fashion-MNIST", "t10k-labels-idx1-ubyte"),
}


def _read_idx(path: Path, magic: int, item_shape: tuple[int, ...], wanted: tuple[str, str]) -> np.ndarray:
    """An IDX file's array (count, *item_shape), after checking its magic number, shape and length,
    and that it is not a known file other than `wanted` (data set title, file name); files of
    your own, which no checksum knows, are read as they are."""
    raw = path.read_bytes()
    if path.suffix == ".gz":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as err:
            raise DataError(f"{path} does not decompress ({err}); delete it and download it again") from None
    found_file = _KNOWN_IDX.get(hashlib.sha256(raw).hexdigest(), wanted)
    if found_file != wanted:
        raise DataError(f"{path} is {found_file[0]}'s {found_file[1]} (by its SHA-256), not {wanted[0]}'s {wanted[1]}; "
                        f"give {wanted[0]} a folder of its own")
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        raise DataError(f"{path} starts with magic number {found}, expected {magic} for an IDX "
                        f"{'image' if magic == _IDX_IMAGES else 'label'} file (a wrong or corrupt file)")
    header = 4 * (2 + len(item_shape))  # magic, count, then one size per item dimension
    if len(raw) < header:
        raise DataError(f"{path} has {len(raw)} bytes, fewer than an IDX header (truncated); "
                        "delete it and download it again")
    shape = tuple(int.from_bytes(raw[i:i + 4], "big") for i in range(4, header, 4))
    if len(raw) != header + math.prod(shape):
        raise DataError(f"{path} has {len(raw)} bytes but its header promises {header + math.prod(shape)} "
                        "(truncated or corrupt); delete it and download it again")
    if shape[1:] != item_shape:
        raise DataError(f"{path} holds items of shape {shape[1:]}, expected {item_shape}")
    return np.frombuffer(raw, np.uint8, offset=header).reshape(shape).copy()  # copy: writable, for torch


# CIFAR-10: pickled python batches, or the tarball that holds them.

_CIFAR_TARBALL = "cifar-10-python.tar.gz"
_CIFAR_BATCHES = {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)}


def _read_cifar(spec: _Spec, data_dir: Path, split: str, download: bool) -> tuple[np.ndarray, np.ndarray]:
    """The split's batches; when some are missing, they are first extracted from the tarball in
    data_dir, downloaded if need be."""
    dirs = _search_dirs(spec, data_dir)
    found = _find(_CIFAR_BATCHES[split], dirs)
    if None in found.values():
        tarball = data_dir / _CIFAR_TARBALL
        if not tarball.is_file():
            _download_missing(spec, data_dir, split, data_dir, [_CIFAR_TARBALL], download)
        _extract_cifar(tarball, dirs[0])
        found = _find(_CIFAR_BATCHES[split], dirs)
    batches = [_read_cifar_batch(path) for path in found.values()]
    # Each row is the red 32x32 plane, then green, then blue, each row-major: already C, H, W order.
    images = np.concatenate([data for data, _ in batches]).reshape(-1, 3, 32, 32)
    return images, np.concatenate([labels for _, labels in batches])


def _extract_cifar(tarball: Path, folder: Path) -> None:
    """Write the six batches into folder. Members are read by their known names, so no path
    stored in the archive decides where anything is written."""
    members = [*_CIFAR_BATCHES["train"], *_CIFAR_BATCHES["test"]]
    try:
        with tarfile.open(tarball, "r:gz") as tar:
            contents = {name: tar.extractfile(f"cifar-10-batches-py/{name}").read() for name in members}
    except KeyError as err:
        raise DataError(f"{tarball} has no {err} (not the CIFAR-10 python version?); "
                        "delete it and download it again") from None
    except (tarfile.TarError, OSError, EOFError, zlib.error, AttributeError) as err:  # AttributeError: not a file
        raise DataError(f"{tarball} is not a readable tar.gz ({err}); delete it and download it again") from None
    for name, content in contents.items():
        write_atomically(folder / name, lambda tmp, content=content: Path(tmp).write_bytes(content))


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles CIFAR-10 batches and nothing else: the only globals they name rebuild numpy
    arrays, and refusing every other one stops a crafted file from running code."""
    _ALLOWED: ClassVar[dict] = {("numpy.core.multiarray", "_reconstruct"): _reconstruct,
                                ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
                                ("numpy", "ndarray"): np.ndarray,
                                ("numpy", "dtype"): np.dtype}

    def __init__(self, file, path: Path):
        super().__init__(file, encoding="bytes")  # the batches were pickled by Python 2
        self.path = path

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise DataError(f"{self.path} asks to load {module}.{name}, which no CIFAR-10 batch does; "
                            "refusing to unpickle it (a foreign or tampered file)")
        return self._ALLOWED[module, name]


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One batch: its b"data" (n, 3072) uint8 and its n b"labels"."""
    try:
        with open(path, "rb") as f:
            batch = _NumpyOnlyUnpickler(f, path).load()
        data, labels = batch[b"data"], np.asarray(batch[b"labels"], dtype=np.int64)
    except DataError:
        raise
    except Exception as err:  # noqa: BLE001  (a corrupt pickle can fail in many ways; all mean the same here)
        raise DataError(f"{path} is not a readable CIFAR-10 python batch ({type(err).__name__}: {err}); "
                        "delete it and extract or download it again") from None
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataError(f"{path}: b'data' is not a uint8 array (n, 3072)")
    _check_labels(path, labels, len(data), 0, 10)
    return data, labels


# Downsampled ImageNet: npz batches, which need a login to download.

def _read_imagenet(spec: _Spec, data_dir: Path, split: str, download: bool) -> tuple[np.ndarray, np.ndarray]:
    """Ten train batches, or val_data.npz for the test split."""
    names = [f"train_data_batch_{i}.npz" for i in range(1, 11)] if split == "train" else ["val_data.npz"]
    batches = [_read_npz(path, spec.size) for path in _locate(spec, data_dir, split, names, download)]
    # Rows are channel-major (all red, then green, then blue), like CIFAR's; labels count from 1.
    images = np.concatenate([data for data, _ in batches]).reshape(-1, 3, spec.size, spec.size)
    return images, np.concatenate([labels for _, labels in batches]) - 1


def _read_npz(path: Path, size: int) -> tuple[np.ndarray, np.ndarray]:
    """One batch: its "data" (n, 3*size*size) uint8 and its n "labels" in 1 .. 1000."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            data, labels = npz["data"], npz["labels"]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error) as err:
        raise DataError(f"{path} is not a readable ImageNet npz batch with 'data' and 'labels' "
                        f"({type(err).__name__}: {err}); delete it and download it again") from None
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * size * size:
        raise DataError(f"{path}: 'data' is {data.dtype} {data.shape}, expected uint8 (n, {3 * size * size}) "
                        f"for {size}x{size} images")
    if labels.dtype.kind not in "iu":
        raise DataError(f"{path}: 'labels' are {labels.dtype}, expected integers 1 .. 1000")
    labels = labels.astype(np.int64)
    _check_labels(path, labels, len(data), 1, 1000)
    return data, labels


def _imagenet_folders(size: int) -> tuple[str, ...]:
    # imagenet<size>/ first, then the folders the official zips unpack to, at the top or inside it.
    official = [f"Imagenet{size}_{part}_npz" for part in ("train", "train_part1", "train_part2", "val")]
    return (f"imagenet{size}", *official, *(f"imagenet{size}/{folder}" for folder in official))


# Maps of discrete codes: data_dir/train.npz and data_dir/test.npz, each holding "codes", integers
# (N, H, W) >= 0, and optionally "labels" (N,) with "num_classes".

def _read_codes(data_dir: Path, split: str) -> ImageSet:
    path = data_dir / f"{split}.npz"
    if not path.is_file():
        raise DataError(f"no {path}: the codes data set reads {data_dir}/train.npz and {data_dir}/test.npz, each "
                        "with 'codes' (N, H, W) integers and optionally 'labels' (N,) and 'num_classes'")
    try:
        with np.load(path, allow_pickle=False) as npz:
            codes = npz["codes"]
            labels = npz["labels"] if "labels" in npz else None
            num_classes = int(npz["num_classes"]) if "num_classes" in npz else None
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error) as err:
        raise DataError(f"{path} is not a readable npz of codes with a 'codes' array ({type(err).__name__}: {err})") from None
    if codes.dtype.kind not in "iu" or codes.ndim != 3 or len(codes) == 0 or codes.min() < 0:
        raise DataError(f"{path}: 'codes' is {codes.dtype} {codes.shape}, expected non-negative integers (N, H, W)")
    if labels is not None:
        if labels.dtype.kind not in "iu":
            raise DataError(f"{path}: 'labels' are {labels.dtype}, expected integers")
        num_classes = num_classes or int(labels.max()) + 1
        _check_labels(path, labels.astype(np.int64), len(codes), 0, num_classes)
    return ImageSet(torch.from_numpy(codes.astype(np.int64)[:, None]),
                    None if labels is None else torch.from_numpy(labels.astype(np.int64)), num_classes)


_MNIST_URL = "http://yann.lecun.com/exdb/mnist/"
_FASHION_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
_IMAGENET_HOME = "https://image-net.org/download-images.php (Downsampled ImageNet {0}x{0}, npz; needs a login)"

_SPECS = {
    "mnist": _Spec(
        title="MNIST", read=_read_mnist, folders=("mnist", "MNIST/raw"), home=_MNIST_URL, num_classes=10,
        url=_MNIST_URL, md5={"train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
                             "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
                             "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
                             "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c"}),
    "fashion_mnist": _Spec(
        title="Fashion-MNIST", read=_read_mnist, folders=("fashion_mnist", "fashion-mnist", "FashionMNIST/raw"),
        home=_FASHION_URL, num_classes=10,
        url=_FASHION_URL, md5={"train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
                               "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
                               "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
                               "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310"}),
    "cifar10": _Spec(
        title="CIFAR-10", read=_read_cifar, folders=("cifar-10-batches-py",),
        home="https://www.cs.toronto.edu/~kriz/cifar.html", num_classes=10,
        url="https://www.cs.toronto.edu/~kriz/", md5={_CIFAR_TARBALL: "c58f30108f718f92721af3b95e74349a"}),
    "imagenet32": _Spec(
        title="Downsampled ImageNet 32x32", read=_read_imagenet, folders=_imagenet_folders(32),
        home=_IMAGENET_HOME.format(32), num_classes=1000, size=32),
    "imagenet64": _Spec(
        title="Downsampled ImageNet 64x64", read=_read_imagenet, folders=_imagenet_folders(64),
        home=_IMAGENET_HOME.format(64), num_classes=1000, size=64),
}
