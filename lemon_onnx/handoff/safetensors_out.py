"""Write safetensors files one tensor at a time (sharded above a size limit).

The format (https://github.com/huggingface/safetensors): an 8-byte little-endian header length,
a JSON header ``{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}``
padded with spaces to a multiple of 8, then the tensors' bytes back to back.  Offsets are known
from shapes and dtypes alone, so the header is written first and every tensor is computed
(read from the memory-mapped ONNX weights, transposed) and written on its own: memory stays at
the largest tensor, not the model.

Sharding follows transformers: ``model-0000k-of-0000n.safetensors`` plus
``model.safetensors.index.json`` (``metadata.total_size``, ``weight_map``) once the tensors
exceed ``max_shard_size``; a tensor larger than the limit gets a shard of its own.
"""

from __future__ import annotations

import dataclasses
import json
import re
import struct
from pathlib import Path
from typing import Callable

import numpy as np

from .errors import HandoffError

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"

_DTYPES = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16",
           "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8",
           "bool": "BOOL", "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2"}


@dataclasses.dataclass
class TensorOut:
    name: str
    dtype: np.dtype
    shape: tuple
    produce: Callable[[], np.ndarray]  # computes the array when it is written

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


def parse_size(size: int | str) -> int:
    """``5GB`` (10^9), ``5GiB`` (2^30), ``500MB``, ``10KB``, or a number of bytes."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", str(size), re.IGNORECASE)
    if not m:
        raise HandoffError(f"--max-shard-size {size!r} is not a size.",
                           hint="Write it like 5GB, 500MB, 2GiB or a number of bytes.")
    num, unit, binary = m.groups()
    power = "KMGT".find(unit.upper()) + 1 if unit else 0
    return int(float(num) * (1024 if binary else 1000) ** power)


def safetensors_dtype(dtype: np.dtype) -> str:
    code = _DTYPES.get(np.dtype(dtype).name)
    if code is None:
        raise HandoffError(f"tensors of dtype {np.dtype(dtype).name} have no safetensors type.")
    return code


def plan_shards(tensors: list[TensorOut], max_bytes: int) -> list[list[TensorOut]]:
    shards: list[list[TensorOut]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def write_file(path: Path, tensors: list[TensorOut], metadata: dict | None = None) -> None:
    header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for t in tensors:
        header[t.name] = {"dtype": safetensors_dtype(t.dtype), "shape": list(t.shape),
                          "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for t in tensors:
            arr = np.ascontiguousarray(t.produce())
            if tuple(arr.shape) != tuple(t.shape) or arr.dtype != np.dtype(t.dtype):
                raise HandoffError(f"tensor {t.name}: computed {arr.dtype}{list(arr.shape)}, "
                                   f"expected {np.dtype(t.dtype)}{list(t.shape)} (a bug).")
            if arr.dtype.byteorder == ">":
                arr = arr.byteswap().view(arr.dtype.newbyteorder("<"))
            f.write(memoryview(arr.reshape(-1).view(np.uint8)))
            del arr


def write(out_dir: Path, tensors: list[TensorOut], max_shard_size: int | str = "5GB") -> dict:
    """Write ``tensors`` into ``out_dir``; returns {tensor name: file name}."""
    limit = parse_size(max_shard_size)
    if limit <= 0:
        raise HandoffError(f"--max-shard-size must be positive, got {max_shard_size!r}.")
    shards = plan_shards(tensors, limit)
    if len(shards) == 1:
        write_file(out_dir / SINGLE, shards[0])
        return {t.name: SINGLE for t in tensors}
    n = len(shards)
    weight_map = {}
    for k, shard in enumerate(shards, 1):
        fname = f"model-{k:05d}-of-{n:05d}.safetensors"
        write_file(out_dir / fname, shard)
        weight_map.update({t.name: fname for t in shard})
    index = {"metadata": {"total_size": sum(t.nbytes for t in tensors)},
             "weight_map": dict(sorted(weight_map.items()))}
    (out_dir / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return weight_map
