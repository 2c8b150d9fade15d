"""The initialisation contract and its registry: inits are options of A/B methods (``init="pissa"``).

An init is one file in ``lorakit/init/`` holding an options dataclass and a function decorated with
``@register_init(...)``. The function receives an :class:`InitContext` (the model, every targeted
layer with its rank and scale, the calibration batches) and returns, per module, the A (k, in) and
B (out, k) the method's trained pair starts from (:class:`InitFactors`), possibly at another rank k
(0 leaves the layer unadapted) and possibly moving s·B·A out of the base weight (a residual base,
W_res = W − s·B·A). Core applies the result to any method whose adapter exposes that pair
(``AdapterModule.init_factors``), so PiSSA-initialised DoRA needs no code of its own.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lorakit.errors import ConfigError
from lorakit.registry import add_entry, check_options, unknown_entry

BUILTIN = ("default", "gaussian")  # random inits every A/B method does itself (PEFT's True and "gaussian")


@dataclass(frozen=True)
class InitTarget:
    """One targeted layer as an init sees it."""

    base: nn.Module  # the wrapped base layer: read it through lorakit.layers (dims, weight_out_in)
    r: int  # the rank the method was configured with for this module
    alpha: float  # its scaling numerator
    scale_for: Callable[[int, float], float]  # s of this module's method at rank r and alpha (α/r, α/√r, ...)

    @property
    def scale(self) -> float:
        return self.scale_for(self.r, self.alpha)


@dataclass(frozen=True)
class InitContext:
    """What an init reads: the model (adapters in place, B = 0), its targeted layers, calibration data."""

    model: nn.Module
    targets: dict[str, InitTarget]  # logical module name -> target
    batches: list[dict[str, torch.Tensor]] | None  # the calibration batches (inits with calibration=True)


@dataclass(frozen=True)
class InitFactors:
    """The starting A (k, in) and B (out, k) of one module, in float32; k may differ from the target's r."""

    A: torch.Tensor
    B: torch.Tensor
    shift: bool = False  # True: W ← W − s·B·A, so the model's outputs are unchanged (PiSSA, LoRA-GA)
    alpha: float | None = None  # a new scaling numerator for this module (EVA keeps α/r when r changes)
    base: torch.Tensor | None = None  # a new base weight (out, in) that replaces W (LoftQ's quantized Q), or None


@dataclass(frozen=True)
class InitSpec:
    """What the registry knows about one initialisation."""

    name: str
    fn: Callable[[InitContext, Any], dict[str, InitFactors]]
    options: type  # frozen dataclass of the init's own options (init_options=...)
    methods: tuple[str, ...]  # A/B methods it applies to
    layers: tuple[str, ...]  # layer kinds it reads (others are a clear TargetError)
    calibration: bool  # reads calibration batches: attach(..., calibration=batches)
    shifts_base: bool  # leaves a residual base (saved adapters are folded back onto the original W)
    identity_at_init: bool  # the adapted model starts equal to the base
    paper: str
    url: str
    peft: Callable[[Any], dict[str, Any]]  # adapter_config.json fields (init_lora_weights, eva_config, ...)
    replaces_base: bool = False  # puts another matrix in place of W (LoftQ's Q), recomputed from W on load
    reload: Callable[[dict[str, Any]], dict[str, Any] | None] | None = None  # config fields -> options to rerun


INITS: dict[str, InitSpec] = {}


def register_init(
    name: str,
    *,
    options: type,
    paper: str,
    url: str,
    methods: tuple[str, ...] = ("lora", "dora"),
    layers: tuple[str, ...] = ("linear", "conv1d"),
    calibration: bool = False,
    shifts_base: bool = False,
    identity_at_init: bool = True,
    peft: Callable[[Any], dict[str, Any]] | None = None,
    replaces_base: bool = False,
    reload: Callable[[dict[str, Any]], dict[str, Any] | None] | None = None,
) -> Callable[[Callable[[InitContext, Any], dict[str, InitFactors]]], Callable[[InitContext, Any], Any]]:
    """Function decorator that adds an init to :data:`INITS` under ``name``.

    ``peft(options)`` gives the adapter_config.json fields PEFT uses for this init (by default
    ``{"init_lora_weights": name}``), so PEFT loads the saved dirs. ``replaces_base``: the init puts another
    matrix in place of W (its ``InitFactors.base``), and a saved dir holds A, B relative to it; ``reload(fields)``
    then gives the options to rerun the init with when a dir's adapter_config.json names it (None: it does not),
    so loading onto the original base rebuilds that matrix first, as PEFT does.
    """

    def wrap(fn: Callable[[InitContext, Any], dict[str, InitFactors]]) -> Callable[[InitContext, Any], Any]:
        if not (dataclasses.is_dataclass(options) and options.__dataclass_params__.frozen):  # type: ignore[attr-defined]
            raise TypeError(f"init {name!r}: its options {options.__name__} must be a frozen dataclass")
        fields = peft or (lambda _: {"init_lora_weights": name})
        spec = InitSpec(
            name, fn, options, methods, layers, calibration, shifts_base, identity_at_init, paper, url, fields,
            replaces_base, reload,
        )  # fmt: skip
        add_entry(INITS, "init", name, spec, same=name in INITS and INITS[name].fn is fn)
        return fn

    return wrap


def get_init(name: str) -> InitSpec:
    if name not in INITS:
        raise unknown_entry(INITS, "init", name, known=[*BUILTIN, *sorted(INITS)])
    return INITS[name]


def init_options(init: str, options: Mapping[str, Any] | None) -> Any:
    """The validated options object of ``init`` (None for a built-in random init without options)."""
    opts = dict(options or {})
    if init in BUILTIN:
        if opts:
            raise ConfigError(f"init {init!r} takes no init_options, got {sorted(opts)}.")
        return None
    spec = get_init(init)
    check_options((f.name for f in dataclasses.fields(spec.options)), opts, f"init {init!r}", "init_options")
    return spec.options(**opts)


def freeze_options(options: Any) -> tuple[tuple[str, Any], ...]:
    """init_options as a config field: a sorted tuple of (name, value) pairs (a dict or such pairs in)."""
    if options is None:
        return ()
    if isinstance(options, Mapping):
        return tuple(sorted(options.items()))
    try:
        return tuple(sorted((str(k), v) for k, v in options))
    except (TypeError, ValueError) as e:
        raise ConfigError(f"init_options must be a dict of option names to values, got {options!r}.") from e


def applicable(method: str) -> Iterator[str]:
    """Names of the registered inits that apply to ``method``."""
    return (name for name, spec in sorted(INITS.items()) if method in spec.methods)


def check_config(cfg: Any) -> None:
    """For an A/B method's config ``__post_init__``: store ``init_options`` as sorted pairs and check that
    ``init`` is known, its options valid, and that it does not combine with train_only / lora_bias."""
    object.__setattr__(cfg, "init_options", freeze_options(cfg.init_options))
    init_options(cfg.init, dict(cfg.init_options))
    if cfg.init not in BUILTIN and (getattr(cfg, "train_only", None) or getattr(cfg, "lora_bias", False)):
        raise ConfigError(f"init={cfg.init!r} sets A and B itself; it does not combine with train_only or lora_bias.")


def config_fields(fields: dict[str, Any]) -> dict[str, Any]:
    """The ``init`` (and ``init_options``) of an A/B method config read back from an adapter_config.json: an init
    whose base the loader must rebuild (``reload``: LoftQ) with its options, 'gaussian' for PEFT's gaussian, else
    'default' (the saved A and B are the init's result)."""
    for spec in INITS.values():
        options = spec.reload(fields) if spec.reload is not None else None
        if options is not None:
            return {"init": spec.name, "init_options": options}
    return {"init": "gaussian" if fields.get("init_lora_weights") == "gaussian" else "default"}


def peft_fields(cfg: Any) -> dict[str, Any]:
    """adapter_config.json's init fields for ``cfg``: PEFT's init_lora_weights (True for the default) and the
    init's sub-config (eva_config, lora_ga_config, ...)."""
    if cfg.init in BUILTIN:
        return {"init_lora_weights": True if cfg.init == "default" else cfg.init}
    return INITS[cfg.init].peft(init_options(cfg.init, dict(cfg.init_options)))
