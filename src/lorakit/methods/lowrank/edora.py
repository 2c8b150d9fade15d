"""EDoRA: Efficient Weight-Decomposed Low-Rank Adaptation via Singular Value Decomposition — https://arxiv.org/abs/2501.12067
Update rule: W' = m ⊙ (W₀ + s·B·R·A) / ‖W₀ + s·B·R·A‖_row; B·A = frozen rank-r SVD of W₀; R (r×r) and m train.

DoRA's magnitude/direction split with LoRA-XS's factors: B = U_r and A = Σ_r V_rᵀ come from W₀'s truncated
SVD (the authors' code puts the singular values on the input side, as lorakit's LoRA-XS does, with the
same sign convention so the factors are reproducible) and are recomputed from the base on attach and
load; m starts at ‖W₀‖_row, R at N(0, σ²) with the authors' σ = 1e-5 (R = 0 gives the base exactly).
The row norm is detached in the backward pass, as DoRA's §4.3 and the authors' code; the forward value
is exact, so merging is exact. Trainable parameters per layer: r² + d_out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lorakit import layers as L
from lorakit.errors import ConfigError
from lorakit.lowrank import factorize
from lorakit.methods._api import AdapterModule, LoraFactors, register, require
from lorakit.methods.lowrank.lora_xs import svd_factors


@dataclass(frozen=True, kw_only=True)
class EdoraConfig:
    r: int = 8
    """Rank of the frozen SVD factors; the trained R is r×r (the authors sweep r = 4..32)."""
    alpha: float = 16.0
    """Scaling numerator: the directional update B·R·A is multiplied by alpha/r (the authors use 16)."""
    init_std: float = 1e-5
    """R starts as N(0, init_std²) (the authors' σ); 0 makes the adapted model start exactly as the base."""
    dropout: float = 0.0
    """Dropout probability on the adapter's input path during training."""

    def __post_init__(self) -> None:
        require(isinstance(self.r, int) and self.r > 0, f"r must be a positive integer, got {self.r!r}.")
        require(self.alpha > 0, f"alpha must be > 0, got {self.alpha!r}.")
        require(self.init_std >= 0, f"init_std must be >= 0, got {self.init_std!r}.")
        require(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout!r}.")


@register(
    "edora",
    config=EdoraConfig,
    paper="EDoRA: Efficient Weight-Decomposed Low-Rank Adaptation via Singular Value Decomposition",
    url="https://arxiv.org/abs/2501.12067",
    family="F2",
    params="r*r+d_out",
    identity_at_init=False,  # R ~ N(0, 1e-10): within ~1e-5 of the base, not exactly it (init_std=0 is exact)
)
class Edora(AdapterModule):
    """x ↦ g ⊙ (W₀x + s·U·R·SV·x) + b, g = m / ‖W₀ + s·U·R·SV‖_row (detached); frozen U (out, r), SV (r, in)."""

    U: torch.Tensor
    SV: torch.Tensor

    def __init__(self, cfg: EdoraConfig, U: torch.Tensor, SV: torch.Tensor, m: torch.Tensor, kind: str):
        super().__init__()
        self.config, self.kind, self.scale = cfg, kind, cfg.alpha / cfg.r
        self.register_buffer("U", U, persistent=False)  # (out, r): B = U_r, recomputed from the base, never saved
        self.register_buffer("SV", SV, persistent=False)  # (r, in): A = Σ_r V_rᵀ
        self.R = nn.Parameter(torch.randn(cfg.r, cfg.r, dtype=U.dtype, device=U.device) * cfg.init_std)  # (r, r)
        self.m = nn.Parameter(m)  # (out,)
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 and kind != "embedding" else nn.Identity()

    @classmethod
    def from_base(cls, base: nn.Module, cfg: EdoraConfig) -> Edora:
        d_in, d_out = L.dims(base)
        if cfg.r > min(d_in, d_out):
            raise ConfigError(
                f"edora r={cfg.r} exceeds the rank a layer with d_in={d_in}, d_out={d_out} can have "
                f"({min(d_in, d_out)}); lower r or leave that layer out of targets."
            )
        W = L.weight_out_in(base).detach()  # (out, in)
        dtype = W.dtype if W.is_floating_point() else torch.float32
        U, SV = svd_factors(W, cfg.r)  # (out, r), (r, in)
        m = torch.linalg.vector_norm(W.float(), dim=1)  # (out,) = ‖W₀‖_row, so the layer starts at W₀·(1 + O(σ))
        return cls(cfg, U.to(dtype), SV.to(dtype), m.to(dtype), L.layer_kind(base))

    def update(self) -> torch.Tensor:
        """s·B·R·A, shape (out, in)."""
        return self.scale * (self.U @ self.R @ self.SV)

    def gain(self, base: nn.Module) -> torch.Tensor:
        """g = m / ‖W₀ + s·B·R·A‖_row, shape (out,), the norm detached."""
        W = L.weight_out_in(base).detach()  # (out, in)
        norm = torch.linalg.vector_norm(W + self.update().detach().to(W.dtype), dim=1)  # (out,)
        return self.m / norm.to(self.m.dtype)

    def forward(self, x: torch.Tensor, base: nn.Module, y: torch.Tensor) -> torch.Tensor:
        g = self.gain(base).to(y.dtype)  # (out,)
        xd = self.dropout(x)  # one mask for both paths, as the authors' (PEFT DoRA) forward
        if self.kind == "embedding":
            base_out = y  # an embedding has no bias
        elif xd is not x:
            base_out = L.base_linear(base, xd)  # training with dropout: W·dropout(x) is what g rescales
        else:
            bias = L.base_bias(base)
            base_out = y if bias is None else y - bias  # (..., out)
        h = L.project_in(base, xd, self.SV)  # (..., r)
        h = torch.nn.functional.linear(torch.nn.functional.linear(h, self.R), self.U)  # (..., out)
        return y + (g - 1) * base_out + g * (self.scale * h).to(y.dtype)

    def delta_weight(self, base: nn.Module) -> torch.Tensor:
        W = L.weight_out_in(base)  # (out, in)
        merged = (W + self.update().to(W.dtype)) * self.gain(base).to(W.dtype)[:, None]  # (out, in)
        return L.to_base_layout(base, merged - W)

    def to_lora(self, base: nn.Module, rank: int | None = None) -> LoraFactors:
        """Approximate: the best rank-(``rank`` or 2r) factorisation of the exact merged delta.

        (g−1)⊙W₀ + g⊙s·B·R·A is full rank in general, as DoRA's delta.
        """
        with torch.no_grad():
            delta = L.to_base_layout(base, self.delta_weight(base))  # back to (out, in)
            return factorize(delta, rank or 2 * self.config.r)

    def export_state(self) -> dict[str, torch.Tensor]:
        return {"edora_R": self.R, "edora_magnitude": self.m}

    @staticmethod
    def peft_fields(cfg: EdoraConfig) -> dict[str, Any]:
        return {"r": cfg.r, "lora_alpha": cfg.alpha}
