"""Write a safetensors file one tensor at a time, holding none of them in memory.

Safetensors puts the header (names, shapes, offsets) before the data, and the header is only
known once every tensor is. The writer reserves room for it (``header_room`` bytes, from the
caller's bound on the number of tensors and the metadata size), writes each tensor's bytes
behind that room as it comes, and at ``close`` writes the header into the room, padded with
spaces (which the format allows). Each byte is written once.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from types import TracebackType
from typing import Any

import torch

NAMES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
ENTRY_BYTES = 320  # generous room per header entry: name (≤ ~200 chars), dtype, shape, offsets


def header_room(n_tensors: int, metadata_bytes: int) -> int:
    """Bytes to reserve for a header of ``n_tensors`` entries plus ``metadata_bytes`` of metadata (8-aligned)."""
    room = 256 + ENTRY_BYTES * n_tensors + 2 * metadata_bytes
    return room + (-room % 8)


class SafetensorsWriter:
    """``add(name, tensor)`` as tensors are made, then ``close(metadata)``; use inside an atomic dir."""

    def __init__(self, path: str | Path, room: int):
        self.path, self.room = Path(path), room
        self.file = open(self.path, "wb")  # noqa: SIM115 - closed in close()
        self.file.seek(8 + room)
        self.header: dict[str, Any] = {}
        self.offset = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self.header:
            raise ValueError(f"tensor {name!r} written twice")
        t = tensor.detach()
        if t.device.type != "cpu" or not t.is_contiguous():
            t = torch.empty(t.shape, dtype=t.dtype).copy_(t)  # standard strides, on the CPU
        data = t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b""  # a view: no copy of the bytes
        self.file.write(data)  # type: ignore[arg-type]  # numpy arrays expose the buffer protocol
        n = t.numel() * t.element_size()
        self.header[name] = {
            "dtype": NAMES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [self.offset, self.offset + n],
        }
        self.offset += n

    def close(self, metadata: dict[str, str] | None = None) -> Path:
        header = dict(sorted(self.header.items()))
        if metadata:
            header = {"__metadata__": metadata, **header}
        raw = json.dumps(header, separators=(",", ":")).encode()
        if len(raw) > self.room:
            self.file.close()
            raise ValueError(f"safetensors header of {len(raw)} bytes exceeds the {self.room} bytes reserved")
        self.file.seek(0)
        self.file.write(struct.pack("<Q", self.room) + raw + b" " * (self.room - len(raw)))
        self.file.close()
        return self.path

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if not self.file.closed:
            self.file.close()
