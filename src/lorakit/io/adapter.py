"""Adapter directories in PEFT's layout: ``adapter_config.json`` + ``adapter_model.safetensors``.

Keys are ``base_model.model.<module>.<suffix>`` with PEFT's suffixes (``lora_A.weight``,
``lora_embedding_A``, ``lora_magnitude_vector``, ...), which each method's ``export_state``
provides. The config carries PEFT's field names, plus a ``lorakit`` block (method, full config,
module list, base fingerprint) that PEFT ignores.
"""

from __future__ import annotations

import dataclasses
import json
import re
import warnings
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch
from torch import nn

import lorakit
from lorakit import layers as L
from lorakit.errors import AdapterFormatError, ConfigError, LorakitError, TargetError
from lorakit.init._api import config_fields
from lorakit.initialize import rebuilds_base
from lorakit.inject import (
    AdaptedLayer,
    active_adapter,
    adapter_info,
    attach,
    delete_adapter,
    find_targets,
    logical_modules,
    saved_modules,
    set_active,
    wrappers,
)
from lorakit.io.atomic import atomic_dir
from lorakit.io.dirs import read_config, read_tensors
from lorakit.io.folded import foldable, folded
from lorakit.io.peft_format import CONFIG_NAME, PREFIX, WEIGHTS_NAME, check_base_norms, rank_pattern_of
from lorakit.lowrank import LoraFactors
from lorakit.methods._api import REGISTRY, AdapterModule, get_spec

# PEFT inits that rewrite the base weights: such an adapter is relative to a residual base.
RESIDUAL_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")
# PEFT features lorakit does not load yet: field -> value meaning "unused".
UNSUPPORTED_FIELDS = {
    "layers_to_transform": None,
    "layer_replication": None,
    "trainable_token_indices": None,
    "target_parameters": None,
}


def _task_type(model: nn.Module) -> str | None:
    name = type(model).__name__
    if name.endswith("ForCausalLM"):
        return "CAUSAL_LM"
    if name.endswith("ForSequenceClassification"):
        return "SEQ_CLS"
    return None


def _target_modules_field(model: nn.Module, modules: list[str]) -> list[str] | str:
    """PEFT ``target_modules``: module-name suffixes when they select exactly ``modules``, else a regex."""
    leaves = sorted({m.rsplit(".", 1)[-1] for m in modules})
    try:
        if find_targets(model, leaves) == modules:
            return leaves
    except LorakitError:
        pass
    return "(" + "|".join(re.escape(m) for m in modules) + ")"


def weight_norm(base: nn.Module) -> float:
    """‖W‖_F of a base layer, read through its kind (a quantized layer's dequantized weight)."""
    weight: Any = L.weight_out_in(base) if L.kind_of(base) is not None else base.weight
    return float(weight.detach().float().norm())


def base_fingerprint(model: nn.Module, modules: list[str], n: int = 4) -> dict[str, float]:
    """Frobenius norms of a few targeted base weights: cheap, and dtype-robust to ~1e-3."""
    out = {}
    for name in modules[:n]:
        module = model.get_submodule(name)
        base: Any = module.base_layer if isinstance(module, AdaptedLayer) else module
        out[name] = weight_norm(base)
    return out


def save_adapter(model: nn.Module, path: str | Path, name: str = "default") -> Path:
    """Write adapter ``name`` of ``model`` to ``path`` (atomic). Returns the path.

    An init that rewrote the base weights (PiSSA, LoRA-GA: W_res = W − shift) is written relative to
    the ORIGINAL base W: in the method's own format at rank r + r_shift where the method has an A·B pair
    (``io/folded.py``), else as a plain LoRA (:func:`_save_relative_to_original`).
    """
    info = adapter_info(model, name)
    spec, cfg = info.spec, info.config
    adapters = {m: _adapter(w, name) for m, w in wrappers(model) if name in w.adapters}
    states = {m: a.export_state() for m, a in adapters.items()}
    module_cfgs = {m: a.config for m, a in adapters.items()}
    prints = None
    if any(a.init_base_norm is not None for a in adapters.values()):  # the base was replaced: the original's norms
        prints = {m: a.init_base_norm for m, a in list(adapters.items())[:4] if a.init_base_norm is not None}
    if any(a.base_shift() is not None for a in adapters.values()):
        if not foldable(adapters):
            return _save_relative_to_original(model, path, name)
        states, module_cfgs, prints = folded(model, adapters)  # the method's own format, for the original W
        cfg = next((c for m, c in module_cfgs.items() if adapters[m].config == cfg), next(iter(module_cfgs.values())))
    tensors: dict[str, torch.Tensor] = {}
    for module_name, state in states.items():
        for suffix, t in state.items():
            tensors[f"{PREFIX}{module_name}.{suffix}"] = t.detach().contiguous().cpu()
    tensors.update({key: t.detach().contiguous().cpu() for key, t in _saved_state(model, name).items()})
    tensors.update({key: t.detach().contiguous().cpu() for key, (_, t) in _shared_state(model, name).items()})
    modules = [m for m in info.modules if m in module_cfgs]
    bases: list[Any] = [model.get_submodule(m).base_layer for m in modules]
    kinds = {L.layer_kind(b) for b in bases}
    ranks = {m: c.r for m, c in module_cfgs.items() if getattr(c, "r", None) != getattr(cfg, "r", None)}
    rank_pattern = spec.adapter.peft_rank_pattern(ranks, cfg) if ranks else {}
    alpha_pattern = {
        m: c.alpha for m, c in module_cfgs.items() if getattr(c, "alpha", None) != getattr(cfg, "alpha", None)
    }
    config: dict[str, Any] = {
        "peft_type": spec.adapter.peft_type,
        "task_type": _task_type(model),
        "base_model_name_or_path": getattr(getattr(model, "config", None), "_name_or_path", None) or None,
        "revision": None,
        "inference_mode": True,
        "target_modules": _target_modules_field(model, modules),
        "exclude_modules": None,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "fan_in_fan_out": "conv1d" in kinds,  # PEFT corrects it per layer type anyway
        "bias": "none",
        "modules_to_save": list(info.saved) or None,
        "layers_to_transform": None,
        "layers_pattern": None,
        **spec.adapter.peft_fields(cfg),
    }
    block = {
        "version": lorakit.__version__,
        "method": spec.name,
        "config": dataclasses.asdict(cfg),
        "modules": modules,
        "base_fingerprint": prints if prints is not None else base_fingerprint(model, modules),
    }
    quantized = sorted({kind.name for b in bases if (kind := L.kind_of(b)) is not None and kind.quantized})
    if quantized:  # trained on a quantized base (QLoRA): said again when it loads onto a full-precision one
        block["base_quantization"] = quantized
    if spec.adapter.peft_type is None:  # PEFT cannot load it anyway: the config names the method
        config["lorakit"] = block
    metadata = {"format": "pt", "lorakit": json.dumps(block)}  # PEFT ignores safetensors metadata
    with atomic_dir(path, marker=CONFIG_NAME) as tmp:
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        safetensors.torch.save_file(tensors, str(tmp / WEIGHTS_NAME), metadata=metadata)
    return Path(path)


def _save_relative_to_original(model: nn.Module, path: str | Path, name: str) -> Path:
    """Adapter ``name`` of a base-rewriting init as a plain PEFT LoRA dir for the original base.

    The live model computes (W − S)·x + ΔW·x with S = base_shift() and ΔW = to_lora(); on the original
    W the same outputs need ΔW − S, written as factors [s·B, −S_B] @ [A; S_A] of rank r + r_shift
    (2r for PiSSA: PEFT's path_initial_model_for_weight_conversion does the same). The base
    fingerprint is taken on the original weights W = W_res + S, so the dir loads onto the original
    base only.
    """
    from lorakit.io.factors import AdapterFactors, write_factors  # factors imports this module

    info = adapter_info(model, name)
    factors: dict[str, LoraFactors] = {}
    kinds: dict[str, str] = {}
    fingerprint: dict[str, float] = {}
    dtype = None
    for module_name, wrapper in wrappers(model):
        if name not in wrapper.adapters:
            continue
        adapter = _adapter(wrapper, name)
        base = wrapper.base_layer
        with torch.no_grad():
            f, shift = adapter.to_lora(base), adapter.base_shift()
            if shift is None:  # a layer the init left as it was
                shift = LoraFactors(f.A.new_zeros(0, f.A.shape[1]), f.B.new_zeros(f.B.shape[0], 0), 0.0)
            A = torch.cat([f.A.float(), shift.A.float()])  # (r + r_shift, in)
            B = torch.cat([f.B.float() * f.scale, -shift.B.float() * shift.scale], dim=1)  # (out, r + r_shift)
            if len(fingerprint) < 4:
                original = L.weight_out_in(base).float() + shift.scale * (shift.B.float() @ shift.A.float())
                fingerprint[module_name] = float(original.norm())
        factors[module_name] = LoraFactors(A.cpu(), B.cpu(), 1.0)
        kinds[module_name] = L.layer_kind(base)
        dtype = f.A.dtype
    saved: dict[str, dict[str, torch.Tensor]] = {}
    for module_name, holder in saved_modules(model):
        if name in holder.copies:
            saved[module_name] = {k: t.detach().cpu() for k, t in holder.copies[name].state_dict().items()}
    provenance = {
        "method": info.spec.name,
        "config": dataclasses.asdict(info.config),
        "note": "plain LoRA relative to the original base: the init's base shift is folded in (rank r + r_shift)",
    }
    adapter_factors = AdapterFactors(
        factors,
        kinds,
        saved,
        getattr(getattr(model, "config", None), "_name_or_path", None) or None,
        _task_type(model),
        fingerprint,
    )
    return write_factors(path, adapter_factors, dtype=dtype, provenance=provenance)


def _shared_state(model: nn.Module, name: str) -> dict[str, tuple[Any, torch.Tensor]]:
    """Full file key -> (importer, tensor) for state the layers of adapter ``name`` share (VB-LoRA's bank).

    An adapter may define ``export_shared()`` (full file keys, e.g. ``base_model.vblora_vector_bank``) and
    ``import_shared(state)``; a key is written once however many layers share it.
    """
    out: dict[str, tuple[Any, torch.Tensor]] = {}
    for _, wrapper in wrappers(model):
        if name in wrapper.adapters:
            adapter = _adapter(wrapper, name)
            importer = _SharedImporter(adapter)
            for key, t in adapter.export_shared().items():
                out.setdefault(key, (importer, t))
    return out


def _adapter(wrapper: AdaptedLayer, name: str) -> AdapterModule:
    adapter: AdapterModule = wrapper.adapters[name]  # type: ignore[assignment]
    return adapter


class _SharedImporter:
    """Routes a loaded shared state to its adapter's ``import_shared`` (``_fill`` calls ``import_state``)."""

    def __init__(self, adapter: AdapterModule):
        self.adapter, self.config = adapter, adapter.config

    def import_state(self, state: dict[str, torch.Tensor]) -> None:
        self.adapter.import_shared(state)


def _saved_state(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """PEFT's keys for adapter ``name``'s modules_to_save copies: ``base_model.model.<module>.<param>``."""
    out = {}
    for module_name, holder in saved_modules(model):
        if name in holder.copies:
            for param, t in holder.copies[name].state_dict().items():
                out[f"{PREFIX}{module_name}.{param}"] = t
    return out


def config_from_fields(fields: dict[str, Any], where: Path) -> Any:
    """The lorakit method config an adapter_config.json describes."""
    block = fields.get("lorakit")
    if isinstance(block, dict) and "method" in block:
        try:
            spec = get_spec(block["method"])
            return spec.config(**block.get("config", {}))
        except (ConfigError, TypeError) as e:
            raise AdapterFormatError(f"{where}: the 'lorakit' block is invalid: {e}") from e
    init = fields.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(RESIDUAL_INITS) and config_fields(fields)["init"] != init:
        raise AdapterFormatError(
            f"{where}: init_lora_weights={init!r} means the adapter is relative to a rewritten (residual) base, "
            "so it would give wrong outputs on the original base. Re-save it with PEFT's "
            "path_initial_model_for_weight_conversion to turn it into a plain delta."
        )
    for field, unused in UNSUPPORTED_FIELDS.items():
        if fields.get(field, unused) not in (unused, [], {}):
            raise AdapterFormatError(f"{where}: PEFT option {field}={fields[field]!r} is not supported by lorakit yet.")
    for spec in REGISTRY.values():
        try:
            cfg = spec.adapter.config_from_peft(fields)
        except (ConfigError, TypeError, ValueError) as e:
            raise AdapterFormatError(f"{where}: invalid value in {CONFIG_NAME}: {e}") from e
        if cfg is not None:
            return cfg
    raise AdapterFormatError(
        f"{where}: peft_type={fields.get('peft_type')!r} is not a method lorakit can load "
        f"(registered: {', '.join(sorted(REGISTRY))})."
    )


def _modules_of(fields: dict[str, Any], block: dict[str, Any], model: nn.Module, where: Path) -> list[str]:
    if isinstance(block.get("modules"), list):
        return list(block["modules"])
    targets = fields.get("target_modules")
    if targets is None:
        raise AdapterFormatError(f"{where}: target_modules is missing from {CONFIG_NAME}.")
    if targets == "all-linear" or isinstance(targets, str):
        return find_targets(model, targets, fields.get("exclude_modules"))
    return find_targets(model, list(targets), fields.get("exclude_modules"))


def _check_base(fields: dict[str, Any], block: dict[str, Any], model: nn.Module, where: Path) -> None:
    prints = block.get("base_fingerprint") or {}
    names: dict[str, Any] = dict(logical_modules(model))  # a module it lacks is reported as missing keys below
    norms = {m: weight_norm(names[m]) for m in prints if hasattr(names.get(m), "weight")}
    fix = "Load it onto its own base, or pass check_base=False if you know the bases match."
    check_base_norms(where, prints, norms, base_name=fields.get("base_model_name_or_path"), fix=fix)


def load_adapter(model: nn.Module, path: str | Path, name: str = "default", *, check_base: bool = True) -> nn.Module:
    """Attach the adapter stored at ``path`` (lorakit or PEFT LoRA/DoRA format) as ``name``; returns ``model``.

    Checks the config, the weights file, key names, shapes against the base and finite values;
    on any failure the model is left exactly as it was.
    """
    path = Path(path)
    fields = read_config(path)
    cfg = config_from_fields(fields, path / CONFIG_NAME)
    tensors, block = read_tensors(path / WEIGHTS_NAME)
    block = fields["lorakit"] if isinstance(fields.get("lorakit"), dict) else block
    if check_base:
        _check_base(fields, block, model, path)
    _drop_saved_embeddings(tensors, model, path / WEIGHTS_NAME)
    previous = active_adapter(model)
    try:
        modules = _modules_of(fields, block, model, path / CONFIG_NAME)
        attach(
            model,
            cfg,
            targets=modules,
            name=name,
            rank_pattern=rank_pattern_of(fields) or None,
            alpha_pattern=fields.get("alpha_pattern") or None,
            modules_to_save=fields.get("modules_to_save") or None,
            # the file holds the initialised (and trained) state; a replaced base (LoftQ's Q) is rebuilt from the
            # original W by rerunning the init (A and B are overwritten next), unless the base is quantized: then
            # it holds Q already (lk.quantize after LoftQ; at 4 bits and 1 iteration, NF4 of the original W is Q)
            initialize=rebuilds_base(cfg) and not any(L.is_quantized(_base(model, m)) for m in modules),
        )
    except TargetError as e:
        raise AdapterFormatError(f"{path / CONFIG_NAME}: its target modules do not fit this base: {e}") from e
    try:
        _fill(model, name, tensors, path / WEIGHTS_NAME)
    except BaseException:
        delete_adapter(model, name)
        set_active(model, previous)
        raise
    _note_quantization(block, model, modules, path)
    return model


def _base(model: nn.Module, name: str) -> nn.Module:
    module = model.get_submodule(name)
    return module.base_layer if isinstance(module, AdaptedLayer) else module


def _note_quantization(block: dict[str, Any], model: nn.Module, modules: list[str], path: Path) -> None:
    """One line when an adapter trained on a quantized base (QLoRA) loads onto a full-precision one: allowed,
    but its outputs differ from the ones it trained with by the base's quantization error."""
    trained_on = block.get("base_quantization")
    names = dict(logical_modules(model))
    if trained_on and not any(L.is_quantized(names[m]) for m in modules if m in names):
        warnings.warn(
            f"note: {path} was trained on a quantized base ({', '.join(trained_on)}); it loads onto this "
            "full-precision base, whose outputs differ by the quantization error (lk.quantize the base to match).",
            stacklevel=3,
        )


def _drop_saved_embeddings(tensors: dict[str, torch.Tensor], model: nn.Module, file: Path) -> None:
    """PEFT saves whole embedding matrices (``...base_layer.weight``) when embeddings are targeted.

    Identical to this base's: drop them. Different (e.g. a resized vocabulary): refuse, since
    applying the adapter without them would silently give other outputs.
    """
    names = dict(logical_modules(model))
    for key in [k for k in tensors if k.endswith(".base_layer.weight")]:
        module = names.get(key[len(PREFIX) : -len(".base_layer.weight")])
        weight = getattr(module, "weight", None)
        if (
            weight is not None
            and weight.shape == tensors[key].shape
            and torch.allclose(weight.detach().float(), tensors[key].float(), rtol=1e-4, atol=1e-6)
        ):
            del tensors[key]
        else:
            raise AdapterFormatError(
                f"{file}: {key} holds a full base weight that differs from this base's (a resized or retrained "
                "embedding?); lorakit does not load replaced base weights yet. Load it onto the base it was saved from."
            )


def _expected(model: nn.Module, name: str) -> dict[str, tuple[Any, str, torch.Tensor]]:
    """key -> (owner, its local key, current tensor) for adapter ``name``: factors, saved copies, shared state."""
    expected: dict[str, tuple[Any, str, torch.Tensor]] = {}
    for module_name, wrapper in wrappers(model):
        if name in wrapper.adapters:
            adapter: AdapterModule = wrapper.adapters[name]  # type: ignore[assignment]
            for suffix, t in adapter.export_state().items():
                expected[f"{PREFIX}{module_name}.{suffix}"] = (adapter, suffix, t)
    for module_name, holder in saved_modules(model):
        if name in holder.copies:
            for param, t in holder.copies[name].state_dict().items():
                expected[f"{PREFIX}{module_name}.{param}"] = (holder.copies[name], param, t)
    expected.update({key: (importer, key, t) for key, (importer, t) in _shared_state(model, name).items()})
    return expected


def _fill(model: nn.Module, name: str, tensors: dict[str, torch.Tensor], file: Path) -> None:
    expected = _expected(model, name)
    unknown = sorted(set(tensors) - set(expected))
    missing = sorted(set(expected) - set(tensors))
    if unknown:
        raise AdapterFormatError(
            f"{file} has {len(unknown)} key(s) that match no adapted module of this base, e.g. {unknown[0]!r}; "
            "the adapter was made for a different model or its target_modules do not match its weights."
        )
    if missing:
        raise AdapterFormatError(
            f"{file} lacks {len(missing)} key(s) the config implies, e.g. {missing[0]!r}; the file is incomplete "
            "or adapter_config.json does not belong to it."
        )
    per_adapter: dict[int, tuple[Any, dict[str, torch.Tensor]]] = {}
    for key, (adapter, suffix, like) in expected.items():
        t = tensors[key]
        if tuple(t.shape) != tuple(like.shape):
            raise AdapterFormatError(
                f"{file}: {key} has shape {tuple(t.shape)} but this base needs {tuple(like.shape)} "
                f"(rank {getattr(adapter.config, 'r', '?')}); the adapter was made for a different base model "
                "or its rank_pattern/r in the config does not match the weights."
            )
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise AdapterFormatError(f"{file}: {key} contains NaN or infinite values; the adapter is corrupt.")
        per_adapter.setdefault(id(adapter), (adapter, {}))[1][suffix] = t
    for adapter, state in per_adapter.values():
        if isinstance(adapter, (AdapterModule, _SharedImporter)):
            adapter.import_state(state)
        else:  # a modules_to_save copy: a plain module
            adapter.load_state_dict(state)
