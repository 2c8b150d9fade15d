"""Run a new adapter's initialisation at attach time: its init option, then the method's own hook.

An init option (``cfg.init`` naming a registered init, e.g. ``"pissa"``) returns per module the A, B a
method's trained pair starts from (``lorakit/init/_api.py``). This module applies them to any method
whose adapters expose that pair (``AdapterModule.init_factors``): it rebuilds an adapter at a new rank
where the init chose one (EVA, GoRA), removes it where the init gave rank 0, copies A and B in, and for
inits that leave a residual base subtracts s·B·A from the base weight and records it as the adapter's
``base_shift`` (``save_adapter`` folds it back, so saved dirs are plain deltas for the original base).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from lorakit import layers as L
from lorakit.errors import ConfigError, TargetError
from lorakit.init._api import BUILTIN, InitContext, InitFactors, InitTarget, get_init, init_options
from lorakit.layers._wrapper import AdaptedLayer
from lorakit.lowrank import LoraFactors
from lorakit.methods._api import AdapterModule, MethodSpec


def init_name(cfg: Any) -> str | None:
    """The registered init ``cfg`` asks for, or None: a method without init options (its config has no
    ``init_options`` field; its own ``init`` field, if any, means something else) or a built-in random init."""
    fields = {f.name for f in dataclasses.fields(cfg)}
    if not {"init", "init_options"} <= fields or cfg.init in BUILTIN:
        return None
    return str(cfg.init)


def rebuilds_base(cfg: Any) -> bool:
    """Whether loading a saved ``cfg`` reruns its init option to rebuild the base it replaced (LoftQ's Q)."""
    init = init_name(cfg)
    return init is not None and get_init(init).replaces_base


def needs_calibration(spec: MethodSpec, cfg: Any) -> bool:
    """Whether attaching ``cfg`` reads calibration batches (its method's own init or its init option)."""
    init = init_name(cfg)
    return spec.needs_calibration or (init is not None and get_init(init).calibration)


def check_init(spec: MethodSpec, cfg: Any, kinds: dict[str, str]) -> None:
    """A clear error when ``cfg``'s init does not apply to this method or to a targeted layer kind."""
    init = init_name(cfg)
    if init is None:
        return
    ispec = get_init(init)
    if spec.name not in ispec.methods:
        raise ConfigError(
            f"init {init!r} does not apply to method {spec.name!r}; it applies to {', '.join(ispec.methods)}."
        )
    for module, kind in kinds.items():
        if kind not in ispec.layers:
            raise TargetError(
                f"init {init!r} cannot wrap {module} (a {kind} layer); it reads {', '.join(ispec.layers)} "
                "layers. Leave that module out of targets."
            )


def run_init_option(
    model: nn.Module,
    spec: MethodSpec,
    built: dict[str, AdapterModule],
    batches: list[dict] | None,
    rng: torch.Tensor | None = None,
) -> dict[str, AdapterModule | None]:
    """Apply the init option of the adapters in ``built`` ({module: adapter}); returns the changed entries
    ({module: new adapter, or None where the init left the layer unadapted}). No-op without an init option.

    ``rng``: the CPU generator state the attach began with; the init draws from it (the random A the method
    drew first is overwritten anyway), so a seed set before attach fixes the init's sketch or draws, as
    PEFT's ``pissa_niter_N`` after the same seed."""
    cfg = next(iter(built.values())).config
    init = init_name(cfg)
    if init is None:
        return {}
    if rng is not None:
        torch.set_rng_state(rng)
    ispec = get_init(init)
    opts = init_options(init, dict(cfg.init_options))
    targets = {}
    for module, built_adapter in built.items():
        c = built_adapter.config
        scale_for = lambda r, alpha, c=c: dataclasses.replace(c, r=r, alpha=alpha).scale  # noqa: E731
        targets[module] = InitTarget(_wrapper(model, module).base_layer, c.r, c.alpha, scale_for)
    results = ispec.fn(InitContext(model, targets, batches), opts)
    changed: dict[str, AdapterModule | None] = {}
    for module, result in results.items():
        adapter: AdapterModule | None = built[module]
        if result.A.shape[0] != built[module].config.r or result.alpha not in (None, built[module].config.alpha):
            adapter = changed[module] = _rebuild(model, spec, module, built[module], result)
        if adapter is not None:
            _set(_wrapper(model, module).base_layer, adapter, result, init)
    return changed


def _wrapper(model: nn.Module, module: str) -> AdaptedLayer:
    wrapper = model.get_submodule(module)
    assert isinstance(wrapper, AdaptedLayer)
    return wrapper


def _rebuild(
    model: nn.Module, spec: MethodSpec, module: str, old: AdapterModule, result: InitFactors
) -> AdapterModule | None:
    """Replace ``old`` by the same method at the init's rank (and alpha); rank 0 removes it (returns None)."""
    wrapper = _wrapper(model, module)
    key = next(k for k, a in wrapper.adapters.items() if a is old)
    rank = result.A.shape[0]
    if rank == 0:
        del wrapper.adapters[key]
        return None
    alpha = old.config.alpha if result.alpha is None else result.alpha
    new = spec.adapter.from_base(wrapper.base_layer, dataclasses.replace(old.config, r=rank, alpha=alpha))
    new.train(old.training)
    new.requires_grad_(any(p.requires_grad for p in old.parameters()))
    wrapper.adapters[key] = new
    return new


def _set(base: nn.Module, adapter: AdapterModule, result: InitFactors, init: str) -> None:
    """Copy A, B into the adapter's pair; with ``shift``, W ← W − s·B·A using the values the adapter holds."""
    pair = adapter.init_factors()
    if pair is None:
        raise ConfigError(f"init {init!r} needs a method with a trained A·B pair; {type(adapter).__name__} has none.")
    A, B = pair
    with torch.no_grad():
        A.copy_(result.A)
        B.copy_(result.B)
    if result.shift:
        shift = LoraFactors(A.detach().float().clone(), B.detach().float().clone(), adapter.scale)
        L.subtract(base, shift)
        adapter.init_shift = shift
    if result.base is not None:
        norm = float(L.weight_out_in(base).detach().float().norm())
        L.assign(base, result.base)
        adapter.init_base_norm = norm
