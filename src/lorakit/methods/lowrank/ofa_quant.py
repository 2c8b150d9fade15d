"""One QuantLLM for ALL: Fine-tuning Quantized LLMs Once for Efficient Deployments — https://arxiv.org/abs/2405.00632
Update rule: h = Q_b(W)·x + s·B_b·A_b·x for the active bit-width b ∈ ``bits``, s = α/r, one (A_b, B_b) per b.

A supernet: W stays full precision and runs quantized at the active b through the integer group quantizer's
math (``lorakit.layers.intgroup``, the ``int{b}g`` kinds'), so Q_b(W) is bit for bit ``quantize_linear``'s Ŵ. Each
b has its own (A_b, B_b): only the active pair is in the graph and trains, so low-bit configurations do not
interfere with high-bit ones. ``activate(model, b | {module: b})`` picks a configuration; in training the
always-on ``adapter_steps`` callback calls ``set_step``, which draws one global b per optimizer step from
(``seed``, step): uniform, or the fixed ``weights`` (the paper's resource-aware scheduler is not implemented).
``lorakit.extract.extract_subnet`` turns a configuration into an int{b}g model + plain LoRA, same logits.
Init as LoRA (zero B_b): the model starts as Q_b(W), not W. ``lk.merge`` adds ΔW = Q_b(W) − W + s·B_b·A_b;
``to_lora`` is its SVD (exact at full rank). A quantized base (NF4) is re-quantized from its dequantized
weight; Q_b(W) is recomputed at every forward (a reference, no cached codes).
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
    """Bit-widths of the supernet (each 2, 3, 4 or 8), one LoRA per bit-width; the highest is active at attach."""
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
        bits_ok = len(self.bits) == len({2, 3, 4, 8} & set(self.bits)) > 0
        require(bits_ok, f"bits must be distinct bit-widths from 2, 3, 4, 8, got {self.bits!r}.")
        g_ok = isinstance(self.group_size, int) and self.group_size > 0 and self.group_size % 4 == 0
        require(g_ok, f"group_size must be a positive multiple of 4 (whole code bytes), got {self.group_size!r}.")
        w = self.weights
        w_ok = w is None or (len(w) == len(self.bits) and min(w) >= 0 < sum(w))
        require(w_ok, f"weights must give one non-negative probability per bit-width {self.bits}, got {w!r}.")

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
    layers=("linear", "conv1d"),
)
class OfaQuant(AdapterModule):
    """x ↦ Q_b(W)·x + s·B_b·A_b·x with A_b (r, in), B_b (out, r) per bit-width b; b = ``self.active_bits``."""

    def __init__(self, cfg: OfaQuantConfig, in_features: int, out_features: int, weight: torch.Tensor):
        super().__init__()
        self.config, self.scale, self.active_bits = cfg, cfg.scale, max(cfg.bits)
        dtype = weight.dtype if weight.is_floating_point() else None  # a quantized base: the default dtype
        self.A, self.B = nn.ParameterDict(), nn.ParameterDict()  # {str(b): (r, in)}, {str(b): (out, r)}
        for b in cfg.bits:
            self.A[str(b)] = nn.Parameter(torch.empty(cfg.r, in_features, dtype=dtype, device=weight.device))
            self.B[str(b)] = nn.Parameter(torch.zeros(out_features, cfg.r, dtype=dtype, device=weight.device))
            nn.init.kaiming_uniform_(self.A[str(b)], a=math.sqrt(5))

    @classmethod
    def from_base(cls, base: nn.Module, cfg: OfaQuantConfig) -> OfaQuant:
        return cls(cfg, *L.dims(base), base.weight)  # type: ignore[arg-type]

    def quantized_weight(self, base: nn.Module, bits: int | None = None) -> torch.Tensor:
        """Q_b(W) (out, in) float32: the dequantized weight ``quantize_linear(bits=b, group_size=g)`` holds."""
        codes, s, z = group_quantize(L.weight_out_in(base), bits or self.active_bits, self.config.group_size)
        return group_dequantize(codes, s, z, L.dims(base)[0])

    def factors(self, bits: int | None = None) -> tuple[nn.Parameter, nn.Parameter]:
        """(A_b (r, in), B_b (out, r)) of bit-width ``bits`` (default: the active one)."""
        key = str(bits or self.active_bits)
        return self.A[key], self.B[key]

    def forward(self, x: torch.Tensor, base: nn.Module, y: torch.Tensor) -> torch.Tensor:
        # y (W·x) is replaced by Q_b(W)·x, in the ops and order of an int{b}g layer under a lora: extraction is exact
        bias = L.base_bias(base)
        yq = F.linear(x, self.quantized_weight(base).to(x.dtype), None if bias is None else bias.to(x.dtype))
        A, B = self.factors()
        h = F.linear(x.to(A.dtype), A)  # (..., r)
        if torch.is_grad_enabled() or yq.dtype != B.dtype:
            return yq + (F.linear(h, B) * self.scale).to(yq.dtype)  # (..., out)
        yq.view(-1, yq.shape[-1]).addmm_(h.view(-1, h.shape[-1]), B.T, alpha=self.scale)  # (N, out) += (N, r)(r, out)
        return yq

    def delta_out_in(self, base: nn.Module) -> torch.Tensor:
        """ΔW = Q_b(W) − W + s·B_b·A_b, (out, in): W + ΔW is the active configuration's weight."""
        A, B = self.factors()
        W = L.weight_out_in(base)  # (out, in)
        return (self.quantized_weight(base).to(W.dtype) - W) + self.scale * (B @ A)

    def set_step(self, step: int) -> None:
        """Sample the step's bit-width: one draw from (``seed``, ``step``), the same in every layer."""
        self.active_bits = sample_bits(self.config, step)

    def export_state(self) -> dict[str, torch.Tensor]:
        """Every bit-width's ``lora_A.b{bits}.weight`` (r, in), ``lora_B.b{bits}.weight`` (out, r); ``active_bits``."""
        state = {"active_bits": torch.tensor(self.active_bits)}  # a loaded supernet runs the saved configuration
        for b in self.config.bits:
            state |= {f"lora_A.b{b}.weight": self.A[str(b)], f"lora_B.b{b}.weight": self.B[str(b)]}
        return state

    def import_state(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for b in self.config.bits:
                self.A[str(b)].copy_(state[f"lora_A.b{b}.weight"])
                self.B[str(b)].copy_(state[f"lora_B.b{b}.weight"])
        self.active_bits = int(state["active_bits"])


def sample_bits(cfg: OfaQuantConfig, step: int) -> int:
    """The bit-width of training step ``step``: uniform over ``cfg.bits``, or by ``cfg.weights``."""
    return random.Random(cfg.seed * 1_000_003 + step).choices(cfg.bits, weights=cfg.weights)[0]


def ofa_layers(model: nn.Module) -> dict[str, OfaQuant]:
    """{module name: its active ofa_quant adapter} of ``model``."""
    found = {}
    for n, w in model.named_modules():
        if isinstance(w, AdaptedLayer) and (a := w.active) is not None and a in w.adapters:
            found[n] = w.adapters[a]
    return {n: a for n, a in found.items() if isinstance(a, OfaQuant)}


def activate(model: nn.Module, bits: int | Mapping[str, int]) -> dict[str, int]:
    """Run every ofa_quant layer at ``bits``, or each named module at its own (``{module name: bits}``; the
    others keep theirs). Returns the configuration now active, {module name: bits}."""
    layers = ofa_layers(model)
    if not layers:
        raise ConfigError("activate() found no active ofa_quant adapter; lk.attach(model, ofa_quant config) first.")
    chosen = {name: bits for name in layers} if isinstance(bits, int) else dict(bits)
    if unknown := sorted(set(chosen) - set(layers)):
        raise ConfigError(f"activate(): {unknown} are not ofa_quant layers; they are {sorted(layers)}.")
    for name, b in chosen.items():
        if b not in layers[name].config.bits:
            raise ConfigError(f"activate(): {name} has bit-widths {layers[name].config.bits}, not {b}.")
    for name, b in chosen.items():
        layers[name].active_bits = b
    return {name: a.active_bits for name, a in layers.items()}
