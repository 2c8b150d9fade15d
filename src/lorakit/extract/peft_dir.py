"""The PEFT LoRA dir format as extraction writes it, importable without the method registry.

``lorakit.io.adapter`` and ``lorakit.io.factors`` define these names, but importing them loads
``lorakit.inject``, every method file and transformers (~0.6 s, a fifth of an extraction's run).
So the few names extraction needs are restated here; ``tests/extract/test_fast_path.py`` checks
each one equals its original, so the two cannot drift apart.
"""

from __future__ import annotations

import collections
import re
from collections.abc import Mapping
from typing import Any

import lorakit

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
LINEAR_KEYS = ("lora_A.weight", "lora_B.weight")
EMBEDDING_KEYS = ("lora_embedding_A", "lora_embedding_B")


def lora_config(
    ranks: Mapping[str, int],
    kinds: Mapping[str, str],
    saved: list[str],
    base_name: str | None,
    task_type: str | None,
) -> dict[str, Any]:
    """PEFT adapter_config.json fields of a scale-1 LoRA with per-module ``ranks`` and whole ``saved`` modules."""
    r = collections.Counter(ranks.values()).most_common(1)[0][0] if ranks else 8
    differing = {m: k for m, k in ranks.items() if k != r}
    return {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_name,
        "revision": None,
        "inference_mode": True,
        "target_modules": "(" + "|".join(re.escape(m) for m in ranks) + ")" if ranks else None,
        "exclude_modules": None,
        "r": r,
        "lora_alpha": r,
        "rank_pattern": {re.escape(m): k for m, k in differing.items()},
        "alpha_pattern": {re.escape(m): k for m, k in differing.items()},
        "lora_dropout": 0.0,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "fan_in_fan_out": "conv1d" in kinds.values(),
        "bias": "none",
        "modules_to_save": saved or None,
        "layers_to_transform": None,
        "layers_pattern": None,
    }


def lorakit_block(
    modules: list[str], fingerprint: Mapping[str, float], provenance: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The ``lorakit`` metadata block of a plain LoRA dir (stored in the safetensors header)."""
    block: dict[str, Any] = {
        "version": lorakit.__version__,
        "method": "lora",
        "modules": modules,
        "base_fingerprint": dict(fingerprint),
    }
    if provenance:
        block["provenance"] = dict(provenance)
    return block
