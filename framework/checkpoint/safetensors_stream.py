"""Write a .safetensors file one tensor at a time.

`safetensors.torch.save_file` needs every tensor in memory at once; an export from a sharded checkpoint would then
hold the whole model. The format is simple enough to stream (https://github.com/huggingface/safetensors#format):
8 bytes little-endian header length N, N bytes of JSON header ({name: {dtype, shape, data_offsets: [begin, end]}},
plus "__metadata__": {str: str}; offsets relative to the byte after the header, tensors back to back), then the raw
little-endian tensor bytes. All shapes and dtypes are known before any tensor is read, so the header goes first.
"""

from __future__ import annotations

import json
import math
import os
import struct
import sys
from typing import BinaryIO, Iterable

import torch

from framework.checkpoint.consolidate import TensorSource

# torch dtype -> safetensors dtype name
DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
          torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
          torch.bool: "BOOL"}


def write_safetensors(f: BinaryIO, sources: Iterable[TensorSource], metadata: dict[str, str] | None = None) -> int:
    """Write `sources` (read one at a time) to the open binary file `f`; returns the bytes of tensor data."""
    if sys.byteorder != "little":
        raise RuntimeError("safetensors are little-endian; streaming them from a big-endian host is not supported")
    sources = list(sources)
    header: dict[str, object] = {}
    offset = 0
    for s in sources:
        if s.dtype not in DTYPES:
            raise ValueError(f"{s.name}: dtype {s.dtype} cannot be stored in safetensors")
        if s.name in header or s.name == "__metadata__":
            raise ValueError(f"duplicate tensor name {s.name!r}")
        header[s.name] = {"dtype": DTYPES[s.dtype], "shape": list(s.shape), "data_offsets": [offset, offset + s.nbytes]}
        offset += s.nbytes
    if metadata:
        header["__metadata__"] = metadata
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors itself writes it
    f.write(struct.pack("<Q", len(raw)))
    f.write(raw)
    for s in sources:
        t = s.load()
        if tuple(t.shape) != s.shape or t.dtype != s.dtype:
            raise ValueError(f"{s.name}: expected {s.dtype} {s.shape}, read {t.dtype} {tuple(t.shape)}")
        t = t.detach().cpu().contiguous()
        if t.numel():
            f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))  # the tensor's bytes, not a copy
        del t
    return offset


def save_safetensors(path: str | os.PathLike, sources: Iterable[TensorSource],
                     metadata: dict[str, str] | None = None) -> int:
    with open(path, "wb") as f:
        n = write_safetensors(f, sources, metadata)
        f.flush()
        os.fsync(f.fileno())
    return n


def total_bytes(sources: Iterable[TensorSource]) -> int:
    return sum(math.prod(s.shape) * s.dtype.itemsize for s in sources)
