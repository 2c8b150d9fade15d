"""A Hugging Face checkpoint read one tensor at a time.

Safetensors headers are parsed up front (a few KB); each ``get`` maps just that tensor's pages
privately (copy-on-write ``mmap``: no copy out of the page cache, and writes to the tensor never
reach the file). The mapping lives exactly as long as the returned tensor, so nothing of the
checkpoint stays resident between tensors (one long-lived mapping of the file would keep every
touched page counted in the process's resident set).
Works on a single ``*.safetensors`` file, a folder with ``model.safetensors``, or a sharded
folder with ``model.safetensors.index.json``; a bundled name (``"smollm2-135m"``) resolves to
its cached checkpoint folder.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lorakit.errors import CheckpointError

DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


@dataclass(frozen=True)
class Entry:
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int


def resolve(path_or_name: str | Path) -> Path:
    """A checkpoint folder or file for a local path or a bundled base name."""
    from lorakit.models import BUNDLED, base_dir

    if str(path_or_name) in BUNDLED:
        return base_dir(str(path_or_name))
    path = Path(path_or_name).expanduser()
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist (give a folder with *.safetensors, or a base name).")
    return path


def _files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index ({e}).") from e
        return [path / f for f in sorted(set(weight_map.values()))]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        other = sorted(p.name for p in path.glob("*.bin")) or sorted(p.name for p in path.iterdir())[:5]
        raise CheckpointError(
            f"{path} holds no *.safetensors weights (found: {', '.join(other) or 'nothing'}). Re-save the model "
            "with model.save_pretrained(dir) (safetensors is the default) and point lorakit at that folder."
        )
    return files


def _header(file: Path) -> dict[str, Entry]:
    try:
        with open(file, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > min(file.stat().st_size - 8, 1 << 28):  # a header longer than the file: not safetensors
                raise ValueError(f"header length {n} does not fit a {file.stat().st_size}-byte file")
            header = json.loads(f.read(n))
    except (OSError, ValueError, struct.error) as e:  # JSON and Unicode errors are ValueErrors
        raise CheckpointError(f"{file} is not a readable safetensors file ({e}); it may be truncated.") from e
    size, base = file.stat().st_size, 8 + n
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info.get("dtype") not in DTYPES:
            raise CheckpointError(f"{file}: tensor {name} has unsupported dtype {info.get('dtype')!r}.")
        start, end = (base + o for o in info["data_offsets"])
        if end > size:
            raise CheckpointError(f"{file} is truncated: tensor {name} ends at byte {end} of {size}.")
        entries[name] = Entry(file, DTYPES[info["dtype"]], tuple(info["shape"]), start, end)
    return entries


class Checkpoint:
    """Tensors of one checkpoint by name; ``get`` reads one tensor from disk each call."""

    def __init__(self, path_or_name: str | Path):
        self.path = resolve(path_or_name)
        self.entries: dict[str, Entry] = {}
        for file in _files(self.path):
            self.entries.update(_header(file))
        folder = self.path if self.path.is_dir() else self.path.parent
        config = folder / "config.json"
        self.config: dict[str, Any] = json.loads(config.read_text()) if config.is_file() else {}

    def keys(self) -> list[str]:
        return list(self.entries)

    def __iter__(self) -> Iterator[str]:
        return iter(self.entries)

    def __contains__(self, name: object) -> bool:
        return name in self.entries

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name].shape

    def get(self, name: str, dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
        """Tensor ``name`` mapped from disk (cast to ``dtype``; None keeps the stored dtype)."""
        if name not in self.entries:
            raise CheckpointError(f"{self.path} has no tensor {name!r}.")
        e = self.entries[name]
        t = _map(e, name).reshape(e.shape)
        return t if dtype is None or t.dtype == dtype else t.to(dtype)


def _map(e: Entry, name: str) -> torch.Tensor:
    """The bytes of entry ``e`` as a flat tensor: a private mapping of just its pages, or a copy.

    The mapping covers only the tensor's page range, so it never asks the kernel for more than
    the tensor's size even in a huge single-file checkpoint. Where mapping fails (too many open
    mappings for the process's file limit, a strict overcommit policy), the bytes are read into
    fresh memory instead; a misaligned tensor is copied to aligned memory for every kernel.
    """
    size = e.end - e.start
    itemsize = torch.empty(0, dtype=e.dtype).element_size()
    if size != itemsize * math.prod(e.shape):
        raise CheckpointError(
            f"{e.file}: tensor {name} holds {size} bytes, but dtype {e.dtype} and shape {e.shape} need "
            f"{itemsize * math.prod(e.shape)}; the file is damaged."
        )
    if size == 0:
        return torch.empty(0, dtype=e.dtype)
    low = e.start - e.start % mmap.ALLOCATIONGRANULARITY  # a mapping starts on a page boundary
    with open(e.file, "rb") as f:
        if os.fstat(f.fileno()).st_size < e.end:
            raise CheckpointError(f"{e.file} is truncated: tensor {name} ends at byte {e.end}.")
        try:  # copy-on-write: writes to the tensor never reach the file; it keeps the mapping alive
            view: Any = mmap.mmap(f.fileno(), e.end - low, access=mmap.ACCESS_COPY, offset=low)
            offset = e.start - low
        except OSError:
            view, offset = bytearray(size), 0
            if os.preadv(f.fileno(), [view], e.start) != size:
                raise CheckpointError(f"{e.file}: short read of tensor {name}.") from None
    t = torch.frombuffer(view, dtype=torch.uint8, count=size, offset=offset)
    return (t if e.start % itemsize == 0 or offset == 0 else t.clone()).view(e.dtype)
