"""Spectral Adapter: Fine-Tuning in Spectral Space — https://arxiv.org/abs/2405.13952
Update rule: W = [U_r + B, U_⊥]·Σ·[V_r + Aᵀ, V_⊥]ᵀ (additive) or W = [U_r·R_U, U_⊥]·Σ·[V_r·R_V, V_⊥]ᵀ (rotation).

Both variants tune only the top-r singular vectors of the base weight W = UΣVᵀ, so the update is
ΔW = B·Σ_r·(V_rᵀ + A) + U_r·Σ_r·A (additive, A (r, in) and B (out, r) start at zero, as the authors'
code) or ΔW = U_r·(R_U·Σ_r·R_Vᵀ − Σ_r)·V_rᵀ (rotation). Rotations use the Cayley map of the authors'
code: R = (I + K)⁻¹(I − K) with K = (P − Pᵀ)/2 the skew part of a trained r×r matrix P (zero at init,
so R = I); R is orthogonal for any P, so U_r·R_U stays orthonormal during training. The authors' diffusion
code also rescales Σ_r next to the rotations; this file rotates only. There is no scaling factor. The frozen
U_r, Σ_r, V_r are recomputed from the base weight on attach and load (sign-fixed, never saved).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lorakit import layers as L
from lorakit.lowrank import truncate
from lorakit.methods._api import AdapterModule, LoraFactors, register, require
from lorakit.methods.lowrank.nora import top_svd

MODES = ("additive", "rotation")


@dataclass(frozen=True, kw_only=True)
class SpectralConfig:
    r: int = 8
    """Number of top singular vectors tuned (at most min(d_in, d_out))."""
    mode: str = "additive"
    """'additive' (Spectral Adapter^A: U_r + B, V_r + Aᵀ) or 'rotation' (Spectral Adapter^R: U_r·R_U, V_r·R_V)."""

    def __post_init__(self) -> None:
        require(isinstance(self.r, int) and self.r > 0, f"r must be a positive integer, got {self.r!r}.")
        require(self.mode in MODES, f"mode must be one of {MODES}, got {self.mode!r}.")


def cayley(P: torch.Tensor) -> torch.Tensor:
    """The orthogonal R = (I + K)⁻¹(I − K), K = (P − Pᵀ)/2, of an (r, r) matrix P (solved in float32)."""
    K = (P - P.T).float() / 2  # (r, r), skew-symmetric
    eye = torch.eye(P.shape[0], device=P.device)
    return torch.linalg.solve(eye + K, eye - K).to(P.dtype)  # (r, r)


@register(
    "spectral",
    config=SpectralConfig,
    paper="Spectral Adapter: Fine-Tuning in Spectral Space",
    url="https://arxiv.org/abs/2405.13952",
    family="F2",
    params="r*(d_in+d_out) if mode == 'additive' else 2*r*r",
)
class Spectral(AdapterModule):
    """x ↦ W₀x + ΔW·x with ΔW from the tuned top-r singular vectors (frozen buffers U, S, Vh)."""

    U: torch.Tensor
    S: torch.Tensor
    Vh: torch.Tensor

    def __init__(self, cfg: SpectralConfig, U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor):
        super().__init__()
        self.config, r = cfg, cfg.r
        self.register_buffer("U", U, persistent=False)  # (out, r), recomputed from the base, never saved
        self.register_buffer("S", S, persistent=False)  # (r,)
        self.register_buffer("Vh", Vh, persistent=False)  # (r, in)
        factory: dict[str, Any] = {"dtype": U.dtype, "device": U.device}
        if cfg.mode == "additive":
            self.A = nn.Parameter(torch.zeros(r, Vh.shape[1], **factory))  # (r, in): added to V_rᵀ
            self.B = nn.Parameter(torch.zeros(U.shape[0], r, **factory))  # (out, r): added to U_r
        else:
            self.P_U = nn.Parameter(torch.zeros(r, r, **factory))  # (r, r): R_U = cayley(P_U)
            self.P_V = nn.Parameter(torch.zeros(r, r, **factory))  # (r, r): R_V = cayley(P_V)

    @classmethod
    def from_base(cls, base: nn.Module, cfg: SpectralConfig) -> Spectral:
        d_in, d_out = L.dims(base)
        require(
            cfg.r <= min(d_in, d_out),
            f"spectral r={cfg.r} exceeds the rank a layer with d_in={d_in}, d_out={d_out} can have "
            f"({min(d_in, d_out)}); lower r or leave that layer out of targets.",
        )
        weight: torch.Tensor = base.weight  # type: ignore[assignment]
        dtype = weight.dtype if weight.is_floating_point() else torch.float32
        U, S, Vh = top_svd(L.weight_out_in(base), cfg.r)
        return cls(cfg, U.to(dtype), S.to(dtype), Vh.to(dtype))

    def rotations(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(R_U, R_V), both (r, r) orthogonal (rotation mode)."""
        return cayley(self.P_U), cayley(self.P_V)

    def factors(self) -> LoraFactors:
        """ΔW as an exact B·A pair: rank 2r (additive) or r (rotation), scale 1."""
        S = self.S[:, None]  # (r, 1)
        if self.config.mode == "additive":  # ΔW = [B, U]·[Σ(Vᵀ + A); ΣA]
            return LoraFactors(torch.cat([S * (self.Vh + self.A), S * self.A]), torch.cat([self.B, self.U], 1), 1.0)
        R_U, R_V = self.rotations()
        core = (R_U * self.S) @ R_V.T - torch.diag(self.S)  # (r, r): R_U·Σ·R_Vᵀ − Σ
        return LoraFactors(core @ self.Vh, self.U, 1.0)  # (r, in), (out, r)

    def forward(self, x: torch.Tensor, base: nn.Module, y: torch.Tensor) -> torch.Tensor:
        f = self.factors()
        h = L.project_in(base, x, f.A)  # (..., 2r) or (..., r)
        return y + torch.nn.functional.linear(h, f.B).to(y.dtype)  # (..., out)

    def delta_weight(self, base: nn.Module) -> torch.Tensor:
        f = self.factors()
        return L.to_base_layout(base, f.B @ f.A)  # (out, in) -> base layout

    def to_lora(self, base: nn.Module, rank: int | None = None) -> LoraFactors:
        """Exact at rank 2r (additive) or r (rotation), capped by the layer's size; with ``rank``, the best
        rank-``rank`` truncation."""
        with torch.no_grad():
            f = self.factors()
        full = min(self.U.shape[0], self.Vh.shape[1])  # 2r may exceed the layer's rank
        return truncate(f, min(rank or f.A.shape[0], full))

    def export_state(self) -> dict[str, torch.Tensor]:
        if self.config.mode == "additive":
            return {"spectral_A": self.A, "spectral_B": self.B}
        return {"spectral_P_U": self.P_U, "spectral_P_V": self.P_V}

    @staticmethod
    def peft_fields(cfg: SpectralConfig) -> dict[str, Any]:
        return {"r": cfg.r, "mode": cfg.mode}
