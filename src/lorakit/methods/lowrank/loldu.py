"""LoLDU: Low-Rank Adaptation via Lower-Diag-Upper Decomposition for PEFT — https://arxiv.org/abs/2410.13618
Update rule: W = P·L·D·U; h = W_res·x + σ·P·L_r·diag(z)·U_r·x with W_res = W − σ₀·P·L_r·D_r·U_r; only z, σ train.

W (out, in) is factored by LU with partial pivoting (torch.linalg.lu): W = P·L·U', L (out, k) unit lower
triangular, U' (k, in), k = min(out, in); D = diag(U') and U = D⁻¹·U' (unit upper), so W = P·L·D·U. The
"chosen rank-r part" is the first r pivot steps, P·L_r·D_r·U_r = P·[A₁₁; A₂₁]·A₁₁⁻¹·[A₁₁ A₁₂] for PᵀW =
[[A₁₁, A₁₂], [A₂₁, A₂₂]] with A₁₁ r×r (Gaussian elimination's skeleton). As the authors' code: z starts at
D_r, the trainable scalar σ at σ₀ = alpha/r (their ``from_linear`` default alpha = 1), P·L_r and U_r are
frozen, and the base keeps W_res = W − σ₀·P·L_r·D_r·U_r so the model's outputs are unchanged at init.
Saved adapters are plain LoRA relative to the original W, of rank 2r (ΔW − the shift; see io/adapter.py).
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
class LolduConfig:
    r: int = 8
    """Number of LU pivot steps kept: P·L_r (out, r), D_r (r,), U_r (r, in)."""
    alpha: float = 1.0
    """σ starts at alpha/r (the authors' default alpha = 1); σ then trains with the diagonal."""

    def __post_init__(self) -> None:
        require(isinstance(self.r, int) and self.r > 0, f"loldu: r must be a positive integer, got {self.r!r}.")
        require(self.alpha > 0, f"loldu: alpha must be > 0, got {self.alpha!r}.")

    @property
    def scale(self) -> float:
        return self.alpha / self.r


def ldu(W: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(P·L_r (out, r), D_r (r,), U_r (r, in)) of W = P·L·D·U, so P·L_r·diag(D_r)·U_r is W's rank-r LU part."""
    P, Lo, Up = torch.linalg.lu(W)  # P (out, out), Lo (out, k) unit lower, Up (k, in) upper
    D = torch.diagonal(Up)[:r]  # (r,) the first r pivots
    if bool((D == 0).any()):
        raise ValueError("a zero pivot")
    return P @ Lo[:, :r], D, Up[:r] / D[:, None]  # (out, r), (r,), (r, in) unit upper


@register(
    "loldu",
    config=LolduConfig,
    paper="LoLDU: Low-Rank Adaptation via Lower-Diag-Upper Decomposition for Parameter-Efficient Fine-Tuning",
    url="https://arxiv.org/abs/2410.13618",
    family="F3",
    params="r + 1",
    layers=("linear", "conv1d"),  # a shifted embedding would also shift a tied output head
)
class Loldu(AdapterModule):
    """x ↦ W_res·x + σ·PL·(z ⊙ U·x) with frozen PL (out, r), U (r, in) and trained z (r,), σ ()."""

    PL: torch.Tensor
    U: torch.Tensor
    z0: torch.Tensor

    def __init__(self, cfg: LolduConfig, PL: torch.Tensor, D: torch.Tensor, U: torch.Tensor, kind: str):
        super().__init__()
        self.config, self.kind = cfg, kind
        self.register_buffer("PL", PL, persistent=False)  # (out, r): rows of L permuted by P
        self.register_buffer("U", U, persistent=False)  # (r, in), unit upper triangular rows
        self.register_buffer("z0", D.clone(), persistent=False)  # (r,): D_r, for the base shift
        self.z = nn.Parameter(D.clone())  # (r,)
        self.sigma = nn.Parameter(torch.tensor(cfg.scale, dtype=D.dtype, device=D.device))  # ()

    @classmethod
    def from_base(cls, base: nn.Module, cfg: LolduConfig) -> Loldu:
        d_in, d_out = L.dims(base)
        require(
            cfg.r <= min(d_in, d_out),
            f"loldu: r={cfg.r} exceeds min(d_in, d_out) = {min(d_in, d_out)} of a {d_in}→{d_out} layer; "
            "lower r or leave that module out.",
        )
        weight: torch.Tensor = base.weight  # type: ignore[assignment]
        try:
            PL, D, U = ldu(L.weight_out_in(base).detach().double(), cfg.r)  # float64: exact pivots
        except ValueError:
            raise ConfigError(
                f"loldu: the first {cfg.r} LU pivots of a {d_in}→{d_out} weight include a zero (the weight is "
                "rank-deficient there); lower r or leave that module out."
            ) from None
        dtype = weight.dtype if weight.is_floating_point() else torch.float32
        return cls(cfg, PL.to(dtype), D.to(dtype), U.to(dtype), L.layer_kind(base))

    @classmethod
    def initialize(cls, model: nn.Module, adapters: dict[str, AdapterModule], cfg: LolduConfig, batches: Any) -> None:
        """W ← W − σ₀·P·L_r·D_r·U_r on every wrapped base layer, once all adapters are built."""
        for name, adapter in adapters.items():
            assert isinstance(adapter, Loldu)
            base: Any = model.get_submodule(name).base_layer
            L.subtract(base, adapter.base_shift())

    def base_shift(self) -> LoraFactors:
        """The amount subtracted from the base at init: σ₀·PL @ (D_r ⊙ U), (out, in), rank r."""
        return LoraFactors(self.z0[:, None] * self.U, self.PL, self.config.scale)

    def forward(self, x: torch.Tensor, base: nn.Module, y: torch.Tensor) -> torch.Tensor:
        h = L.project_in(base, x, self.U) * self.z  # (..., r)
        return y + (torch.nn.functional.linear(h, self.PL) * self.sigma).to(y.dtype)  # (..., out)

    def delta_weight(self, base: nn.Module) -> torch.Tensor:
        return L.to_base_layout(base, self.sigma * (self.PL @ (self.z[:, None] * self.U)))  # (out, in) -> base

    def to_lora(self, base: nn.Module, rank: int | None = None) -> LoraFactors:
        """Exact at rank r (A = diag(z)·U, B = σ·PL); with ``rank`` < r, the best rank-``rank`` truncation."""
        with torch.no_grad():
            f = LoraFactors(self.z[:, None] * self.U, self.sigma * self.PL, 1.0)  # A (r, in), B (out, r)
        return f if rank is None else truncate(f, rank)

    def export_state(self) -> dict[str, torch.Tensor]:
        return {"loldu_z": self.z, "loldu_sigma": self.sigma}

    def import_state(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            self.z.copy_(state["loldu_z"])
            self.sigma.copy_(state["loldu_sigma"].reshape(()))

    @staticmethod
    def peft_fields(cfg: LolduConfig) -> dict[str, Any]:
        return {"r": cfg.r, "lora_alpha": cfg.alpha}
