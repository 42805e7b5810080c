"""Reading TensorFlow checkpoints without TensorFlow (the V2 "tensor bundle" every Saver
has written since TF 1.0: `prefix.index` plus `prefix.data-00000-of-00001`).

A 500 MB framework to read a few hundred float arrays is a poor trade, and the format is
small: the .index is a LevelDB-style table whose footer points to an index block, whose
entries point to data blocks of prefix-compressed (key, value) records. Key "" holds the
BundleHeaderProto (shard count, byte order); every other key is a tensor's name, and its
value a BundleEntryProto (dtype, shape, shard, offset, size, checksum) locating raw
little-endian bytes in a data file. The two protobuf messages are decoded by hand (wire
format only). Each table block read and each tensor read is checked against its masked
CRC-32C: a flipped bit must not load as a different weight.
"""
from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

TABLE_MAGIC = 0xDB4775248B80FB57
FOOTER_SIZE = 48  # two varint block handles padded to 40 bytes, then the magic
DTYPES = {1: "<f4", 2: "<f8", 3: "<i4", 9: "<i8", 19: "<f2"}  # TF DataType enum -> numpy
CASTAGNOLI = 0x82F63B78  # CRC-32C's polynomial, bit-reversed (the CRC runs least significant bit first)


class BundleError(ValueError):
    """A file that is not a readable TensorFlow V2 checkpoint."""


@dataclass(frozen=True)
class Entry:
    dtype: int
    shape: tuple[int, ...]
    shard: int
    offset: int
    size: int
    crc32c: int  # masked


class TensorBundle:
    """The tensors of one checkpoint, by name: `shapes` from the index, `get` reads one."""

    def __init__(self, prefix: str | os.PathLike):
        self.prefix = str(prefix)
        index = Path(self.prefix + ".index")
        if not index.is_file():
            raise BundleError(f"no TensorFlow checkpoint index at {index}")
        records = dict(_table_records(index.read_bytes(), index))
        if b"" not in records:
            raise BundleError(f"{index} has no bundle header: not a TensorFlow V2 checkpoint")
        header = dict((f, v) for f, _, v in _fields(records.pop(b"")))
        if header.get(2, 0) != 0:
            raise BundleError(f"{index} holds big-endian tensors, which this reader does not handle")
        self.num_shards = header.get(1, 1)
        self.entries = {key.decode(): _entry(value, key) for key, value in records.items()}

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: e.shape for name, e in self.entries.items()}

    def get(self, name: str) -> np.ndarray:
        entry = self.entries[name]
        if entry.dtype not in DTYPES:
            raise BundleError(f"tensor {name} has TensorFlow dtype {entry.dtype}, which this reader does not handle")
        dtype = np.dtype(DTYPES[entry.dtype])
        if entry.size != math.prod(entry.shape) * dtype.itemsize:
            raise BundleError(f"tensor {name}: {entry.size} bytes do not fit shape {entry.shape}")
        path = f"{self.prefix}.data-{entry.shard:05d}-of-{self.num_shards:05d}"
        try:
            with open(path, "rb") as f:
                f.seek(entry.offset)
                data = f.read(entry.size)
        except OSError as err:
            raise BundleError(f"cannot read {path}: {err}") from None
        if len(data) != entry.size:
            raise BundleError(f"{path} is truncated: tensor {name} needs bytes {entry.offset}..{entry.offset + entry.size}")
        if masked_crc32c(data) != entry.crc32c:
            raise BundleError(f"{path} is corrupt: the bytes of tensor {name} do not match their CRC-32C checksum")
        return np.frombuffer(data, dtype).reshape(entry.shape)


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buf):
            raise BundleError("truncated varint")
        byte = buf[pos]
        value |= (byte & 0x7F) << shift
        pos += 1
        if byte < 0x80:
            return value, pos
        shift += 7


def _fields(buf: bytes):
    """(field number, wire type, value) of a protobuf message; length-delimited values are bytes."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = buf[pos:pos + 8], pos + 8
        elif wire == 2:
            length, pos = _varint(buf, pos)
            value, pos = buf[pos:pos + length], pos + length
        elif wire == 5:
            value, pos = buf[pos:pos + 4], pos + 4
        else:
            raise BundleError(f"unsupported protobuf wire type {wire}")
        yield field, wire, value


def _entry(value: bytes, key: bytes) -> Entry:
    fields = {1: 0, 3: 0, 4: 0, 5: 0, 6: bytes(4)}  # proto3 leaves out fields that are zero
    shape: list[int] = []
    for field, _, v in _fields(value):
        if field == 2:  # TensorShapeProto: repeated Dim (field 2) {size: field 1}
            shape += [dict((f, x) for f, _, x in _fields(dim)).get(1, 0) for f, _, dim in _fields(v) if f == 2]
        elif field == 7:
            raise BundleError(f"tensor {key.decode()} is saved in slices (a partitioned variable), which this reader does not handle")
        else:
            fields[field] = v
    return Entry(fields[1], tuple(shape), fields[3], fields[4], fields[5], struct.unpack("<I", fields[6])[0])


def _table_records(data: bytes, path: Path):
    """Every (key, value) of a LevelDB-format table, in order."""
    if len(data) < FOOTER_SIZE or struct.unpack("<Q", data[-8:])[0] != TABLE_MAGIC:
        raise BundleError(f"{path} is not a TensorFlow checkpoint index (no table magic at its end)")
    footer = data[-FOOTER_SIZE:]
    _, pos = _varint(footer, 0)  # the metaindex block: filters, unused here
    _, pos = _varint(footer, pos)
    index_offset, pos = _varint(footer, pos)
    index_size, _ = _varint(footer, pos)
    for _, handle in _block_records(data, index_offset, index_size, path):
        offset, pos = _varint(handle, 0)
        size, _ = _varint(handle, pos)
        yield from _block_records(data, offset, size, path)


def _block_records(data: bytes, offset: int, size: int, path: Path):
    if offset + size + 5 > len(data) or size < 4:
        raise BundleError(f"{path} is truncated or corrupt: a block of its table lies outside it")
    # The block trailer: the compression type, then the masked CRC-32C of the block and that type.
    if masked_crc32c(data[offset:offset + size + 1]) != struct.unpack("<I", data[offset + size + 1:offset + size + 5])[0]:
        raise BundleError(f"{path} is corrupt: a block of its table does not match its CRC-32C checksum")
    if data[offset + size] != 0:
        raise BundleError(f"{path} has compressed blocks, which this reader does not handle")
    block = data[offset:offset + size]
    num_restarts = struct.unpack("<I", block[-4:])[0]
    end = len(block) - 4 * (num_restarts + 1)
    pos, key = 0, b""
    while pos < end:
        shared, pos = _varint(block, pos)
        unshared, pos = _varint(block, pos)
        length, pos = _varint(block, pos)
        key = key[:shared] + block[pos:pos + unshared]
        pos += unshared
        yield key, block[pos:pos + length]
        pos += length


# --------------------------------------------------------------------------- CRC-32C
def crc32c_reference(data: bytes) -> int:
    """CRC-32C bit by bit, as its definition reads: the slow twin that `crc32c` is tested against."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (CASTAGNOLI if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def _word_step() -> np.ndarray:
    """The register after one 32-bit word of zeros, as four 256-entry tables, one per byte of
    the register before it (the tables of "slicing by 4", in the order of the register's bytes)."""
    byte = np.arange(256, dtype=np.uint32)
    for _ in range(8):
        byte = np.where(byte & 1, (byte >> 1) ^ np.uint32(CASTAGNOLI), byte >> 1)
    tables = [byte]
    for _ in range(3):
        tables.append((tables[-1] >> 8) ^ byte[tables[-1] & 0xFF])
    return np.stack(tables[::-1])


# A CRC register's change over zeros is linear over GF(2): held as four byte tables, it
# applies to an array of registers at once, composes, and raises to powers.
_WORD_STEP = _word_step()
_IDENTITY = np.arange(256, dtype=np.uint32) << (8 * np.arange(4, dtype=np.uint32))[:, None]


def _apply(step: np.ndarray, registers: np.ndarray) -> np.ndarray:
    return (step[0].take(registers & 0xFF) ^ step[1].take((registers >> 8) & 0xFF)
            ^ step[2].take((registers >> 16) & 0xFF) ^ step[3].take(registers >> 24))


def _then(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    return _apply(second, _apply(first, _IDENTITY))


def _power(step: np.ndarray, n: int) -> np.ndarray:
    result = _IDENTITY
    while n:
        if n & 1:
            result = _then(result, step)
        step, n = _then(step, step), n >> 1
    return result


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli) of `data`, vectorised: pure Python would take minutes over a CIFAR
    model. The data is cut into about 4 * sqrt(words) equal lanes, whose CRCs advance together
    one word at a time, then merge pairwise (the first lane's register carried over as many
    zeros as the second lane is long, XORed with the second's)."""
    data = np.frombuffer(data, np.uint8)
    if data.size < 4:
        return crc32c_reference(data.tobytes())
    words = -(-data.size // 4)
    lanes = min(1 << round(math.log2(16 * words) / 2), 1 << (words - 1).bit_length())
    rows = -(-words // lanes)
    padded = np.zeros(lanes * rows * 4, np.uint8)
    start = padded.size - data.size
    padded[start:] = data  # zeros ahead of the data leave a zero register as it was,
    padded[start:start + 4] ^= 0xFF  # and the initial register 0xFFFFFFFF is its first word inverted
    registers = np.zeros(lanes, np.uint32)
    for word in padded.view("<u4").reshape(lanes, rows).T.copy():
        registers = _apply(_WORD_STEP, registers ^ word)
    carry = _power(_WORD_STEP, rows)
    while registers.size > 1:
        registers = _apply(carry, registers[0::2]) ^ registers[1::2]
        carry = _then(carry, carry)
    return int(registers[0]) ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    """The CRC-32C as TensorFlow and LevelDB store it: rotated and offset, so that data holding
    its own CRC does not check out trivially."""
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF
