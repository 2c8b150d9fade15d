"""The names and rules of PEFT's LoRA dir format, each written once here.

Names: file names, key prefix and suffixes, a plain LoRA's config and lorakit's metadata block.
Rules: ``target_modules`` and ``rank_pattern``/``alpha_pattern`` matching, a module's LoRA scale,
what counts as a plain LoRA, which adapter names ``attach`` takes, and the same-base check (base
model names, and the base weight norms lorakit records as a "fingerprint").

Kept free of the method registry and transformers (importing ``lorakit.io.adapter`` loads both,
~0.6 s, a fifth of an extraction's run), so ``lorakit extract`` writes PEFT dirs without them;
``io.adapter`` and ``io.factors`` import these names from here.
"""

from __future__ import annotations

import collections
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lorakit
from lorakit.errors import AdapterFormatError, ConfigError

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


def pattern_value(patterns: Mapping[str, Any] | None, name: str) -> Any | None:
    """PEFT's (and vLLM's) ``rank_pattern`` / ``alpha_pattern`` rule: the value of the first key ``k``
    with ``re.match(rf"(.*\\.)?({k})$", name)``, i.e. a regex matching the name's dotted tail."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return None


def rank_pattern_of(fields: Mapping[str, Any]) -> dict[str, int]:
    """A config's ``rank_pattern`` as ``{pattern: rank}``, also from PEFT's AdaLoRA form
    ``{module.lora_E: [kept, ...]}`` (a boolean mask over the initial triplets: rank = how many are kept)."""
    out: dict[str, int] = {}
    for key, value in (fields.get("rank_pattern") or {}).items():
        if isinstance(value, list):  # AdaLoRA's mask; its key names the Λ tensor of the module
            key, value = key.removesuffix(".lora_E"), sum(bool(v) for v in value)
        out[key] = int(value)
    return out


def lora_scale(fields: Mapping[str, Any], module: str, rank: int) -> float:
    """The scale of ``module``'s rank-``rank`` LoRA in a config: α/r, or α/√r with ``use_rslora``,
    where α is the module's ``alpha_pattern`` value, else ``lora_alpha`` (PEFT's default 8)."""
    alpha = pattern_value(fields.get("alpha_pattern"), module)
    alpha = float(fields.get("lora_alpha", 8) if alpha is None else alpha)
    return alpha / (math.sqrt(rank) if fields.get("use_rslora") else rank)


def adapter_method(fields: Mapping[str, Any]) -> str:
    """The method an adapter_config.json describes: its lorakit block's, "dora" for PEFT's
    ``use_dora``, "qalora" for ``use_qalora``, else ``peft_type`` in lower case ("lora", "vera", ...)."""
    block = fields.get("lorakit")
    if isinstance(block, dict):
        return str(block.get("method"))
    if fields.get("use_qalora"):
        return "qalora"
    return "dora" if fields.get("use_dora") else str(fields.get("peft_type", "?")).lower()


def is_plain_lora(fields: Mapping[str, Any]) -> bool:
    """Whether an adapter_config.json is a plain LoRA, readable as factors without its base:
    ``peft_type`` LORA, no ``use_dora`` or ``use_qalora`` (an (r, in/g) lora_A of pooled inputs), and no
    lorakit block (which only other methods carry)."""
    variant = fields.get("use_dora") or fields.get("use_qalora")
    return fields.get("peft_type") == "LORA" and not variant and not isinstance(fields.get("lorakit"), dict)


def require_plain_lora(fields: Mapping[str, Any], where: str | Path, fix: str) -> None:
    """:class:`AdapterFormatError` naming ``where`` and ``fix`` unless ``fields`` is a plain LoRA."""
    if not is_plain_lora(fields):
        raise AdapterFormatError(f"{where} is a {adapter_method(fields)!r} adapter, not a plain LoRA; {fix}")


def check_adapter_name(name: str, where: str) -> None:
    """An adapter name of a model (what ``attach`` takes) is a Python identifier without dots: it is a
    key of every wrapped layer's ``nn.ModuleDict``."""
    if not isinstance(name, str) or not name or "." in name or not name.isidentifier():
        raise ConfigError(f"{where}: adapter name {name!r} must be a Python identifier without dots, e.g. 'default'.")


FINGERPRINT_RTOL = 1e-2  # base weight norms this close (relative) count as the same base


def check_same_base(adapters: Sequence[tuple[Path, str | None, Mapping[str, float]]], fix: str) -> None:
    """Adapters ``(path, base_model_name_or_path, fingerprint)`` are of one base: the same base name
    wherever both name one, and every recorded base weight norm within 1% of the first recorded.
    Otherwise :class:`AdapterFormatError` naming both files and ``fix``."""
    named = [(path, name) for path, name, _ in adapters if name]
    for path, name in named[1:]:
        if name != named[0][1]:
            raise AdapterFormatError(f"{path} was made for base {name!r} but {named[0][0]} for {named[0][1]!r}; {fix}")
    first: dict[str, tuple[float, Path]] = {}
    for path, _, fingerprint in adapters:
        for module, norm in fingerprint.items():
            ref, ref_path = first.setdefault(module, (norm, path))
            if not math.isclose(norm, ref, rel_tol=FINGERPRINT_RTOL):
                raise AdapterFormatError(
                    f"{path} and {ref_path} were saved on different base weights (the norm of {module} is "
                    f"{norm:.4g} vs {ref:.4g}, more than 1% apart); {fix}"
                )


def check_base_norms(
    where: str | Path,
    fingerprint: Mapping[str, float],
    norms: Mapping[str, float],
    *,
    base_name: str | None,
    fix: str,
    here: str = "here",
) -> None:
    """The base an adapter meets (its weight ``norms`` by module) is the one it was saved on: every
    module in both ``fingerprint`` and ``norms`` within 1%. Otherwise :class:`AdapterFormatError`
    naming ``where`` and ``fix``; ``here`` says where the norms were taken ("here", "in DIR")."""
    for module, expected in fingerprint.items():
        got = norms.get(module)
        if got is not None and not math.isclose(got, expected, rel_tol=FINGERPRINT_RTOL):
            raise AdapterFormatError(
                f"{where} was saved for a different base model: the weight norm of {module} is {got:.4g} {here} "
                f"but was {expected:.4g} when it was saved (base {base_name!r}). {fix}"
            )


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
