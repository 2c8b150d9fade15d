"""Find target modules, wrap them with named adapters, switch, disable, delete, and merge.

A targeted layer is replaced by an :class:`AdaptedLayer` that keeps the original as
``base_layer`` and holds one adapter per name; exactly one (or none) is active. Targets follow
PEFT's rules: a list of module-name suffixes, a full-name regex, or ``"all-linear"`` (every
Linear/Conv1D except the output head). Modules an adapter replaces whole (PEFT's
``modules_to_save``: a classifier head, a changed norm or embedding) sit in a
:class:`SavedModule` holding one trainable copy per adapter name.
"""

from __future__ import annotations

import copy
import dataclasses
import re
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lorakit import layers as L
from lorakit.errors import ConfigError, TargetError
from lorakit.initialize import check_init, init_name, needs_calibration, run_init_option
from lorakit.io.peft_format import check_adapter_name, name_matches, pattern_value
from lorakit.layers._wrapper import WRAPPERS, AdaptedLayer, SavedModule, disabled, holders
from lorakit.methods._api import AdapterModule, MethodSpec, spec_of_config
from lorakit.quant._merge import MODES as MERGE_MODES
from lorakit.quant._merge import MergeDrift, logit_drift, merge_layer

Targets = str | Sequence[str]
LINEAR_FAMILIES = ("linear", "conv1d")  # what "all-linear" selects (every kind of those families)
__all__ = ["AdaptedLayer", "SavedModule", "attach", "delete_adapter", "disabled", "merge", "set_active"]
__all__ += ["active_adapter", "adapter_info", "adapter_names", "find_targets", "logical_modules", "wrappers"]


@dataclass
class AdapterInfo:
    """What ``attach`` recorded about one named adapter (used to save it in PEFT's format)."""

    config: Any
    spec: MethodSpec
    modules: list[str]  # logical module names, e.g. "model.layers.0.self_attn.q_proj"
    saved: list[str] = dataclasses.field(default_factory=list)  # modules_to_save: replaced whole


def _registry(model: nn.Module) -> dict[str, AdapterInfo]:
    if "_lorakit_adapters" not in model.__dict__:
        model.__dict__["_lorakit_adapters"] = {}
    return model.__dict__["_lorakit_adapters"]


def adapter_info(model: nn.Module, name: str) -> AdapterInfo:
    infos = _registry(model)
    if name not in infos:
        have = ", ".join(map(repr, infos)) or "none"
        raise ConfigError(f"the model has no adapter named {name!r} (adapters: {have}).")
    return infos[name]


def adapter_names(model: nn.Module) -> list[str]:
    return list(_registry(model))


def logical_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(name, module) pairs as if no adapter were attached: wrappers show as their base layer."""
    inside: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(w + ".") for w in inside):
            continue
        if isinstance(module, WRAPPERS):
            inside.append(name)
            yield name, module.base_layer
        else:
            yield name, module


def find_targets(model: nn.Module, targets: Targets, exclude: Targets | None = None) -> list[str]:
    """Logical names of the modules ``targets`` selects; a clear TargetError when none or a bad type."""
    if isinstance(targets, str) and targets != "all-linear":
        try:
            re.compile(targets)
        except re.error as e:
            raise TargetError(f"targets {targets!r} is not a valid regular expression: {e}.") from e
    get_head: Any = getattr(model, "get_output_embeddings", None)  # transformers models have one
    head = get_head() if callable(get_head) else None
    head = head.base_layer if isinstance(head, AdaptedLayer) else head
    chosen: list[str] = []
    for name, module in logical_modules(model):
        if not name:
            continue
        if targets == "all-linear":
            hit = module is not head and L.kind_of(module) is not None and L.layer_kind(module) in LINEAR_FAMILIES
        else:
            hit = name_matches(targets, name)
        if hit and not (exclude and name_matches(exclude, name)):
            L.layer_kind(module, name)  # unsupported type -> TargetError naming the module
            chosen.append(name)
    if not chosen:
        leaves = sorted({n.rsplit(".", 1)[-1] for n, m in logical_modules(model) if isinstance(m, L.supported_types())})
        raise TargetError(
            f"targets={targets!r}{f' (exclude={exclude!r})' if exclude else ''} matched no module of "
            f"{type(model).__name__}. Supported modules here end in: {', '.join(leaves[:20])}."
        )
    return chosen


def module_config(cfg: Any, name: str, rank_pattern: Mapping | None, alpha_pattern: Mapping | None) -> Any:
    changes: dict[str, Any] = {}
    for field, patterns in (("r", rank_pattern), ("alpha", alpha_pattern)):
        value = pattern_value(patterns, name)
        if value is None:
            continue
        if field not in {f.name for f in dataclasses.fields(cfg)}:
            raise ConfigError(f"{type(cfg).__name__} has no {field!r} option, so {field}_pattern cannot apply.")
        changes[field] = value
    return dataclasses.replace(cfg, **changes) if changes else cfg


def _base_of(model: nn.Module, name: str) -> nn.Module:
    module = model.get_submodule(name)
    return module.base_layer if isinstance(module, AdaptedLayer) else module


def _wrapper_for(model: nn.Module, name: str) -> AdaptedLayer:
    module = model.get_submodule(name)
    if isinstance(module, AdaptedLayer):
        return module
    parent_name, _, child = name.rpartition(".")
    wrapper = AdaptedLayer(module)
    wrapper.train(module.training)  # the wrapper (and its adapter dict) take the wrapped layer's mode
    setattr(model.get_submodule(parent_name) if parent_name else model, child, wrapper)
    return wrapper


def attach(
    model: nn.Module,
    cfg: Any,
    targets: Targets = "all-linear",
    name: str = "default",
    *,
    exclude: Targets | None = None,
    rank_pattern: Mapping[str, int] | None = None,
    alpha_pattern: Mapping[str, float] | None = None,
    modules_to_save: Sequence[str] | None = None,
    calibration: Iterable[Mapping[str, torch.Tensor]] | None = None,
    initialize: bool = True,
) -> nn.Module:
    """Add adapter ``name`` of ``cfg``'s method to every targeted module, make it active and trainable.

    ``modules_to_save`` (name suffixes, as PEFT) are modules the adapter replaces whole with a
    trainable copy, e.g. a new classifier head. The base model is frozen; only the new adapter's
    parameters require grad. ``calibration`` (batches: dicts with ``input_ids``, ``attention_mask``,
    ``labels``) feeds initialisations that read data (PiSSA needs none, LoRA-GA and EVA do); the
    adapter class's ``initialize`` hook runs once all adapters are in place; ``initialize=False``
    skips it (and the need for calibration), as ``load_adapter`` does before filling in saved weights.
    Returns ``model``.
    """
    spec = spec_of_config(cfg)
    rng = torch.get_rng_state()  # an init option draws from here: a seed before attach fixes its draws
    if initialize and needs_calibration(spec, cfg) and calibration is None:
        what = f"method {spec.name!r}" if init_name(cfg) is None else f"init {init_name(cfg)!r} of method {spec.name!r}"
        raise ConfigError(
            f"{what} initialises from data; pass calibration=batches (dicts with input_ids, "
            "attention_mask, labels) to attach, or --init-batches N on the CLI."
        )
    check_adapter_name(name, "attach")
    if name in _registry(model):
        raise ConfigError(f"the model already has an adapter named {name!r}; delete_adapter() it or pick another name.")
    chosen = find_targets(model, targets, exclude)
    previous = active_adapter(model)
    saved = _saved_targets(model, modules_to_save or [], chosen)
    built = _build(model, spec, cfg, chosen, rank_pattern, alpha_pattern)
    if initialize:
        check_init(spec, cfg, {m: L.layer_kind(_base_of(model, m)) for m in chosen})
    for p in model.parameters():
        p.requires_grad_(False)
    for module_name, adapter in built.items():
        adapter.train(model.training)  # an adapter follows the model's mode (no dropout on an eval model)
        _wrapper_for(model, module_name).adapters[name] = adapter
    for module_name in saved:
        holder = _holder_for(model, module_name)
        holder.copies[name] = copy.deepcopy(holder.base_layer)
    _registry(model)[name] = AdapterInfo(cfg, spec, chosen, saved)
    set_active(model, name)
    if initialize:
        _initialize(model, name, spec, cfg, built, calibration, previous, rng)
    return model


def _build(
    model: nn.Module,
    spec: MethodSpec,
    cfg: Any,
    chosen: list[str],
    rank_pattern: Mapping[str, int] | None,
    alpha_pattern: Mapping[str, float] | None,
) -> dict[str, AdapterModule]:
    """One adapter per chosen module, all built before any is placed (a failure leaves the model untouched)."""
    bases = {m: _base_of(model, m) for m in chosen}
    for module_name, base in bases.items():
        if L.layer_kind(base, module_name) not in spec.layers:
            raise TargetError(
                f"method {spec.name!r} cannot wrap {module_name} ({type(base).__name__}); it supports "
                f"{', '.join(spec.layers)} layers. Leave that module out of targets."
            )
    cfgs = {m: module_config(cfg, m, rank_pattern, alpha_pattern) for m in chosen}
    return spec.adapter.from_bases(bases, cfgs)  # tensors shared across layers are shared within this attach only


def _initialize(
    model: nn.Module,
    name: str,
    spec: MethodSpec,
    cfg: Any,
    built: dict[str, AdapterModule],
    calibration: Iterable[Mapping[str, torch.Tensor]] | None,
    previous: str | None,
    rng: torch.Tensor,
) -> None:
    """Run the init option (lorakit/initialize.py), then the method's ``initialize`` hook; on failure the new
    adapter is removed again."""
    try:
        if calibration is not None and not isinstance(calibration, Iterable):
            raise ConfigError(
                f"calibration must be an iterable of batches (dicts of tensors), got a {type(calibration).__name__}."
            )
        batches = None if calibration is None else [dict(b) if isinstance(b, Mapping) else b for b in calibration]
        for module, new in run_init_option(model, spec, built, batches, rng).items():
            if new is None:  # the init left this layer unadapted
                del built[module]
                adapter_info(model, name).modules.remove(module)
                if len(_wrapper_for(model, module).adapters) == 0:
                    _replace(model, module, _wrapper_for(model, module).base_layer)
            else:
                built[module] = new
        spec.adapter.initialize(model, dict(built), cfg, batches)
    except BaseException:
        delete_adapter(model, name)
        set_active(model, previous)
        raise


def _saved_targets(model: nn.Module, suffixes: Sequence[str], adapted: list[str]) -> list[str]:
    """Logical names of the modules_to_save; each suffix must match, and none may also be adapted."""
    if isinstance(suffixes, str):
        suffixes = [suffixes]
    names = [n for n, _ in logical_modules(model) if n and name_matches(suffixes, n)]
    unmatched = [s for s in suffixes if not any(name_matches([s], n) for n in names)]
    if unmatched:
        raise TargetError(f"modules_to_save {unmatched!r} matched no module of {type(model).__name__}.")
    names = [n for n in names if not any(n.startswith(o + ".") for o in names)]  # outermost only
    both = sorted(set(names) & set(adapted))
    if both:
        raise TargetError(f"{both[0]!r} is both a target and in modules_to_save; it can only be one of them.")
    return names


def _holder_for(model: nn.Module, name: str) -> SavedModule:
    module = model.get_submodule(name)
    if isinstance(module, SavedModule):
        return module
    holder = SavedModule(module)
    holder.train(module.training)
    _replace(model, name, holder)
    return holder


def wrappers(model: nn.Module) -> Iterator[tuple[str, AdaptedLayer]]:
    for module_name, module in model.named_modules():
        if isinstance(module, AdaptedLayer):
            yield module_name, module


def active_layers(model: nn.Module) -> Iterator[tuple[str, AdaptedLayer, AdapterModule]]:
    """(module name, wrapper, its active adapter) for every adapted layer whose active adapter it holds."""
    for module_name, w in wrappers(model):
        if w.active is not None and w.active in w.adapters:
            yield module_name, w, w.adapters[w.active]  # type: ignore[misc]


def saved_modules(model: nn.Module) -> Iterator[tuple[str, SavedModule]]:
    for module_name, module in model.named_modules():
        if isinstance(module, SavedModule):
            yield module_name, module


def set_active(model: nn.Module, name: str | None) -> None:
    """Make adapter ``name`` the active one (None: no adapter); only its parameters train."""
    if name is not None:
        adapter_info(model, name)
    for _, wrapper in wrappers(model):
        wrapper.active = name
        for adapter_name, adapter in wrapper.adapters.items():
            adapter.requires_grad_(adapter_name == name)
    for _, holder in saved_modules(model):
        holder.active = name
        for adapter_name, module in holder.copies.items():
            module.requires_grad_(adapter_name == name)


def active_adapter(model: nn.Module) -> str | None:
    return next((w.active for w in holders(model)), None)


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter ``name``; wrappers left with no adapter give back their base layer."""
    adapter_info(model, name)
    for module_name, wrapper in list(wrappers(model)):
        if name in wrapper.adapters:
            del wrapper.adapters[name]
        if wrapper.active == name:
            wrapper.active = None
        if len(wrapper.adapters) == 0:
            _replace(model, module_name, wrapper.base_layer)
    for module_name, holder in list(saved_modules(model)):
        if name in holder.copies:
            del holder.copies[name]
        if holder.active == name:
            holder.active = None
        if len(holder.copies) == 0:
            _replace(model, module_name, holder.base_layer)
    del _registry(model)[name]


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def _untie(model: nn.Module, weight: torch.Tensor) -> None:
    """About to replace ``weight``: if it is tied elsewhere (embeddings ↔ lm_head), mark the config untied.

    The other user keeps the old tensor, and tie_weights()/reloading must not undo the change.
    """
    tied = sum(p is weight for _, p in model.named_parameters(remove_duplicate=False)) > 1
    config: Any = getattr(model, "config", None)
    if tied and getattr(config, "tie_word_embeddings", False):
        config.tie_word_embeddings = False


def _merge_bias(base: nn.Module, adapter: AdapterModule) -> None:
    """Fold an adapter's output shift (LoRA's lora_bias) into the base bias, creating one if needed."""
    shift = adapter.delta_bias()
    if shift is not None:
        weight: torch.Tensor = base.weight  # type: ignore[assignment]
        with torch.no_grad():
            old: Any = base.bias
            new = shift.to(weight.dtype) + (0 if old is None else old)
        base.bias = nn.Parameter(new, requires_grad=False)


def merge(
    model: nn.Module,
    *,
    inplace: bool = False,
    quantized: str = "requantize",
    calibration: torch.Tensor | None = None,
    drift_threshold: float = 0.5,
) -> nn.Module:
    """A plain model (no wrappers) whose weights include the active adapter's delta and saved modules.

    By default the input model is left as it was (the merge works on a deep copy); with
    ``inplace=True`` the model itself is rewritten (no extra memory, not reversible).

    A quantized base layer (``lk.quantize``) gets W_q + ΔW quantized again with its own kind
    (``quantized="requantize"``) or stored dense in an nn.Linear (``"dequantize"``, exact). Either way the
    merged model carries a drift report (``lorakit.quant.merge_drift(merged)``): per layer
    ‖W_merged_q − (W_q + ΔW)‖_F and its ratio to ‖ΔW‖_F, and, given ``calibration`` input ids (B, T), the
    max |Δlogit| and mean KL between the unmerged adapter and the merged model. Layers whose ratio exceeds
    ``drift_threshold`` are named in a warning.
    """
    if quantized not in MERGE_MODES:
        raise ConfigError(f"quantized must be one of {', '.join(MERGE_MODES)}, got {quantized!r}.")
    quantized_base = any(L.is_quantized(w.base_layer) for _, w in wrappers(model))
    reference = _logits(model, calibration) if quantized_base and calibration is not None else None
    out = model if inplace else copy.deepcopy(model)
    report = MergeDrift(quantized, threshold=drift_threshold)
    for module_name, wrapper in list(wrappers(out)):
        _replace(out, module_name, _merged_base(out, module_name, wrapper, report))
    for module_name, holder in list(saved_modules(out)):
        replacement = holder.current()
        if replacement is not holder.base_layer:
            for p in holder.base_layer.parameters():
                _untie(out, p)
            replacement.requires_grad_(False)
        _replace(out, module_name, replacement)
    out.__dict__.pop("_lorakit_adapters", None)
    if report.drift:
        if reference is not None and calibration is not None:
            report.max_abs_logit, report.kl = logit_drift(reference, _logits(out, calibration))
        out.__dict__["lorakit_merge_drift"] = report
        if report.over():
            names = report.over()
            warnings.warn(
                f"merging onto the quantized base lost more than {drift_threshold:g}·‖ΔW‖ to re-quantization in "
                f"{len(names)} layer(s): {', '.join(names[:5])}{', ...' if len(names) > 5 else ''}. "
                "Merge with quantized='dequantize' to keep W_q + ΔW exactly.",
                stacklevel=2,
            )
    return out


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        result = model(ids)
    return getattr(result, "logits", result)


def _merged_base(out: nn.Module, module_name: str, wrapper: AdaptedLayer, report: MergeDrift) -> nn.Module:
    """The wrapper's base layer with its active adapter folded in (a quantized base: a new layer, drift recorded)."""
    base: Any = wrapper.base_layer
    if wrapper.active is None or wrapper.active not in wrapper.adapters:
        return base
    adapter: AdapterModule = wrapper.adapters[wrapper.active]  # type: ignore[assignment]
    spec = adapter_info(out, wrapper.active).spec
    if not spec.mergeable:
        raise ConfigError(f"method {spec.name!r} cannot be merged exactly into the base weights.")
    with torch.no_grad():
        delta = adapter.delta_weight(base)  # base layout
    if L.is_quantized(base):  # (out, in): a quantized kind's own layout
        merged, drift, norm = merge_layer(base, delta, adapter.delta_bias(), report.mode)
        report.drift[module_name], report.relative[module_name] = drift, drift / max(norm, 1e-30)
        return merged
    with torch.no_grad():
        weight = base.weight + delta.to(base.weight.dtype)
    _untie(out, base.weight)
    base.weight = nn.Parameter(weight, requires_grad=False)
    _merge_bias(base, adapter)
    return base
