"""``registry.json``: the serving registry on disk, read strictly and written atomically.

Format (version 2)::

    {"version": 2, "adapters": {"NAME": "PATH", ...}, "removed": ["NAME", ...]}

``adapters`` holds every registered adapter with its dir, those unavailable at the moment too (a
failed load never takes an entry out); ``removed`` holds the names deleted over HTTP whose folder
the start-up scan of ``--adapters`` would find, so a restart does not serve them again (a later
POST of the name takes it off the list). The first format, a plain ``{"NAME": "PATH"}`` object,
is still read; the next write turns it into version 2.

A damaged file (empty, truncated, not JSON, the wrong shape or value types, a name that is not
allowed) is neither guessed at nor overwritten: :func:`read` raises a ConfigError naming the file
and the way out (move it aside to start with an empty registry, or restore it), which ``lorakit
serve`` prints as one line before it exits. Starting with an empty registry instead would quietly
serve fewer adapters than before the restart. Writes go through a temp file and one rename
(``atomic_write_text``); :func:`clean` removes the temp files a killed server left behind.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorakit.errors import ConfigError
from lorakit.io.atomic import atomic_write_text

FILE_NAME = "registry.json"
VERSION = 2
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # whole name (fullmatch): no "\n" slips past a "$"


def check_name(name: str) -> str:
    """An adapter name is a plain file-name-like token: it can never name a path outside a folder."""
    if not isinstance(name, str) or not NAME.fullmatch(name) or ".." in name:
        raise ConfigError(
            f"adapter name {name!r} is not allowed: use letters, digits, '.', '_' or '-' (≤128 characters, "
            "starting with a letter or digit, no '..')."
        )
    return name


@dataclass
class Registry:
    """What ``registry.json`` holds: {name: adapter dir} and the names deleted over HTTP."""

    adapters: dict[str, str] = field(default_factory=dict)
    removed: set[str] = field(default_factory=set)


class Damaged(ValueError):
    """Why a registry file cannot be trusted (turned into the ConfigError :func:`read` raises)."""


def read(path: Path) -> Registry:
    """The registry saved at ``path`` (empty if there is none); a damaged file is a ConfigError."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return Registry()
    except (OSError, UnicodeDecodeError) as e:
        raise _damaged(path, f"cannot be read: {e}") from None
    try:
        return _parse(json.loads(text))
    except json.JSONDecodeError as e:
        raise _damaged(path, f"not JSON: {e}") from None
    except Damaged as e:
        raise _damaged(path, str(e)) from None


def _damaged(path: Path, why: str) -> ConfigError:
    return ConfigError(
        f"{path} is damaged ({why}): move it aside (mv {path} {path}.bad) to start with an empty registry, "
        "or restore it from a backup."
    )


def _parse(data: Any) -> Registry:
    if not isinstance(data, dict):
        raise Damaged(f"a JSON {type(data).__name__}, not an object")
    if "version" not in data or all(isinstance(v, str) for v in data.values()):
        return Registry(_adapters(data))  # the first format, {name: path} (an adapter may be named "version")
    if data["version"] != VERSION:
        raise Damaged(f"version {data['version']!r}; this lorakit reads version {VERSION} and the plain first format")
    unknown = sorted(set(data) - {"version", "adapters", "removed"})
    if unknown:
        raise Damaged(f"unknown field {unknown[0]!r}")
    removed = data.get("removed", [])
    if not isinstance(removed, list) or not all(isinstance(n, str) for n in removed):
        raise Damaged("'removed' is not a list of names")
    return Registry(_adapters(data.get("adapters", {})), {_name(n) for n in removed})


def _adapters(data: Any) -> dict[str, str]:
    if not isinstance(data, dict):
        raise Damaged("'adapters' is not an object")
    for name, path in data.items():
        if not isinstance(path, str) or not path:
            raise Damaged(f"the path of {name!r} is {path!r}, not a path")
    return {_name(n): p for n, p in data.items()}


def _name(name: str) -> str:
    try:
        return check_name(name)
    except ConfigError:
        raise Damaged(f"{name!r} is not an allowed adapter name") from None


def write(path: Path, registry: Registry) -> None:
    """Save ``registry`` at ``path`` in one rename."""
    data = {
        "version": VERSION,
        "adapters": dict(sorted(registry.adapters.items())),
        "removed": sorted(registry.removed),
    }
    atomic_write_text(path, json.dumps(data, indent=1))


def clean(path: Path) -> list[Path]:
    """Remove the temp files a write of ``path`` killed half-way left beside it; returns them."""
    stale = sorted(path.parent.glob(f".{path.name}.tmp-*"))  # atomic_write_bytes' temp names
    for tmp in stale:
        tmp.unlink(missing_ok=True)
    return stale
