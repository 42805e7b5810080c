"""Model files: safetensors weights with the ModelConfig as JSON metadata, so loading
never unpickles anything. Writes are atomic: a killed save leaves the old file intact."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .config import ModelConfig
from .model import PixelCNNpp

FORMAT = "fastpixel.PixelCNNpp/1"
MODEL_FILE = "model.safetensors"  # the file `load` looks for inside a directory
BUNDLED = Path(__file__).parent / "weights"  # trained models shipped with the package, by name


class CheckpointError(ValueError):
    """A file that is not a readable fastpixel model."""


def save(model: PixelCNNpp, path: str | os.PathLike) -> Path:
    """Write the model's weights and config to `path` (a .safetensors file), atomically."""
    if not isinstance(model, PixelCNNpp):
        raise TypeError(f"model must be a fastpixel.PixelCNNpp, got {type(model).__name__}")
    path = Path(path)
    tensors = {name: t.detach().cpu().contiguous() for name, t in model.state_dict().items()}
    metadata = {"format": FORMAT, "config": model.config.to_json()}
    write_atomically(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    return path


def write_atomically(path: Path, write) -> None:
    """Call write(temporary_path) next to `path`, fsync, then rename over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp (and some writers) make 0600; a normal file follows the umask
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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


def load(path: str | os.PathLike, device: str | torch.device | None = None) -> PixelCNNpp:
    """A model (float32, eval mode) from a file written by `save`, a directory holding
    `model.safetensors` (a training run's save_dir), or the name of a bundled model ("mnist")."""
    path = _model_file(path)
    if not path.is_file():
        raise FileNotFoundError(f"no fastpixel model file at {path}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path} is not a readable safetensors file (truncated or corrupt?): {err}") from None
    if metadata.get("format") != FORMAT or "config" not in metadata:
        raise CheckpointError(f"{path} is a safetensors file but not a fastpixel model (no '{FORMAT}' metadata)")
    try:
        config = ModelConfig.from_dict(json.loads(metadata["config"]))
    except (ValueError, TypeError) as err:
        raise CheckpointError(f"{path} holds an invalid model config: {err}") from None
    model = PixelCNNpp(config)
    try:
        model.load_state_dict({k: v.float() for k, v in tensors.items()})
    except RuntimeError as err:
        raise CheckpointError(f"{path}: weights do not match its config: {err}") from None
    return model.to(device or "cpu").eval()
