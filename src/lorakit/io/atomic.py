"""Atomic writes: a crash never leaves a half-written file or adapter directory."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

from lorakit.errors import AdapterFormatError


def _fsync_tree(root: Path) -> None:
    for p in root.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, *, marker: str) -> Iterator[Path]:
    """Yield an empty temp dir beside ``path``; on success it replaces ``path`` in one rename.

    An existing ``path`` is replaced only if it holds ``marker`` (so we never clobber an
    unrelated folder); files in it that the new write does not produce are carried over.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise AdapterFormatError(f"{path} exists and is a file; choose a directory path for the output.")
    if path.is_dir() and any(path.iterdir()) and not (path / marker).exists():
        raise AdapterFormatError(
            f"{path} exists, is not empty and has no {marker}; refusing to overwrite it. Choose another output path."
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        if path.is_dir():
            for old in path.iterdir():
                if not (tmp / old.name).exists():
                    (shutil.copytree if old.is_dir() else shutil.copy2)(old, tmp / old.name)
        _fsync_tree(tmp)
        if path.exists():
            trash = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(path, trash)
            os.rename(tmp, path)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temp file and one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` through a temp file and one rename."""
    atomic_write_bytes(path, text.encode("utf-8"))
