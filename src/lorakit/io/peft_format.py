"""The names of PEFT's LoRA dir format: file names, key prefix and suffixes, a plain LoRA's config.

Kept free of the method registry and transformers (importing ``lorakit.io.adapter`` loads both,
~0.6 s, a fifth of an extraction's run), so ``lorakit extract`` writes PEFT dirs without them;
``io.adapter`` and ``io.factors`` import these names from here.
"""

from __future__ import annotations

import collections
import re
from collections.abc import Mapping, Sequence
from typing import Any

import lorakit

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
LINEAR_KEYS = ("lora_A.weight", "lora_B.weight")
EMBEDDING_KEYS = ("lora_embedding_A", "lora_embedding_B")


def name_matches(spec: str | Sequence[str], name: str) -> bool:
    """PEFT's ``target_modules`` rule: a regex must match the whole module name; a list matches a
    name equal to an entry or ending in ``.entry``."""
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == t or name.endswith("." + t) for t in spec)


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
