"""Compressed adapter collections (Compress then Serve): C adapters of one base in a shared basis per module.

A collection dir holds ``collection.json`` (format, version, rank R, adapter names in order, base
identity, per-module kind and shape, per-adapter reconstruction errors) and ``collection.safetensors``
with, per module, ``{module}.U`` (d_out, R), ``{module}.V`` (d_in, R) and ``{module}.cores`` (C, R, R):

    ΔW_c ≈ U · cores[c] · Vᵀ        (out, in) orientation, every scale folded into the core

so adapter c re-materialises as a plain scale-1 LoRA with B = U·cores[c] and A = Vᵀ. ``lorakit
compress`` (``lorakit.compose.compress``) writes one; :meth:`Collection.load` reads and checks it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch

from lorakit.errors import AdapterFormatError, ConfigError
from lorakit.io.atomic import atomic_dir
from lorakit.io.factors import AdapterFactors
from lorakit.lowrank import LoraFactors

FORMAT = "lorakit-collection"
VERSION = 1
META_NAME = "collection.json"
TENSORS_NAME = "collection.safetensors"
PARTS = ("U", "V", "cores")


def is_collection(path: str | Path) -> bool:
    """True when ``path`` is a folder whose collection.json declares the lorakit-collection format."""
    meta = Path(path) / META_NAME
    if not meta.is_file():
        return False
    try:
        fields = json.loads(meta.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(fields, dict) and fields.get("format") == FORMAT


def check_name(name: str, where: str) -> None:
    """An adapter name must be usable as one folder name (export writes DIR/<name>)."""
    if not isinstance(name, str) or not name.strip() or name in (".", "..") or "/" in name or "\\" in name:
        raise ConfigError(f"{where}: adapter name {name!r} must be a non-empty folder name without '/' or '\\'.")


def check_names(names: Sequence[str], where: str, fix: str) -> None:
    """Names of several adapters written side by side: each a folder name (:func:`check_name`), none twice."""
    for name in names:
        check_name(name, where)
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(
            f"{where}: two inputs have the same name {dupes[0]!r} (adapter name {dupes[0]!r} is used twice); {fix}"
        )


@dataclass
class Collection:
    """A loaded collection: ``names`` in core order, ``rank`` R and per-module ``(U, V, cores)``."""

    path: Path
    names: list[str]
    rank: int
    kinds: dict[str, str]  # module -> "linear" | "conv1d" | "embedding"
    tensors: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]  # module -> U (out,R), V (in,R), cores (C,R,R)
    base_name: str | None = None
    fingerprint: dict[str, float] = field(default_factory=dict)
    errors: dict[str, float] = field(default_factory=dict)  # name -> Σ‖ΔW − UΣVᵀ‖² / Σ‖ΔW‖² over modules
    task_type: str | None = None
    target_modules: list[str] = field(default_factory=list)

    @classmethod
    def load(cls, path: str | Path) -> Collection:
        """Read and check a collection dir (format, version, keys, shapes, finite values)."""
        path = Path(path)
        fields = _read_meta(path)
        names, rank, modules = fields["adapters"], fields["rank"], fields["modules"]
        raw = _read_tensors(path / TENSORS_NAME)
        expected = {f"{m}.{p}" for m in modules for p in PARTS}
        if set(raw) != expected:
            odd = sorted(set(raw) ^ expected)
            raise AdapterFormatError(
                f"{path / TENSORS_NAME} does not match {META_NAME}: {len(odd)} key(s) missing or extra, e.g. "
                f"{odd[0]!r}; the two files come from different compress runs — re-run lorakit compress."
            )
        tensors = {}
        for module, info in modules.items():
            U, V, cores = (raw[f"{module}.{p}"] for p in PARTS)
            want = {"U": (info["d_out"], rank), "V": (info["d_in"], rank), "cores": (len(names), rank, rank)}
            for part, t in zip(PARTS, (U, V, cores), strict=True):
                if tuple(t.shape) != want[part]:
                    raise AdapterFormatError(
                        f"{path / TENSORS_NAME}: {module}.{part} has shape {tuple(t.shape)} but {META_NAME} implies "
                        f"{want[part]} (rank {rank}, {len(names)} adapters, d_in {info['d_in']}, d_out "
                        f"{info['d_out']}); the collection is corrupt — re-run lorakit compress."
                    )
                if not bool(torch.isfinite(t).all()):
                    raise AdapterFormatError(f"{path / TENSORS_NAME}: {module}.{part} has NaN or infinite values.")
            tensors[module] = (U, V, cores)
        return cls(
            path,
            list(names),
            int(rank),
            {m: info["kind"] for m, info in modules.items()},
            tensors,
            fields.get("base_model_name_or_path"),
            dict(fields.get("base_fingerprint") or {}),
            dict(fields.get("errors") or {}),
            fields.get("task_type"),
            list(fields.get("target_modules") or []),
        )

    def modules(self) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """module -> (U (d_out, R), V (d_in, R), cores (C, R, R)) with ΔW_c = U·cores[c]·Vᵀ."""
        return dict(self.tensors)

    def index(self, name: str) -> int:
        """Position of adapter ``name`` in the cores' first axis."""
        if name not in self.names:
            raise ConfigError(
                f"collection {self.path} has no adapter named {name!r}; it holds: {', '.join(self.names)}."
            )
        return self.names.index(name)

    def factors(self, name: str) -> AdapterFactors:
        """Adapter ``name`` re-materialised as a rank-R plain LoRA: B = U·cores[c] (out, R), A = Vᵀ (R, in), scale 1."""
        c = self.index(name)
        factors = {m: LoraFactors(V.T.contiguous(), U @ cores[c], 1.0) for m, (U, V, cores) in self.tensors.items()}
        return AdapterFactors(factors, dict(self.kinds), {}, self.base_name, self.task_type, dict(self.fingerprint))


def _read_meta(path: Path) -> dict[str, Any]:
    if not path.is_dir():
        raise AdapterFormatError(f"collection directory {path} does not exist (make one with lorakit compress).")
    meta = path / META_NAME
    if not meta.is_file():
        hint = " It is an adapter dir, not a collection." if (path / "adapter_config.json").is_file() else ""
        raise AdapterFormatError(f"{path} has no {META_NAME}; a collection is made by `lorakit compress`.{hint}")
    try:
        fields = json.loads(meta.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterFormatError(f"{meta} is not valid JSON ({e}); re-run lorakit compress.") from e
    if not isinstance(fields, dict) or fields.get("format") != FORMAT:
        got = fields.get("format") if isinstance(fields, dict) else type(fields).__name__
        raise AdapterFormatError(f"{meta}: format is {got!r}, expected {FORMAT!r}; this is not a lorakit collection.")
    if fields.get("version") != VERSION:
        raise AdapterFormatError(
            f"{meta}: version {fields.get('version')!r} is not supported (this lorakit reads version {VERSION}); "
            "upgrade lorakit or re-run lorakit compress with this version."
        )
    _check_meta(fields, meta)
    return fields


def _check_meta(fields: dict[str, Any], meta: Path) -> None:
    names, rank, modules = fields.get("adapters"), fields.get("rank"), fields.get("modules")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise AdapterFormatError(f"{meta}: rank must be a positive integer, got {rank!r}.")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise AdapterFormatError(f"{meta}: adapters must be a non-empty list of names, got {names!r}.")
    if len(set(names)) != len(names):
        raise AdapterFormatError(f"{meta}: adapter names repeat; each adapter needs its own name.")
    if not isinstance(modules, dict) or not modules:
        raise AdapterFormatError(f"{meta}: modules must map module names to {{kind, d_in, d_out}}.")
    for module, info in modules.items():
        ok = isinstance(info, dict) and info.get("kind") in ("linear", "conv1d", "embedding")
        if not ok or not all(isinstance(info.get(k), int) and info[k] > 0 for k in ("d_in", "d_out")):
            raise AdapterFormatError(f"{meta}: module {module!r} needs kind (linear|conv1d|embedding), d_in, d_out.")


def _read_tensors(file: Path) -> dict[str, torch.Tensor]:
    if not file.is_file():
        raise AdapterFormatError(f"{file} is missing; a collection dir needs {META_NAME} and {TENSORS_NAME}.")
    try:
        with safetensors.safe_open(str(file), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is not a dict
    except (safetensors.SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise AdapterFormatError(
            f"{file} is not a readable safetensors file ({e}); it is truncated or corrupt: re-run lorakit compress."
        ) from e


def write_collection(
    path: str | Path,
    *,
    names: Sequence[str],
    rank: int,
    modules: Mapping[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    kinds: Mapping[str, str],
    errors: Mapping[str, float],
    base_name: str | None = None,
    fingerprint: Mapping[str, float] | None = None,
    task_type: str | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write a collection dir atomically (an existing dir is replaced only if it holds a collection.json)."""
    tensors: dict[str, torch.Tensor] = {}
    info: dict[str, dict[str, Any]] = {}
    for module, (U, V, cores) in modules.items():
        assert U.shape[1] == V.shape[1] == rank and tuple(cores.shape) == (len(names), rank, rank), module
        tensors.update({f"{module}.U": U, f"{module}.V": V, f"{module}.cores": cores})
        info[module] = {"kind": kinds[module], "d_in": int(V.shape[0]), "d_out": int(U.shape[0])}
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "rank": rank,
        "adapters": list(names),
        "base_model_name_or_path": base_name,
        "base_fingerprint": dict(fingerprint or {}),
        "task_type": task_type,
        "target_modules": sorted({m.rsplit(".", 1)[-1] for m in modules}),
        "modules": info,
        "errors": {n: float(e) for n, e in errors.items()},
        **dict(extra or {}),
    }
    with atomic_dir(path, marker=META_NAME) as tmp:
        safetensors.torch.save_file({k: t.contiguous() for k, t in tensors.items()}, str(tmp / TENSORS_NAME))
        (tmp / META_NAME).write_text(json.dumps(meta, indent=2) + "\n")
    return Path(path)
