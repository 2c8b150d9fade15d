"""Adapters as plain low-rank factors: read any adapter dir as {module: (A, B, scale)}, write factors back.

Extraction, merging, resizing and analysis work on this form (``ΔW = scale·B@A`` in (out, in)
orientation for every layer kind; an embedding's weight is the transpose). The written dir is
a PEFT LoRA dir: per-module ranks go to ``rank_pattern`` with ``alpha_pattern`` = rank, so every
module's scale is 1 and ``B@A`` is the delta itself. Whole replaced modules (changed norms,
embeddings, heads) travel as PEFT ``modules_to_save``.
"""

from __future__ import annotations

import collections
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from lorakit.errors import AdapterFormatError
from lorakit.io.atomic import atomic_dir
from lorakit.io.dirs import read_config, read_tensors
from lorakit.io.peft_format import (
    CONFIG_NAME,
    EMBEDDING_KEYS,
    LINEAR_KEYS,
    PREFIX,
    WEIGHTS_NAME,
    lora_config,
    lora_scale,
    lorakit_block,
    require_plain_lora,
)
from lorakit.lowrank import LoraFactors


@dataclass
class AdapterFactors:
    """An adapter as low-rank factors per module, plus whole saved modules and where it came from."""

    factors: dict[str, LoraFactors]  # module -> ΔW = scale·B@A, (out, in)
    kinds: dict[str, str]  # module -> "linear" | "conv1d" | "embedding" (how the factors apply to the base)
    saved: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # modules_to_save: module -> params
    base_name: str | None = None
    task_type: str | None = None
    fingerprint: dict[str, float] = field(default_factory=dict)  # base weight norms (see io.adapter)

    def delta(self, module: str) -> torch.Tensor:
        """The (out, in) delta of ``module`` in float32."""
        f = self.factors[module]
        return f.scale * (f.B.float() @ f.A.float())

    def ranks(self) -> dict[str, int]:
        return {m: int(f.A.shape[0]) for m, f in self.factors.items()}


def read_factors(path: str | Path) -> AdapterFactors:
    """Read a plain LoRA adapter dir (PEFT or lorakit) as factors; other methods get a clear error."""
    path = Path(path)
    fields = read_config(path)
    require_plain_lora(
        fields, path, "convert it first with `lorakit export` or load it onto its base and use the method's to_lora()."
    )
    tensors, block = read_tensors(path / WEIGHTS_NAME)
    factors: dict[str, LoraFactors] = {}
    kinds: dict[str, str] = {}
    saved: dict[str, dict[str, torch.Tensor]] = collections.defaultdict(dict)
    modules_to_save = fields.get("modules_to_save") or []
    for key in sorted(tensors):
        if not key.startswith(PREFIX):
            raise AdapterFormatError(f"{path / WEIGHTS_NAME}: key {key!r} does not start with {PREFIX!r}.")
        module, suffix = _split(key[len(PREFIX) :])
        if suffix in (LINEAR_KEYS[0], EMBEDDING_KEYS[0]):
            kind = "embedding" if suffix == EMBEDDING_KEYS[0] else "linear"
            b_key = f"{PREFIX}{module}.{(EMBEDDING_KEYS if kind == 'embedding' else LINEAR_KEYS)[1]}"
            if b_key not in tensors:
                raise AdapterFormatError(f"{path / WEIGHTS_NAME}: {key} has no matching {b_key}.")
            A, B = tensors[key], tensors[b_key]
            if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1]:
                raise AdapterFormatError(
                    f"{path / WEIGHTS_NAME}: {module} has A {tuple(A.shape)} and B {tuple(B.shape)}, "
                    "which do not form B@A."
                )
            factors[module] = LoraFactors(A, B, lora_scale(fields, module, A.shape[0]))
            kinds[module] = kind
        elif suffix in (LINEAR_KEYS[1], EMBEDDING_KEYS[1]):
            continue
        elif any(module == m or module.endswith("." + m) for m in modules_to_save):
            saved[module][suffix] = tensors[key]
        else:
            raise AdapterFormatError(f"{path / WEIGHTS_NAME}: key {key!r} is neither a LoRA factor nor a saved module.")
    if fields.get("fan_in_fan_out"):
        kinds = {m: ("conv1d" if k == "linear" else k) for m, k in kinds.items()}
    return AdapterFactors(
        factors,
        kinds,
        dict(saved),
        fields.get("base_model_name_or_path"),
        fields.get("task_type"),
        dict(block.get("base_fingerprint") or {}),
    )


def _split(name: str) -> tuple[str, str]:
    """(module, suffix) of a key tail: LoRA suffixes have two parts, saved-module params one."""
    for suffix in (*LINEAR_KEYS, *EMBEDDING_KEYS):
        if name.endswith("." + suffix):
            return name[: -len(suffix) - 1], suffix
    module, _, param = name.rpartition(".")
    return module, param


def write_factors(
    path: str | Path,
    adapter: AdapterFactors,
    *,
    dtype: torch.dtype | None = None,
    extra_files: Mapping[str, bytes | str] | None = None,
    provenance: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``adapter`` as a PEFT LoRA dir (atomic). Scales are folded into B so every module has scale 1."""
    if not adapter.factors and not adapter.saved:
        raise AdapterFormatError(f"nothing to write to {path}: the adapter has no modules.")
    tensors: dict[str, torch.Tensor] = {}
    ranks = adapter.ranks()
    for module, f in adapter.factors.items():
        A, B = f.A, f.B * f.scale
        if dtype is not None:
            A, B = A.to(dtype), B.to(dtype)
        keys = EMBEDDING_KEYS if adapter.kinds.get(module) == "embedding" else LINEAR_KEYS
        tensors[f"{PREFIX}{module}.{keys[0]}"] = A.contiguous()
        tensors[f"{PREFIX}{module}.{keys[1]}"] = B.contiguous()
    for module, params in adapter.saved.items():
        for param, t in params.items():
            tensors[f"{PREFIX}{module}.{param}"] = (t.to(dtype) if dtype is not None else t).contiguous()
    config = lora_config(ranks, adapter.kinds, list(adapter.saved), adapter.base_name, adapter.task_type)
    block = lorakit_block(list(adapter.factors), adapter.fingerprint, provenance)
    with atomic_dir(path, marker=CONFIG_NAME) as tmp:
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        metadata = {"format": "pt", "lorakit": json.dumps(block)}
        safetensors.torch.save_file(tensors, str(tmp / WEIGHTS_NAME), metadata=metadata)
        for name, content in (extra_files or {}).items():
            target = tmp / name
            if isinstance(content, str):
                target.write_text(content)
            else:
                target.write_bytes(content)
    return Path(path)
