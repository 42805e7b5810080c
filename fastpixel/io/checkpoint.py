"""Model files: safetensors weights with the model's config as JSON metadata and its family
in the format tag, so loading never unpickles anything. Writes are atomic: a killed save
leaves the old file intact.

Loading trusts nothing it reads: the header's tensor names, dtypes and shapes are checked
against the config before any weight is read or any layer built (a config that lies about
its size would otherwise allocate for it), then the SHA-256 digest of metadata and tensors,
then that every weight is finite. The digest finds damage, not forgery: whoever writes a
file can write a matching digest, which is why the header check never trusts the config."""
from __future__ import annotations

import contextlib
import contextvars
import functools
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..models.families import FAMILIES, Family, family_named, family_of
from ..usage import is_special_file
from .integrity import tensors_digest

# "fastpixel.<model class>/2" (Family.format); /2 files carry a digest. PixelCNN++ files
# written before digests ("/1") load with a warning that nothing vouches for their weights.
_LEGACY_FORMAT = "fastpixel.PixelCNNpp/1"
_FAMILY_OF_FORMAT = {**{f.format: f for f in FAMILIES.values()}, _LEGACY_FORMAT: FAMILIES["pixelcnnpp"]}
_DIGEST = "sha256"  # the metadata key of the digest
_FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")  # safetensors' names; every weight of a model is floating point
MODEL_FILE = "model.safetensors"  # the file `load` looks for inside a directory
BUNDLED = Path(__file__).parent.parent / "weights"  # trained models shipped with the package, by name


class CheckpointError(ValueError):
    """A file that is not a readable fastpixel model."""


def save(model, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> Path:
    """Write a model's weights, config and family to `path` (a .safetensors file), atomically,
    with the SHA-256 digest that `load` checks; `metadata` adds strings of your own (e.g. a training step)."""
    family = family_of(model)
    path = Path(path)
    tensors = {name: t.detach().cpu().contiguous() for name, t in model.state_dict().items()}
    metadata = {**(metadata or {}), "format": family.format, "config": model.config.to_json()}
    metadata[_DIGEST] = tensors_digest(metadata, tensors)
    write_atomically(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    return path


def write_atomically(path: Path, write) -> None:
    """Call write(temporary_path) next to `path`, fsync, then rename over `path`, so that a kill
    never leaves half a file. A symlink is written through (its target is replaced, the link
    kept), and a path that is not a regular file (/dev/null, a FIFO, a terminal) is written
    into as it is, never replaced: renaming over /dev/null as root would turn it into a file.
    Inside `written_together`, the rename (or the copy into a special file) waits for its end."""
    path = Path(os.path.realpath(path)) if Path(path).is_symlink() else Path(path)
    special = is_special_file(path)
    if special:
        folder = tempfile.mkdtemp()
        staged = Path(folder) / path.name

        def finish():
            with open(staged, "rb") as source, open(path, "wb") as target:
                shutil.copyfileobj(source, target)
        discard = functools.partial(shutil.rmtree, folder, ignore_errors=True)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        staged = Path(tmp)
        finish = functools.partial(os.replace, staged, path)
        discard = functools.partial(staged.unlink, missing_ok=True)
    try:
        write(str(staged))
        if not special:
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(staged, 0o666 & ~umask)  # mkstemp (and some writers) make 0600; a file follows the umask
            with open(staged, "rb+") as f:
                os.fsync(f.fileno())
    except BaseException:
        discard()
        raise
    together = _written_together.get()
    if together is not None:
        together.append((special, finish, discard))
        return
    try:
        finish()
    finally:
        discard()


_written_together: contextvars.ContextVar[list | None] = contextvars.ContextVar("written_together", default=None)


@contextlib.contextmanager
def written_together():
    """Within: every write_atomically is staged, and only when all have been written does any
    replace its file, so that a failure (a full disk) in any leaves every old file as it was: a
    model and its training state, or a grid and its array, change together or not at all."""
    staged = []
    token = _written_together.set(staged)
    try:
        yield
        for _, finish, _ in sorted(staged, key=lambda s: not s[0]):  # copies into special files can fail; renames not
            finish()
    finally:
        _written_together.reset(token)
        for _, _, discard in staged:
            discard()


def write_array(path: str | os.PathLike, array: np.ndarray) -> None:
    """An .npy file, written atomically (np.save(path) would append ".npy" to the temporary name)."""
    def save(tmp):
        with open(tmp, "wb") as f:
            np.save(f, array)
    write_atomically(Path(path), save)


@contextlib.contextmanager
def new_folders_removed_if_empty(folder: Path):
    """Run the body; then remove `folder` and those of its parents that it brought into being,
    where they stayed empty, so that a command that failed leaves no empty folders behind."""
    created = [d for d in (folder, *folder.parents) if not d.exists()]  # deepest first
    try:
        yield
    finally:
        for directory in created:
            with contextlib.suppress(OSError):  # not empty: it holds what the command wrote
                directory.rmdir()


def bundled_models() -> list[str]:
    """Names of the trained models shipped with fastpixel (`load(name)` loads one)."""
    return sorted(p.stem for p in BUNDLED.glob("*.safetensors"))


def _model_file(path: str | os.PathLike) -> Path:
    """The file `load` reads: `path` itself, `path/model.safetensors`, or a bundled model's."""
    candidate = Path(path)
    bare_name = candidate.suffix == "" and candidate.name == str(path)  # "mnist", not "./mnist" or "m.safetensors"
    # A bundled name wins over a folder of the same name (data folders are often called "mnist").
    if bare_name and (BUNDLED / f"{candidate.name}.safetensors").is_file():
        return BUNDLED / f"{candidate.name}.safetensors"
    if candidate.is_dir():
        return candidate / MODEL_FILE
    if candidate.exists():
        return candidate
    if bare_name:
        raise FileNotFoundError(f"no fastpixel model file at {path}, and no bundled model of that name; "
                                f"bundled models: {', '.join(bundled_models()) or 'none'}")
    raise FileNotFoundError(f"no fastpixel model file at {path}")


def load(path: str | os.PathLike, device: str | torch.device | None = None, family: str | None = None):
    """A model (float32, eval mode) from a file written by `save`, a directory holding
    `model.safetensors` (a training run's save_dir), or the name of a bundled model ("mnist").
    `family` ("pixelcnnpp", "pixelcnn", "gated") refuses a model of any other family.
    A damaged, foreign or inconsistent file raises a CheckpointError that names it."""
    required = None if family is None else family_named(family)
    _check_device(device)
    path = _model_file(path)
    if not path.is_file():
        raise FileNotFoundError(f"no fastpixel model file at {path}")
    try:
        open(path, "rb").close()
    except OSError as err:
        raise CheckpointError(f"cannot read {path}: {err.strerror}") from None
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            found, config = _config(path, metadata)
            if required is not None and found is not required:
                raise CheckpointError(f"{path} holds a {found.title} model, but a {required.title} model is required here")
            _check_header(path, found.model, config, {name: f.get_slice(name) for name in f.keys()})
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except CheckpointError:
        raise
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(_unreadable(path, err)) from None
    _check_contents(path, metadata, tensors)
    model = found.model(config)
    model.load_state_dict({k: v.float() for k, v in tensors.items()})
    return model.to(device or "cpu").eval()


def _check_device(device) -> None:
    """A device this torch cannot use is the user's mistake, said plainly (torch itself asserts)."""
    if device is None:
        return
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device {device!r} is not a torch device: {err}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        why = "this torch is a CPU build" if torch.version.cuda is None else "no CUDA device is visible"
        raise ValueError(f"device {str(device)!r} was asked for, but {why}: load on device='cpu'")


def _unreadable(path: Path, err: Exception) -> str:
    """Why `path` is no safetensors file, naming what it is when that is recognisable."""
    with open(path, "rb") as f:
        head = f.read(4)
    if head == b"PK\x03\x04" or head[:1] == b"\x80":  # torch.save's zip archive, or an older raw pickle
        return (f"{path} is a torch.save file, not a fastpixel model file: a pclucas14/pixel-cnn-pp state_dict "
                f"converts with `python -m fastpixel.convert --from pclucas14 {path} model.safetensors`; a fastpixel "
                "model is saved with fastpixel.save(model, path)")
    return f"{path} is not a readable safetensors file (truncated or corrupt?): {err}"


def _config(path: Path, metadata: dict[str, str]) -> tuple[Family, object]:
    """The file's family and config."""
    family = _FAMILY_OF_FORMAT.get(metadata.get("format"))
    if family is None or "config" not in metadata:
        raise CheckpointError(f"{path} is a safetensors file but not a fastpixel model (no 'fastpixel.<model>/2' "
                              "format metadata)")
    try:
        return family, family.config.from_json(metadata["config"])
    except (ValueError, TypeError) as err:
        raise CheckpointError(f"{path} holds an invalid model config: {err}") from None


def _check_header(path: Path, model_class: type, config, stored: dict) -> None:
    """Names, shapes and dtypes against what the config builds, from the header alone. The
    model's outline comes first: a few shapes that show every width, and a tensor count that
    grows with the depth, so that a forged config (millions of layers, widths whose sizes
    overflow) is refused before anything is built. Then every tensor, from a model on the
    meta device, which allocates nothing."""
    count, shapes = model_class.outline(config)
    _check_tensors(path, shapes, stored)
    if count > len(stored):
        raise CheckpointError(f"{path}: weights do not match its config: the config needs {count} tensors, "
                              f"the file holds {len(stored)}")
    with torch.device("meta"):
        expected = {name: tuple(t.shape) for name, t in model_class(config).state_dict().items()}
    _check_tensors(path, expected, stored)
    extra = sorted(set(stored) - set(expected))
    if extra:
        raise CheckpointError(f"{path}: weights do not match its config: unexpected tensor {extra[0]}")


def _check_tensors(path: Path, expected: dict[str, tuple[int, ...]], stored: dict) -> None:
    """Each expected tensor is in the header, of that shape and floating point."""
    for name, shape in expected.items():
        if name not in stored:
            raise CheckpointError(f"{path}: weights do not match its config: tensor {name} of shape {shape} is missing")
        found = tuple(stored[name].get_shape())
        if found != shape:
            raise CheckpointError(f"{path}: weights do not match its config: tensor {name} has shape {found}, "
                                  f"the config needs {shape}")
        if stored[name].get_dtype() not in _FLOAT_DTYPES:
            raise CheckpointError(f"{path}: tensor {name} is {stored[name].get_dtype()}, "
                                  f"expected floating point ({', '.join(_FLOAT_DTYPES)})")


def _check_contents(path: Path, metadata: dict[str, str], tensors: dict[str, torch.Tensor]) -> None:
    if metadata["format"] == _LEGACY_FORMAT:
        # Old files still load, but so would a /2 file re-tagged /1 to drop its digest: say that nothing vouches for it.
        warnings.warn(f"fastpixel: {path} is a {_LEGACY_FORMAT} file, written before model files carried a digest: "
                      "damaged or altered weights in it cannot be detected. If you trust this copy, "
                      "fastpixel.save(fastpixel.load(path), path) rewrites it with one", UserWarning, stacklevel=3)
    elif _DIGEST not in metadata:
        raise CheckpointError(f"{path} has lost its {_DIGEST} digest: the file is corrupt")
    elif tensors_digest({k: v for k, v in metadata.items() if k != _DIGEST}, tensors) != metadata[_DIGEST]:
        raise CheckpointError(f"{path} does not match the SHA-256 digest stored in it: the file is corrupt")
    for name, tensor in tensors.items():
        if not torch.isfinite(tensor).all():
            raise CheckpointError(f"{path}: tensor {name} holds NaN or infinite values; refusing a broken model")
