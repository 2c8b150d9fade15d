"""The method contract and the registry.

A method is one file under ``lorakit/methods/`` whose adapter class subclasses :class:`AdapterModule`
and is decorated with ``@register(...)``. Importing ``lorakit.methods`` imports every such file, so
adding a method edits no other file. :class:`AdapterModule` declares the whole contract: the three
required hooks and every optional one with its signature, meaning and default, so Core calls each
hook directly. The config is a frozen, keyword-only dataclass validated in ``__post_init__``.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from lorakit import layers as L
from lorakit.errors import ConfigError
from lorakit.lowrank import LoraFactors, factorize
from lorakit.registry import add_entry, check_options, get_entry

ALL_LAYERS = ("linear", "conv1d", "embedding")


class AdapterModule(nn.Module, metaclass=abc.ABCMeta):
    """One adapter of one method on one base layer (the container owns the base layer): the contract.

    Required of every method (no default):

    - ``from_base(cls, base, cfg)``: build the adapter for the wrapped layer ``base`` (read it only
      through ``lorakit.layers``: dims, dense weight, input projection).
    - ``forward(x, base, y)``: the adapted output, given the layer input ``x`` and the base output ``y``.
    - ``export_state()``: ``{PEFT-style per-module suffix: tensor}`` (``lora_A.weight``, ...); the
      on-disk format needs no table.

    Optional hooks, each with its default here, so Core calls them directly (never ``hasattr``):
    ``delta_weight``, ``to_lora``, ``delta_bias``, ``fused_forward``, ``import_state``,
    ``base_shift``, ``init_factors``, ``export_shared`` / ``import_shared``, ``from_bases``,
    ``initialize``, ``set_step``, ``regularizer``, ``peft_fields``, ``peft_rank_pattern``,
    ``config_from_peft``; class attributes
    ``peft_type`` and ``shared_params``. :data:`HOOKS` lists them all (the README's table is
    generated from it).
    """

    config: Any
    scale: float
    method_name: ClassVar[str]  # set by @register
    peft_type: ClassVar[str | None] = None
    """PEFT's ``peft_type`` when PEFT has this method with the same keys and outputs, else None."""
    shared_params: ClassVar[str | None] = None
    """Trainable parameters of one group of tensors shared across layers, as a formula like ``params``."""
    init_shift: LoraFactors | None = None
    """Set by Core when an init option moved s·B₀·A₀ out of the base weight (the default ``base_shift``)."""
    init_base_norm: float | None = None
    """Set by Core when an init option replaced the base weight (LoftQ's Q): ‖W‖_F of the original W, which a
    saved dir fingerprints (it loads onto the original W, from which the loader rebuilds the same Q)."""

    @classmethod
    @abc.abstractmethod
    def from_base(cls, base: nn.Module, cfg: Any) -> AdapterModule:
        """Build the adapter for the wrapped layer ``base``, read only through ``lorakit.layers``."""

    @abc.abstractmethod
    def forward(self, x: torch.Tensor, base: nn.Module, y: torch.Tensor) -> torch.Tensor:
        """The adapted output, given the layer input ``x``, the base layer and its output ``y``."""

    @abc.abstractmethod
    def export_state(self) -> dict[str, torch.Tensor]:
        """``{PEFT-style per-module suffix: tensor}`` (``lora_A.weight``, ...): what a saved dir holds."""

    def delta_out_in(self, base: nn.Module) -> torch.Tensor:
        """ΔW as one dense (out, in) matrix, for methods that build it whole (structured, sparse, quantized ones):
        defining it gives ``delta_weight`` and ``to_lora`` (its SVD) below."""
        raise ConfigError(f"method {type(self).__name__} cannot be merged exactly into the base weights.")

    def lora_rank(self) -> int | None:
        """The rank at which ``to_lora``'s SVD of ``delta_out_in`` is exact; None: min(ΔW's shape) (full rank)."""
        return None

    def delta_weight(self, base: nn.Module) -> torch.Tensor:
        """ΔW in the base layer's own weight layout, so that merged weight = W + ΔW (mergeable methods)."""
        return L.to_base_layout(base, self.delta_out_in(base))

    def to_lora(self, base: nn.Module, rank: int | None = None) -> LoraFactors:
        """Plain (A, B, scale), exact or the best rank-``rank`` approximation (serving, export, aggregation); by
        default the SVD of ``delta_out_in``, exact at ``lora_rank``."""
        if type(self).delta_out_in is AdapterModule.delta_out_in:
            raise ConfigError(f"method {type(self).__name__} cannot be expressed as a plain LoRA (A, B) pair.")
        with torch.no_grad():
            delta = self.delta_out_in(base)
            return factorize(delta, rank or self.lora_rank() or min(delta.shape))

    def delta_bias(self) -> torch.Tensor | None:
        """An output shift the adapter adds (LoRA's lora_bias), folded into the base bias on merge; None: none."""
        return None

    def fused_forward(self, x: torch.Tensor, base: nn.Module) -> torch.Tensor | None:
        """Training only: base and adapter in one autograd node, or None to use ``forward``."""
        return None

    def import_state(self, state: dict[str, torch.Tensor]) -> None:
        """Load ``export_state``'s tensors (same keys, shapes already checked) into this adapter."""
        with torch.no_grad():
            for key, tensor in self.export_state().items():
                tensor.copy_(state[key])

    def base_shift(self) -> LoraFactors | None:
        """What the adapter's init took out of the base weight (W_res = W − scale·B@A), or None.

        ``save_adapter`` folds it back, so the saved dir is a plain delta for the ORIGINAL base.
        """
        return self.init_shift

    def init_factors(self) -> tuple[nn.Parameter, nn.Parameter] | None:
        """The trained A (r, in) and B (out, r) of an update that contains ``self.scale``·B·A, which an
        initialisation option (``init="pissa"``, ...) may overwrite; None: no init option applies."""
        return None

    def export_shared(self) -> dict[str, torch.Tensor]:
        """Tensors several layers share, under full file keys (e.g. ``base_model.vblora_vector_bank``)."""
        return {}

    def import_shared(self, state: dict[str, torch.Tensor]) -> None:
        """Load ``export_shared``'s tensors."""

    @classmethod
    def from_bases(cls, bases: Mapping[str, nn.Module], cfgs: Mapping[str, Any]) -> dict[str, AdapterModule]:
        """Build the adapters of one attach ({module: base layer}, {module: its config}), in order. The default
        calls ``from_base`` per module; methods whose layers share tensors (VeRA, RandLoRA, VB-LoRA, LoTR)
        build each shared group here, so it belongs to this attach alone (a second attach gets its own)."""
        return {name: cls.from_base(base, cfgs[name]) for name, base in bases.items()}

    @classmethod
    def initialize(cls, model: nn.Module, adapters: dict[str, AdapterModule], cfg: Any, batches: Any) -> None:
        """A method's own data- or weight-aware init, run once by ``attach`` after every new adapter is in
        place and active (``batches``: the calibration batches or None; ``calibration=True`` requires them)."""

    def set_step(self, step: int) -> None:
        """The training step (the ``adapter_steps`` callback calls it at each step begin): for schedules."""

    def regularizer(self) -> torch.Tensor | None:
        """A scalar term the training loss adds (e.g. AdaLoRA's orthogonality penalty), or None: none. The loop
        adds the mean over the active adapters whose class overrides this hook, so plain methods cost nothing."""
        return None

    @staticmethod
    def peft_fields(cfg: Any) -> dict[str, Any]:
        """Method-specific fields of ``adapter_config.json``."""
        return {}

    @staticmethod
    def peft_rank_pattern(ranks: dict[str, int], cfg: Any) -> dict[str, Any]:
        """``adapter_config.json``'s ``rank_pattern`` for ``ranks`` ({module: its rank}, the modules whose rank
        differs from ``cfg.r``): LoRA's ``{module: rank}`` by default (AdaLoRA writes PEFT's boolean masks)."""
        return ranks

    @staticmethod
    def config_from_peft(fields: dict[str, Any]) -> Any | None:
        """This method's config if ``fields`` (an adapter_config.json) describes it, else None."""
        return None


Adapter = AdapterModule  # the protocol's name in signatures

HOOKS: tuple[str, ...] = (
    "from_base",
    "forward",
    "export_state",
    "delta_weight",
    "to_lora",
    "delta_bias",
    "fused_forward",
    "import_state",
    "base_shift",
    "init_factors",
    "export_shared",
    "import_shared",
    "from_bases",
    "initialize",
    "set_step",
    "regularizer",
    "peft_fields",
    "peft_rank_pattern",
    "config_from_peft",
    "peft_type",
    "shared_params",
)
"""Every hook of the contract, required first; the README's "Adding a method" table lists these."""
REQUIRED_HOOKS = ("from_base", "forward", "export_state")


@dataclass(frozen=True)
class MethodSpec:
    """What the registry knows about one method."""

    name: str
    adapter: type[AdapterModule]  # the adapter class
    config: type
    paper: str
    url: str
    identity_at_init: bool  # the paper's init leaves the model's outputs unchanged
    mergeable: bool  # delta_weight() is exact, so merge == unmerged forward
    family: str  # PAPERS.md family, e.g. "F1" (core LoRA & scaling)
    params: str  # trainable parameters per wrapped layer, in d_in, d_out and config fields
    layers: tuple[str, ...] = ALL_LAYERS  # layer kinds the method wraps (see lorakit/layers)
    needs_calibration: bool = False  # its initialisation reads data: attach(..., calibration=batches)

    def param_count(self, d_in: int, d_out: int, cfg: Any) -> int:
        """Evaluate :attr:`params` (a fixed arithmetic expression written by the method's author)."""
        names = {"d_in": d_in, "d_out": d_out, **{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}}
        return int(eval(self.params, {"__builtins__": {"len": len}}, names))  # noqa: S307 - author-written formula


REGISTRY: dict[str, MethodSpec] = {}


def register(
    name: str,
    *,
    config: type,
    paper: str,
    url: str,
    family: str,
    params: str,
    identity_at_init: bool = True,
    mergeable: bool = True,
    layers: tuple[str, ...] = ALL_LAYERS,
    calibration: bool = False,
) -> Callable[[type[AdapterModule]], type[AdapterModule]]:
    """Class decorator that adds an adapter class to :data:`REGISTRY` under ``name``.

    ``params`` is the paper's trainable-parameter count per wrapped layer as an arithmetic
    expression in ``d_in``, ``d_out`` and the config's fields, e.g. ``"r*(d_in+d_out)"``; the
    conformance suite checks it against the real count and the README shows it. ``layers``
    lists the layer kinds the method can wrap; targeting another kind is a clear TargetError.
    ``calibration=True`` marks an initialisation that reads data: ``attach`` then requires
    ``calibration=batches`` and hands them to the adapter class's ``initialize`` hook.
    """

    def wrap(cls: type[AdapterModule]) -> type[AdapterModule]:
        if not issubclass(cls, AdapterModule):
            raise TypeError(f"method {name!r}: {cls.__name__} must subclass lorakit.methods._api.AdapterModule")
        missing = sorted(getattr(cls, "__abstractmethods__", ()))  # ABCMeta's own record of undefined hooks
        if missing:
            raise TypeError(f"method {name!r}: {cls.__name__} must define the required hook(s) {', '.join(missing)}")
        if not (dataclasses.is_dataclass(config) and config.__dataclass_params__.frozen):  # type: ignore[attr-defined]
            raise TypeError(f"method {name!r}: its config {config.__name__} must be a frozen dataclass")
        cls.method_name = name
        spec = MethodSpec(
            name, cls, config, paper, url, identity_at_init, mergeable, family, params, tuple(layers), calibration
        )
        add_entry(REGISTRY, "method", name, spec, same=name in REGISTRY and REGISTRY[name].adapter is cls)
        return cls

    return wrap


def get_spec(name: str) -> MethodSpec:
    return get_entry(REGISTRY, "method", name)


def method_config(name: str, **opts: Any) -> Any:
    """Build the config of method ``name``; unknown options get an error listing the valid ones."""
    spec = get_spec(name)
    check_options((f.name for f in dataclasses.fields(spec.config)), opts, f"method {name!r}")
    return spec.config(**opts)


def spec_of_config(cfg: Any) -> MethodSpec:
    """The registered method whose config class is ``type(cfg)``."""
    for spec in REGISTRY.values():
        if type(cfg) is spec.config:
            return spec
    raise ConfigError(
        f"{type(cfg).__name__} is not the config of any registered method; use lk.method_config(name, ...)."
    )


def require(ok: bool, message: str) -> None:
    """Config validation helper: raise a ConfigError with ``message`` unless ``ok``."""
    if not ok:
        raise ConfigError(message)
