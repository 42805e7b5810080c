"""SHA-256 digests that make a damaged file fail loudly instead of loading changed numbers.

Safetensors and torch's zip format check their structure but not their contents: a bit
flipped in a weight loads as a different weight. Model files carry a digest of their
metadata and tensors in the metadata; torch files (training state) carry a digest of all
their bytes as the zip's comment, which every zip reader skips, so `torch.load` still reads them.
"""
from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import torch

_SEAL = b"fastpixel-sha256:"  # the comment of a sealed zip: this, then the hex digest of every byte before it
_SEAL_LENGTH = len(_SEAL) + 64
_END_OF_ZIP = b"PK\x05\x06"  # the end-of-central-directory record: 22 bytes, the last 2 the comment's length


class IntegrityError(ValueError):
    """A file whose contents do not match the digest stored in it (or that lost its digest)."""


def tensors_digest(metadata: dict[str, str], tensors: dict[str, torch.Tensor]) -> str:
    """Hex SHA-256 of the metadata strings and of every tensor's name, dtype, shape and bytes."""
    digest = hashlib.sha256()
    for key in sorted(metadata):
        digest.update(f"{key}={metadata[key]}\n".encode())
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name} {tensor.dtype} {list(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def sealed(obj) -> bytes:
    """The bytes torch.save(obj) writes, sealed with their digest (write them with write_atomically)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    data = buffer.getvalue()
    if data[-22:-18] != _END_OF_ZIP or data[-2:] != b"\0\0":
        raise RuntimeError("torch.save wrote a zip this code does not know how to seal")
    body = data[:-2] + _SEAL_LENGTH.to_bytes(2, "little") + _SEAL
    return body + hashlib.sha256(body).hexdigest().encode()


def load_sealed(path: str | os.PathLike):
    """torch.load (weights_only, on the CPU) a file of `sealed` bytes, after checking its
    digest; a file from before seals existed (a zip without a comment) loads unchecked."""
    data = Path(path).read_bytes()
    unsealed = data[-22:-18] == _END_OF_ZIP and data[-2:] == b"\0\0"
    if not unsealed:
        body, stored = data[:-64], data[-64:]
        if not body.endswith(_SEAL) or hashlib.sha256(body).hexdigest().encode() != stored:
            raise IntegrityError(f"{path} does not match the SHA-256 digest stored in it: the file is corrupt")
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
