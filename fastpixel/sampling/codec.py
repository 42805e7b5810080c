"""A lossless image codec: `fastpixel.encode(model, images)` and `fastpixel.decode(model, data)`.

A likelihood model is a compressor: an entropy coder driven by the model's probability of
each sub-pixel stores an image in about its negative log-likelihood in bits. Decoding is
sampling with the entropy decoder in place of the noise, so it runs the cached engines
(about one forward pass per image) rather than one pass per sub-pixel.

Exactness. The decoder must see exactly the probabilities the encoder used. Both run the
same engine, on the same batches, through the same steps (`cached_rows(..., decide=...)`):
the encoder decides each level from the image, the decoder from the stream; each asks
`model.level_pmf` for the sub-pixel's distribution (float64) and hands it to `constriction`'s
range coder, whose leaky quantisation (the one quantisation both sides call) gives every
level a non-zero probability, so every image is codable. Arithmetic that differs between
the two machines or engines would decode wrong pixels; a digest of each batch's pixels
catches that, and decoding fails loudly instead.

The file: a header (magic, format version, the model's digest, family, engine, dtype,
image shape, count, batch size, labels, and per batch its stream's length and a digest of
its pixels), then one range-coded stream per batch. A batch (default 64 images) is the
unit of decoding: `decode(..., batches=[k])` decodes batch k alone.
"""
from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from ..backend import NAMES, choose
from ..cores import on_idle_cores
from ..io.integrity import tensors_digest
from ..models.config import check_labels
from ..models.families import family_of
from . import engines
from .likelihood import eval_mode

MAGIC = b"FPXC"
VERSION = 1
DEFAULT_BATCH = 64


class CodecError(ValueError):
    """Data that cannot be decoded with this model here; the message says why."""


@dataclass
class _Header:
    family: str
    model: str          # the model's digest
    engine: str
    dtype: str
    shape: list[int]    # (C, H, W), or (H, W) for maps of codes
    count: int
    batch: int
    labels: list[int] | None
    streams: list[int]  # each batch's stream, in 32-bit words
    digests: list[str]  # each batch's pixels, sha256, first 16 hex digits


def _model_digest(model) -> str:
    return tensors_digest({"config": model.config.to_json()}, model.state_dict())[:32]


def _pixels_digest(levels: torch.Tensor) -> str:
    return hashlib.sha256(levels.to(torch.int64).numpy().tobytes()).hexdigest()[:16]


def _levels(model, images: torch.Tensor) -> torch.Tensor:
    """The integer levels (B, C, H, W) the model codes for uint8 images (or codes (B, H, W))."""
    if model.config.categorical_inputs:
        return images[:, None].long()
    if hasattr(model, "levels"):  # a family with its own levels codes the image at them
        return model.levels(images.double() / 127.5 - 1)
    return images.long()


def _images(model, levels: torch.Tensor) -> torch.Tensor:
    """uint8 images (or int64 codes (B, H, W)) from the coded levels."""
    if model.config.categorical_inputs:
        return levels[:, 0]
    if hasattr(model, "levels"):
        return torch.round((model.canvas_values(levels, torch.float64) + 1) * 127.5).to(torch.uint8)
    return levels.to(torch.uint8)


def _engine(model, engine: str | None) -> tuple[str, torch.dtype]:
    param = next(model.parameters())
    name = choose(param.device, engine, param.dtype)
    return (name if engines.runs(name, family_of(model).name) else "torch"), param.dtype


def _coded_rows(model, size: int, labels, engine: str, code, known: torch.Tensor | None = None):
    """Run a batch of `size` images through the cached engine with every level from
    code(pmf (B, N) float64, the known levels (B,) or None) -> levels (B,); yield the levels
    decided so far (B, C, H, W) after each row. The encoder knows the levels, the decoder not."""
    config = model.config
    param = next(model.parameters())
    height, width = config.shape
    decided = torch.zeros(size, config.channels, height, width, dtype=torch.int64)

    def decide(r, c, channel, params):
        pmf = model.level_pmf(params, channel, decided[:, :channel, r, c]).cpu()
        decided[:, channel, r, c] = code(pmf, None if known is None else known[:, channel, r, c])
        return decided[:, channel, r, c].to(param.device)

    x = torch.zeros(size, config.channels, height, width, dtype=torch.int64 if config.categorical_inputs else param.dtype,
                    device=param.device)
    noise = torch.zeros(size, config.noise_channels, height, width, dtype=torch.float64, device=param.device)
    y = None if labels is None else labels.to(param.device)
    for _ in on_idle_cores(engines.cached_rows(model, x, noise, y, engine=engine, decide=decide), param.device, engine):
        yield decided


def encode(model, images_uint8: torch.Tensor | np.ndarray, labels=None, batch_size: int = DEFAULT_BATCH,
           backend: str | None = None, progress: bool = False) -> bytes:
    """The images (uint8 (N, C, H, W), or int codes (N, H, W) for a prior over codes), and their
    labels for a class-conditional model, as bytes that `decode` with the same model turns back
    into them exactly. `backend` picks the engine (as for `sample`); decoding must use the same."""
    import constriction

    family = family_of(model).name
    images = torch.as_tensor(images_uint8)
    config = model.config
    expected = tuple(config.shape) if config.categorical_inputs else (config.channels, *config.shape)
    if images.dim() != len(expected) + 1 or tuple(images.shape[1:]) != expected or (
            images.dtype != torch.uint8 and not config.categorical_inputs) or images.is_floating_point():
        raise ValueError(f"images must be {'integer codes' if config.categorical_inputs else 'uint8'} of shape "
                         f"(N, {', '.join(map(str, expected))}), got {images.dtype} {tuple(images.shape)}")
    if config.categorical_inputs and images.numel() and (int(images.min()) < 0 or int(images.max()) >= config.color_levels):
        raise ValueError(f"codes must lie in 0..{config.color_levels - 1}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if labels is not None:
        labels = torch.as_tensor(labels)
    check_labels(config, labels, len(images))
    engine, dtype = _engine(model, backend)
    levels = _levels(model, images)
    family_model = constriction.stream.model.Categorical(perfect=False)
    streams, digests = [], []
    with eval_mode(model), torch.no_grad():
        for start in tqdm(range(0, len(images), batch_size), disable=not progress, desc="encoding", unit="batch"):
            chunk = levels[start:start + batch_size]
            coder = constriction.stream.queue.RangeEncoder()
            pending = []  # a row's symbols and their pmfs, encoded at the row's end in one call

            def code(pmf, known, pending=pending):
                pending.append((known, pmf))
                return known

            batch_labels = None if labels is None else labels[start:start + batch_size]
            for _ in _coded_rows(model, len(chunk), batch_labels, engine, code, known=chunk):
                symbols = torch.cat([known for known, _ in pending]).numpy().astype(np.int32)
                coder.encode(symbols, family_model, torch.cat([pmf for _, pmf in pending]).numpy())
                pending.clear()
            streams.append(coder.get_compressed())
            digests.append(_pixels_digest(chunk))
    header = _Header(family, _model_digest(model), engine, str(dtype).removeprefix("torch."), list(expected), len(images),
                     batch_size, None if labels is None else labels.tolist(), [len(s) for s in streams], digests)
    text = json.dumps(header.__dict__, separators=(",", ":")).encode()
    return MAGIC + struct.pack("<BI", VERSION, len(text)) + text + b"".join(s.astype("<u4").tobytes() for s in streams)


def _parse(data: bytes) -> tuple[_Header, list[np.ndarray]]:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise CodecError(f"data must be bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) < 9 or data[:4] != MAGIC:
        raise CodecError("not fastpixel codec data (the magic bytes are missing)")
    version, length = struct.unpack("<BI", data[4:9])
    if version != VERSION:
        raise CodecError(f"codec format version {version}; this fastpixel reads version {VERSION}")
    if 9 + length > len(data):
        raise CodecError("the data is truncated (its header is cut short)")
    try:
        fields = json.loads(data[9:9 + length])
        header = _Header(**fields)
    except (ValueError, TypeError) as err:
        raise CodecError(f"the header is damaged ({err})") from None
    if not _well_formed(header):
        raise CodecError("the header is damaged (a field has an impossible value)")
    words = np.frombuffer(data[9 + length:], dtype="<u4") if (len(data) - 9 - length) % 4 == 0 else None
    batches = -(-header.count // header.batch) if header.batch > 0 else -1
    if (words is None or batches != len(header.streams) or len(header.digests) != batches
            or any(not isinstance(n, int) or n < 0 for n in header.streams) or sum(header.streams) != len(words)):
        raise CodecError("the data is truncated or damaged (its streams do not match the header)")
    offsets = np.cumsum([0, *header.streams])
    return header, [words[offsets[k]:offsets[k + 1]].astype(np.uint32) for k in range(batches)]


def _well_formed(h: _Header) -> bool:
    def ints(values, least=0):
        return isinstance(values, list) and all(type(v) is int and v >= least for v in values)
    return (all(isinstance(v, str) for v in (h.family, h.model, h.engine, h.dtype)) and h.engine in NAMES
            and ints(h.shape, 1) and type(h.count) is int and h.count >= 0 and type(h.batch) is int and h.batch >= 1
            and (h.labels is None or (ints(h.labels) and len(h.labels) == h.count)) and ints(h.streams)
            and isinstance(h.digests, list) and all(isinstance(d, str) for d in h.digests))


def decode(model, data: bytes, batches: list[int] | None = None, backend: str | None = None,
           progress: bool = False) -> torch.Tensor:
    """The images `encode` stored in data, uint8 (N, C, H, W) (int64 codes (N, H, W) for a
    prior over codes), decoded with the same model on the engine that encoded them (or on
    `backend`, where its arithmetic agrees); with `batches`, only those batches' images, in
    order. A CodecError says why data cannot be decoded here (another model, arithmetic that
    differs, damage); it never returns wrong pixels."""
    import constriction

    header, streams = _parse(data)
    config = model.config
    family = family_of(model).name
    expected = list(config.shape) if config.categorical_inputs else [config.channels, *config.shape]
    if header.family != family or header.shape != expected:
        raise CodecError(f"the data was encoded by a {header.family} model of images {header.shape}; this model is a "
                         f"{family} model of images {expected}")
    param = next(model.parameters())
    dtype = str(param.dtype).removeprefix("torch.")
    if header.dtype != dtype:
        raise CodecError(f"the data was encoded with a {header.dtype} model; this one is {dtype}")
    if header.model != _model_digest(model):
        raise CodecError("the data was encoded by another model (its weights' digest differs): decode with the model "
                         "that encoded it")
    engine, _ = _engine(model, backend or header.engine)
    labels = None if header.labels is None else torch.tensor(header.labels, dtype=torch.int64)
    wanted = range(len(streams)) if batches is None else batches
    if any(not isinstance(k, int) or not 0 <= k < len(streams) for k in wanted):
        raise CodecError(f"batches must lie in 0..{len(streams) - 1}")
    family_model = constriction.stream.model.Categorical(perfect=False)
    decoded = []
    with eval_mode(model), torch.no_grad():
        for k in tqdm(wanted, disable=not progress, desc="decoding", unit="batch"):
            start = k * header.batch
            size = min(header.batch, header.count - start)
            decoder = constriction.stream.queue.RangeDecoder(streams[k])

            def code(pmf, known, decoder=decoder):
                return torch.from_numpy(decoder.decode(family_model, pmf.numpy()).astype(np.int64))

            batch_labels = None if labels is None else labels[start:start + size]
            try:
                for levels in _coded_rows(model, size, batch_labels, engine, code):
                    pass
            except (AssertionError, RuntimeError, ValueError, IndexError, OverflowError) as err:
                # the range decoder met a stream its probabilities cannot have produced
                raise CodecError(f"batch {k} cannot be decoded: the data is damaged, or this machine's {engine} engine "
                                 f"computes other probabilities than the encoder's did ({type(err).__name__}: {err})") from None
            if _pixels_digest(levels) != header.digests[k]:
                raise CodecError(f"batch {k} decoded to pixels whose digest differs from the encoder's: the data is "
                                 f"damaged, or this machine's {engine} engine computes other probabilities than the "
                                 "encoder's did (decode where it was encoded)")
            decoded.append(_images(model, levels))
    return torch.cat(decoded)


def read_header(data: bytes) -> dict:
    """What the data holds, without decoding it (a dict of the header's fields)."""
    return _parse(data)[0].__dict__
