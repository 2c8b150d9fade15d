"""LoRA-GA: Low-Rank Adaptation with Gradient Approximation — https://arxiv.org/abs/2407.05000
Update rule: G = U S Vᵀ (sampled full gradient); A₀ = c·V[:, :r]ᵀ, B₀ = c·U[:, r:2r]; base ← W − s·B₀·A₀.

Under SGD the first step moves s·B·A by −η·s²·(B₀B₀ᵀG + G A₀ᵀA₀) = −η·s²·c²·[G]₂ᵣ, the best rank-2r
approximation of the full fine-tuning step −η·G (the paper's Theorem 3.1). "stable" scaling takes
c = d_out^{1/4}/√γ (§3.3), "gd" c = 1/s, "unit" c = 1. Directions as the authors' code: "ArB2r"
(above), "A2rBr" (A from V[:, r:2r], B from U[:, :r]), "ArBr" (odd/even interleaved). The SVD is
exact (the reference code sketches it with svd_lowrank). ``peft_variant`` reproduces PEFT 0.21's
lora_ga: B also carries the singular values (U·S) and only B gets the stable factor. The base is
rewritten so outputs are unchanged at init; saved adapters are plain LoRA of rank 2r on the original W.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lorakit import layers as L
from lorakit.init._calib import as_batches, base_layer, full_gradients
from lorakit.init.pissa import subtract_shift
from lorakit.methods._api import LoraFactors, register, require
from lorakit.methods.lora import Lora, LoraConfig

DIRECTIONS = ("ArB2r", "A2rBr", "ArBr")
SCALES = ("stable", "gd", "unit")


@dataclass(frozen=True, kw_only=True)
class LoraGAConfig(LoraConfig):
    direction: str = "ArB2r"
    """Which singular vectors go to A and B: 'ArB2r' (A: V[:, :r], B: U[:, r:2r]), 'A2rBr' or 'ArBr'."""
    init_scale: str = "stable"
    """'stable' (A, B × d_out^{1/4}/√γ), 'gd' (A, B ÷ s: the first step equals SGD's on [G]₂ᵣ) or 'unit'."""
    stable_gamma: float = 16.0
    """γ of the stable scaling."""
    peft_variant: bool = False
    """PEFT 0.21's lora_ga: B = U·S (with singular values) and only B is scaled (for parity with PEFT)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        require(
            self.direction in DIRECTIONS, f"lora_ga: direction must be one of {DIRECTIONS}, got {self.direction!r}."
        )
        require(self.init_scale in SCALES, f"lora_ga: init_scale must be one of {SCALES}, got {self.init_scale!r}.")
        require(self.stable_gamma > 0, f"lora_ga: stable_gamma must be > 0, got {self.stable_gamma!r}.")
        require(
            self.init == "default", f"lora_ga sets A and B from the gradient; leave init unset (got {self.init!r})."
        )
        require(
            self.train_only is None and not self.lora_bias, "lora_ga does not combine with train_only or lora_bias."
        )


def pick(r: int, direction: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices of the singular vectors for A, for B) among the top 2r."""
    idx = torch.arange(2 * r)
    if direction == "ArB2r":
        return idx[:r], idx[r:]
    if direction == "A2rBr":
        return idx[r:], idx[:r]
    return idx[1::2], idx[0::2]  # ArBr: A odd, B even


@register(
    "lora_ga",
    config=LoraGAConfig,
    paper="LoRA-GA: Low-Rank Adaptation with Gradient Approximation",
    url="https://arxiv.org/abs/2407.05000",
    family="F3",
    params="r*(d_in+d_out)",
    layers=("linear", "conv1d"),
    calibration=True,
)
class LoraGA(Lora):
    """x ↦ W_res·x + s·B·A·x, W_res = W − s·B₀·A₀ with A₀, B₀ from the SVD of the calibration gradient."""

    peft_type = "LORA"
    shift_A: torch.Tensor
    shift_B: torch.Tensor

    @classmethod
    def from_base(cls, base: nn.Module, cfg: LoraConfig) -> LoraGA:
        in_features, out_features = L.dims(base)
        require(
            2 * cfg.r <= min(in_features, out_features),
            f"lora_ga takes 2r = {2 * cfg.r} singular vectors of the gradient, more than min(d_in, d_out) = "
            f"{min(in_features, out_features)} of a {in_features}→{out_features} layer; lower r or leave it out.",
        )
        adapter: Any = super().from_base(base, cfg)
        adapter.register_buffer("shift_A", torch.zeros(cfg.r, in_features, device=adapter.A.device), persistent=False)
        adapter.register_buffer("shift_B", torch.zeros(out_features, cfg.r, device=adapter.A.device), persistent=False)
        return adapter

    @classmethod
    def initialize(cls, model: nn.Module, adapters: dict[str, nn.Module], cfg: LoraGAConfig, batches: Any) -> None:
        """G per targeted module from the calibration batches, then A₀, B₀ and W ← W − s·B₀·A₀."""
        rank = max(getattr(a.config, "r", 1) for a in adapters.values())
        data = as_batches(batches, need_labels=True, min_rows=2 * rank, where="lora_ga")
        grads = full_gradients(model, list(adapters), data)
        for name, adapter in adapters.items():
            assert isinstance(adapter, LoraGA)
            adapter.set_from_gradient(grads[name])
            subtract_shift(base_layer(model, name), adapter.base_shift())

    @torch.no_grad()
    def set_from_gradient(self, grad: torch.Tensor) -> None:
        """A₀, B₀ from the SVD of G (out, in), as in the module docstring; the shift buffers keep them."""
        cfg: Any = self.config
        r = cfg.r
        U, S, Vh = torch.linalg.svd(grad.float(), full_matrices=False)  # U (out, k), S (k,), Vh (k, in)
        ia, ib = pick(r, cfg.direction)
        A, B = Vh[ia], U[:, ib]  # (r, in), (out, r)
        factor = {"stable": grad.shape[0] ** 0.25 / cfg.stable_gamma**0.5, "gd": 1 / self.scale, "unit": 1.0}[
            cfg.init_scale
        ]
        if cfg.peft_variant:
            B = B * S[ib] * (factor if cfg.init_scale == "stable" else 1.0)
            if cfg.init_scale == "gd":
                A, B = A * factor, B * factor
        else:
            A, B = A * factor, B * factor
        self.A.copy_(A)
        self.B.copy_(B)
        self.shift_A.copy_(self.A.float())  # what the adapter holds (its dtype), so W_res + s·B·A = W
        self.shift_B.copy_(self.B.float())

    def base_shift(self) -> LoraFactors:
        """The amount subtracted from the base weight at init: scale·shift_B @ shift_A, (out, in)."""
        return LoraFactors(self.shift_A, self.shift_B, self.scale)

    @staticmethod
    def peft_fields(cfg: LoraConfig) -> dict[str, Any]:
        assert isinstance(cfg, LoraGAConfig)
        scale = "gd_scale" if cfg.init_scale == "gd" else cfg.init_scale
        sub = {"direction": cfg.direction, "scale": scale, "stable_gamma": cfg.stable_gamma}
        return Lora.peft_fields(cfg) | {"init_lora_weights": "lora_ga", "lora_ga_config": sub}
