"""One QuantLLM for ALL: Fine-tuning Quantized LLMs Once for Efficient Deployments — https://arxiv.org/abs/2405.00632
Update rule: h = Q_b(W)·x + s·B_b·A_b·x for the active bit-width b ∈ ``bits``, s = α/r, one (A_b, B_b) per b.

A supernet: the layer keeps the full-precision W and runs it quantized at any of several bit-widths through the
pure-torch integer group quantizer (``lorakit.layers.intgroup.group_quantize``, the math of the ``int{b}g``
kinds: asymmetric min-max per group of ``group_size`` inputs), so Q_b(W) is bit for bit the dequantized weight
of ``quantize_linear(W, bits=b, group_size=g)``. Each bit-width has its own decoupled LoRA (A_b, B_b), so the
low-bit configurations do not interfere with the high-bit ones: only the active b's pair is in the graph and
gets gradients. ``activate(model, b)`` or ``activate(model, {module: b})`` picks the configuration
explicitly; in training the always-on ``adapter_steps`` callback calls ``set_step``, which samples one global
b per optimizer step, uniformly (default) or with the fixed ``weights``, seeded by (``seed``, step), so it is
the same in every layer and reproducible after a resume. (The paper's resource-aware non-parametric scheduler
is not implemented.) ``lorakit.extract.subnet.extract_subnet`` turns one configuration into a real quantized
model plus a plain LoRA with identical outputs. Init as LoRA (Kaiming-uniform A_b, zero B_b): at init the
model is the quantized base Q_b(W), not W, so it is not an identity and cannot merge into W.

The base is read through its kind (``L.weight_out_in``), so a quantized base (e.g. NF4) is re-quantized from
its dequantized weight. Reference speed: Q_b(W) is recomputed at every forward (no cached codes).
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lorakit import layers as L
from lorakit.errors import ConfigError
from lorakit.layers._wrapper import AdaptedLayer
from lorakit.layers.intgroup import group_dequantize, group_quantize
from lorakit.methods._api import AdapterModule, register, require


@dataclass(frozen=True, kw_only=True)
class OfaQuantConfig:
    r: int = 8
    """Rank of every bit-width's update B_b·A_b."""
    alpha: float = 8.0
    """Scaling numerator: the update is multiplied by alpha/r."""
    bits: tuple[int, ...] = (2, 3, 4)
    """Bit-widths of the supernet (each 2, 3, 4 or 8), one LoRA per bit-width; the first is active at attach."""
    group_size: int = 32
    """Inputs per quantization group (32: the ``int2g``/``int3g``/``int4g`` kinds)."""
    weights: tuple[float, ...] | None = None
    """Sampling probability of each bit-width per training step (normalised); None: uniform."""
    seed: int = 0
    """Seed of the per-step bit-width sampler."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "bits", tuple(self.bits))  # a saved config comes back as a JSON list
        if self.weights is not None:
            object.__setattr__(self, "weights", tuple(float(w) for w in self.weights))
        require(isinstance(self.r, int) and self.r > 0, f"r must be a positive integer, got {self.r!r}.")
        require(self.alpha > 0, f"alpha must be > 0, got {self.alpha!r}.")
        require(
            len(self.bits) > 0 and len(set(self.bits)) == len(self.bits) and all(b in (2, 3, 4, 8) for b in self.bits),
            f"bits must be distinct bit-widths from 2, 3, 4, 8, got {self.bits!r}.",
        )
        require(
            isinstance(self.group_size, int) and self.group_size > 0 and self.group_size % 4 == 0,
            f"group_size must be a positive multiple of 4 (whole bytes of 2-bit codes), got {self.group_size!r}.",
        )
        require(
            self.weights is None
            or (len(self.weights) == len(self.bits) and min(self.weights) >= 0 < sum(self.weights)),
            f"weights must give one non-negative probability per bit-width {self.bits}, got {self.weights!r}.",
        )

    @property
    def scale(self) -> float:
        return self.alpha / self.r


@register(
    "ofa_quant",
    config=OfaQuantConfig,
    paper="One QuantLLM for ALL: Fine-tuning Quantized LLMs Once for Efficient Deployments (OFA supernet)",
    url="https://arxiv.org/abs/2405.00632",
    family="F8",
    params="len(bits)*r*(d_in+d_out)",
    identity_at_init=False,  # the base runs quantized at the active bit-width
    mergeable=False,  # W is full precision; a configuration is extracted (extract_subnet), not merged
    layers=("linear",),
)
class OfaQuant(AdapterModule):
    """x ↦ Q_b(W)·x + s·B_b·A_b·x with A_b (r, in), B_b (out, r) per bit-width b; b = ``self.active_bits``."""

    def __init__(self, cfg: OfaQuantConfig, in_features: int, out_features: int, weight: torch.Tensor):
        super().__init__()
        self.config, self.scale, self.active_bits = cfg, cfg.scale, cfg.bits[0]
        dtype = weight.dtype if weight.is_floating_point() else None  # a quantized base: the default dtype
        self.A = nn.ParameterDict()  # {str(b): (r, in)}
        self.B = nn.ParameterDict()  # {str(b): (out, r)}
        for b in cfg.bits:
            self.A[str(b)] = nn.Parameter(torch.empty(cfg.r, in_features, dtype=dtype, device=weight.device))
            self.B[str(b)] = nn.Parameter(torch.zeros(out_features, cfg.r, dtype=dtype, device=weight.device))
            nn.init.kaiming_uniform_(self.A[str(b)], a=math.sqrt(5))

    @classmethod
    def from_base(cls, base: nn.Module, cfg: OfaQuantConfig) -> OfaQuant:
        in_features, out_features = L.dims(base)
        return cls(cfg, in_features, out_features, base.weight)  # type: ignore[arg-type]

    def quantized_weight(self, base: nn.Module, bits: int | None = None) -> torch.Tensor:
        """Q_b(W) (out, in) float32: the dequantized weight ``quantize_linear(bits=b, group_size=g)`` holds."""
        codes, s, z = group_quantize(L.weight_out_in(base), bits or self.active_bits, self.config.group_size)
        return group_dequantize(codes, s, z, L.dims(base)[0])

    def factors(self, bits: int | None = None) -> tuple[nn.Parameter, nn.Parameter]:
        """(A_b (r, in), B_b (out, r)) of bit-width ``bits`` (default: the active one)."""
        key = str(bits or self.active_bits)
        return self.A[key], self.B[key]

    def forward(self, x: torch.Tensor, base: nn.Module, y: torch.Tensor) -> torch.Tensor:
        # y (the full-precision output) is replaced: the base runs quantized. The order of operations is the one
        # of an int{b}g layer under a LoRA adapter (lorakit.methods.lowrank.lora), so an extracted subnet's
        # logits equal these bit for bit.
        bias = L.base_bias(base)
        yq = F.linear(x, self.quantized_weight(base).to(x.dtype), None if bias is None else bias.to(x.dtype))
        A, B = self.factors()
        h = F.linear(x.to(A.dtype), A)  # (..., r)
        if torch.is_grad_enabled() or yq.dtype != B.dtype:
            return yq + (F.linear(h, B) * self.scale).to(yq.dtype)  # (..., out)
        yq.view(-1, yq.shape[-1]).addmm_(h.view(-1, h.shape[-1]), B.T, alpha=self.scale)  # (N, out) += (N, r)(r, out)
        return yq

    def set_step(self, step: int) -> None:
        """Sample the step's bit-width: one draw from (``seed``, ``step``), the same in every layer."""
        self.active_bits = sample_bits(self.config, step)

    def export_state(self) -> dict[str, torch.Tensor]:
        """Every bit-width's pair: ``lora_A.b{bits}.weight`` (r, in), ``lora_B.b{bits}.weight`` (out, r)."""
        state: dict[str, torch.Tensor] = {}
        for b in self.config.bits:
            state |= {f"lora_A.b{b}.weight": self.A[str(b)], f"lora_B.b{b}.weight": self.B[str(b)]}
        return state


def sample_bits(cfg: OfaQuantConfig, step: int) -> int:
    """The bit-width of training step ``step``: uniform over ``cfg.bits``, or by ``cfg.weights``."""
    rng = random.Random(cfg.seed * 1_000_003 + step)
    return rng.choices(cfg.bits, weights=cfg.weights)[0]


def ofa_layers(model: nn.Module) -> dict[str, OfaQuant]:
    """{module name: its active ofa_quant adapter} of ``model``."""
    return {
        name: w.adapters[w.active]  # type: ignore[misc]
        for name, w in model.named_modules()
        if isinstance(w, AdaptedLayer) and w.active in w.adapters and isinstance(w.adapters[w.active], OfaQuant)
    }


def activate(model: nn.Module, bits: int | Mapping[str, int]) -> dict[str, int]:
    """Run every ofa_quant layer at ``bits``, or each named module at its own (``{module name: bits}``; the
    others keep theirs). Returns the configuration now active, {module name: bits}."""
    layers = ofa_layers(model)
    if not layers:
        raise ConfigError("activate() found no active ofa_quant adapter; lk.attach(model, ofa_quant config) first.")
    chosen = {name: bits for name in layers} if isinstance(bits, int) else dict(bits)
    unknown = sorted(set(chosen) - set(layers))
    if unknown:
        raise ConfigError(f"activate(): {unknown} are not ofa_quant layers; they are {sorted(layers)}.")
    for name, b in chosen.items():
        if b not in layers[name].config.bits:
            raise ConfigError(f"activate(): {name} has bit-widths {layers[name].config.bits}, not {b}.")
    for name, b in chosen.items():
        layers[name].active_bits = b
    return {name: a.active_bits for name, a in layers.items()}
