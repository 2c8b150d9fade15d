"""Write a safetensors file one tensor at a time, holding none of them in memory.

Safetensors puts the header (names, shapes, offsets) before the data, and the header is only
known once every tensor is. So tensors are appended to a spool file as they come; ``close``
writes the header and then copies the spool behind it in chunks.
"""

from __future__ import annotations

import json
import shutil
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


class SafetensorsWriter:
    """``add(name, tensor)`` as tensors are made, then ``close(metadata)``; use inside an atomic dir."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.spool_path = self.path.with_name(self.path.name + ".spool")
        self.spool = open(self.spool_path, "wb")  # noqa: SIM115 - closed in close()
        self.header: dict[str, Any] = {}
        self.offset = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self.header:
            raise ValueError(f"tensor {name!r} written twice")
        t = torch.empty(tensor.shape, dtype=tensor.dtype).copy_(tensor.detach())  # standard strides, on the CPU
        data = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        self.spool.write(data)
        self.header[name] = {
            "dtype": NAMES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [self.offset, self.offset + len(data)],
        }
        self.offset += len(data)

    def close(self, metadata: dict[str, str] | None = None) -> Path:
        self.spool.close()
        header = dict(sorted(self.header.items()))
        if metadata:
            header = {"__metadata__": metadata, **header}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # safetensors aligns the data start to 8 bytes
        with open(self.path, "wb") as out, open(self.spool_path, "rb") as spool:
            out.write(struct.pack("<Q", len(raw)))
            out.write(raw)
            shutil.copyfileobj(spool, out, length=16 << 20)
        self.spool_path.unlink()
        return self.path

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if kind is not None and not self.spool.closed:
            self.spool.close()
            self.spool_path.unlink(missing_ok=True)
