"""LoRA-XS: Low-Rank Adaptation with Extremely Small Number of Parameters — https://arxiv.org/abs/2405.17604
Update rule: h = W₀x + s·U_r·R·Σ_r·V_rᵀ·x, with U_r Σ_r V_rᵀ the frozen rank-r SVD of W₀ and only R (r×r) trained.

As the authors' code: the singular values sit on the input side (their lora_A = Σ_r V_rᵀ, lora_B = U_r),
s = alpha/r with alpha = r (s = 1), and R starts at N(0, σ²) with σ = 1e-5 — nearly, not exactly, the
base model (R = 0 gives the base exactly). The frozen factors are recomputed from the base weight on
attach and load (the paper stores only R); each singular pair's sign is fixed (the largest-magnitude
entry of u_i is positive) so one base gives the same factors everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lorakit import layers as L
from lorakit.errors import ConfigError
from lorakit.lowrank import truncate
from lorakit.methods._api import AdapterModule, LoraFactors, register, require


@dataclass(frozen=True, kw_only=True)
class LoraXSConfig:
    r: int = 8
    """Rank of the frozen SVD factors; the trained R is r×r (the paper sweeps r = 4..64)."""
    alpha: float | None = None
    """Scaling numerator: the update is multiplied by alpha/r; None means alpha = r (scale 1, the authors' setting)."""
    init_std: float = 1e-5
    """R starts as N(0, init_std²) (the authors' 1e-5); 0 makes the adapted model start exactly as the base."""
    dropout: float = 0.0
    """Dropout probability on the adapter's input path during training."""

    def __post_init__(self) -> None:
        require(isinstance(self.r, int) and self.r > 0, f"r must be a positive integer, got {self.r!r}.")
        require(self.alpha is None or self.alpha > 0, f"alpha must be > 0 or None, got {self.alpha!r}.")
        require(self.init_std >= 0, f"init_std must be >= 0, got {self.init_std!r}.")
        require(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout!r}.")

    @property
    def scale(self) -> float:
        return 1.0 if self.alpha is None else self.alpha / self.r


def svd_factors(weight: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(U_r, Σ_r V_rᵀ) of an (out, in) weight, signs fixed so that each u_i's largest-|·| entry is positive."""
    U, S, Vh = torch.linalg.svd(weight.detach().float(), full_matrices=False)  # U (out, k), S (k,), Vh (k, in)
    U, S, Vh = U[:, :r], S[:r], Vh[:r]
    peak = U.abs().argmax(dim=0)  # (r,)
    sign = torch.sign(U[peak, torch.arange(r, device=U.device)])  # (r,)
    sign[sign == 0] = 1
    return U * sign, (S * sign)[:, None] * Vh  # (out, r), (r, in)


@register(
    "lora_xs",
    config=LoraXSConfig,
    paper="LoRA-XS: Low-Rank Adaptation with Extremely Small Number of Parameters",
    url="https://arxiv.org/abs/2405.17604",
    family="F2",
    params="r*r",
    identity_at_init=False,  # R ~ N(0, 1e-10): within ~1e-5 of the base, not exactly it (init_std=0 is exact)
)
class LoraXS(AdapterModule):
    """x ↦ W₀x + s·U·R·SV·x with frozen buffers U (out, r), SV = Σ_r V_rᵀ (r, in) and trained R (r, r)."""

    U: torch.Tensor
    SV: torch.Tensor

    def __init__(self, cfg: LoraXSConfig, U: torch.Tensor, SV: torch.Tensor, kind: str):
        super().__init__()
        self.config, self.kind, self.scale = cfg, kind, cfg.scale
        self.register_buffer("U", U, persistent=False)  # (out, r), recomputed from the base, never saved
        self.register_buffer("SV", SV, persistent=False)  # (r, in)
        self.R = nn.Parameter(torch.randn(cfg.r, cfg.r, dtype=U.dtype, device=U.device) * cfg.init_std)  # (r, r)
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 and kind != "embedding" else nn.Identity()

    @classmethod
    def from_base(cls, base: nn.Module, cfg: LoraXSConfig) -> LoraXS:
        d_in, d_out = L.dims(base)
        if cfg.r > min(d_in, d_out):
            raise ConfigError(
                f"lora_xs r={cfg.r} exceeds the rank a layer with d_in={d_in}, d_out={d_out} can have "
                f"({min(d_in, d_out)}); lower r or leave that layer out of targets."
            )
        weight: torch.Tensor = base.weight  # type: ignore[assignment]
        U, SV = svd_factors(L.weight_out_in(base), cfg.r)
        dtype = weight.dtype if weight.is_floating_point() else torch.float32
        return cls(cfg, U.to(dtype), SV.to(dtype), L.layer_kind(base))

    def forward(self, x: torch.Tensor, base: nn.Module, y: torch.Tensor) -> torch.Tensor:
        h = L.project_in(base, self.dropout(x), self.SV)  # (..., r)
        h = torch.nn.functional.linear(h, self.R)  # (..., r)
        return y + (torch.nn.functional.linear(h, self.U) * self.scale).to(y.dtype)  # (..., out)

    def delta_weight(self, base: nn.Module) -> torch.Tensor:
        return L.to_base_layout(base, self.scale * (self.U @ self.R @ self.SV))  # (out, in) -> base layout

    def to_lora(self, base: nn.Module, rank: int | None = None) -> LoraFactors:
        """Exact at rank r (A = R·Σ_r V_rᵀ, B = U_r); with ``rank`` < r, the best rank-``rank`` truncation."""
        with torch.no_grad():
            f = LoraFactors(self.R @ self.SV, self.U.clone(), self.scale)  # A (r, in), B (out, r)
        return f if rank is None else truncate(f, rank)

    def export_state(self) -> dict[str, torch.Tensor]:
        return {"lora_xs_R": self.R}

    @staticmethod
    def peft_fields(cfg: LoraXSConfig) -> dict[str, Any]:
        return {"r": cfg.r, "lora_alpha": cfg.r if cfg.alpha is None else cfg.alpha}
