"""Singular Value Decomposition on Kronecker Adaptation for Large Language Model (SoKA) — https://arxiv.org/abs/2506.15251
Update rule: h = W_res·x + Σ_k (A_k ⊗ B_k)·x, W_res = W₀ − Σ_k A⁰_k ⊗ B⁰_k, with A⁰_k ⊗ B⁰_k W₀'s top Kronecker terms.

Kronecker-product SVD (Van Loan & Pitsianis): cut W (out, in) = (m·p, n·q) into an m×n grid of p×q blocks
and rearrange it into R(W) (m·n, p·q), row (i, j) = vec(block i, j); then W = Σ_k A_k ⊗ B_k exactly iff
R(W) = Σ_k vec(A_k)·vec(B_k)ᵀ, so the SVD R(W) = Σ σ_k u_k v_kᵀ gives the best Kronecker terms,
A_k = √σ_k·u_k (m, n) and B_k = √σ_k·v_k (p, q). As PiSSA does with the plain SVD, SoKA trains the top
terms and freezes the rest; lorakit keeps the base untouched and adds ΔW = Σ A_k⊗B_k − Σ A⁰_k⊗B⁰_k,
the initial terms A⁰, B⁰ being frozen copies (recomputed from the base on load, never saved), so the model
starts exactly as the base and ΔW is relative to the original weight. The rank is ``r``, or, with
``energy`` = τ, the smallest k whose terms hold ≥ τ of Σσ² (capped at r); the paper's elbow-point
criterion is left out. Choices the paper leaves open (simplest faithful ones): square p = q = ``block``
blocks and the even √σ split. Wraps Linear and GPT-2 Conv1D.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lorakit import layers as L
from lorakit.methods._api import AdapterModule, register, require


@dataclass(frozen=True, kw_only=True)
class SokaConfig:
    r: int = 8
    """Kronecker rank: the number of trained terms A_k ⊗ B_k (the cap when ``energy`` is set)."""
    block: int = 16
    """Size p = q of each B_k; A_k is (d_out/block, d_in/block), so block must divide both dimensions."""
    energy: float | None = None
    """Energy threshold τ in (0, 1]: each layer keeps the fewest terms with ≥ τ of the spectrum's energy Σσ²."""

    def __post_init__(self) -> None:
        require(isinstance(self.r, int) and self.r > 0, f"r must be a positive integer, got {self.r!r}.")
        require(
            isinstance(self.block, int) and self.block > 0, f"block must be a positive integer, got {self.block!r}."
        )
        require(self.energy is None or 0 < self.energy <= 1, f"energy must be in (0, 1] or None, got {self.energy!r}.")


def kpsvd(weight: torch.Tensor, p: int, q: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(A (K, m, n), B (K, p, q), σ (K,)) with W = Σ_k A_k ⊗ B_k, A_k = √σ_k·u_k, B_k = √σ_k·v_k (signs fixed)."""
    W = weight.detach().float()
    m, n = W.shape[0] // p, W.shape[1] // q
    R = W.reshape(m, p, n, q).permute(0, 2, 1, 3).reshape(m * n, p * q)  # row (i, j) = vec(block i, j)
    U, S, Vh = torch.linalg.svd(R, full_matrices=False)  # U (mn, K), S (K,), Vh (K, pq)
    sign = torch.sign(U.gather(0, U.abs().argmax(dim=0, keepdim=True)))  # (1, K)
    sign[sign == 0] = 1
    root = S.sqrt()  # (K,)
    A = (U * sign * root).T.reshape(-1, m, n)  # (K, m, n)
    B = (Vh * sign.T * root[:, None]).reshape(-1, p, q)  # (K, p, q)
    return A, B, S


def energy_rank(S: torch.Tensor, tau: float) -> int:
    """The smallest k with Σ_{i≤k} σ_i² ≥ τ·Σ σ_i²."""
    share = (S.double() ** 2).cumsum(0) / (S.double() ** 2).sum()  # (K,)
    return int((share < tau - 1e-12).sum()) + 1


@register(
    "soka",
    config=SokaConfig,
    paper="Singular Value Decomposition on Kronecker Adaptation for Large Language Model (SoKA)",
    url="https://arxiv.org/abs/2506.15251",
    family="F2",
    params="r*((d_out//block)*(d_in//block) + block*block)",  # with energy set, r is the cap
    layers=("linear", "conv1d"),
)
class Soka(AdapterModule):
    """x ↦ W₀x + Σ_k (A_k ⊗ B_k − A⁰_k ⊗ B⁰_k)·x, applied block-wise (never materialised)."""

    A0: torch.Tensor
    B0: torch.Tensor

    def __init__(self, cfg: SokaConfig, A0: torch.Tensor, B0: torch.Tensor):
        super().__init__()
        self.config = cfg
        self.register_buffer("A0", A0, persistent=False)  # (k, m, n), recomputed from the base, never saved
        self.register_buffer("B0", B0, persistent=False)  # (k, p, q)
        self.A = nn.Parameter(A0.clone())  # (k, m, n)
        self.B = nn.Parameter(B0.clone())  # (k, p, q)

    @classmethod
    def from_base(cls, base: nn.Module, cfg: SokaConfig) -> Soka:
        d_in, d_out = L.dims(base)
        require(
            d_in % cfg.block == 0 and d_out % cfg.block == 0,
            f"soka block={cfg.block} must divide the layer's d_in={d_in} and d_out={d_out}; "
            "choose a block that divides both, or leave this module out of targets.",
        )
        bound = min((d_in // cfg.block) * (d_out // cfg.block), cfg.block**2)
        require(
            cfg.r <= bound,
            f"soka r={cfg.r} exceeds the Kronecker rank {bound} a {d_out}×{d_in} layer has with block={cfg.block}; "
            "lower r or change block.",
        )
        weight = L.weight_out_in(base)  # (out, in); a quantized base's dequantized (float) weight
        A, B, S = kpsvd(weight, cfg.block, cfg.block)
        k = cfg.r if cfg.energy is None else min(cfg.r, energy_rank(S, cfg.energy))
        return cls(cfg, A[:k].to(weight.dtype), B[:k].to(weight.dtype))

    @staticmethod
    def kron_apply(A: torch.Tensor, B: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Σ_k (A_k ⊗ B_k)·x as Σ_k A_k·X·B_kᵀ with X = x viewed as (n, q); shape (..., m·p)."""
        X = x.reshape(*x.shape[:-1], A.shape[2], B.shape[2])  # (..., n, q)
        T = torch.einsum("...nq,kpq->...knp", X, B)  # (..., k, n, p)
        return torch.einsum("kmn,...knp->...mp", A, T).flatten(-2)  # (..., m·p)

    def forward(self, x: torch.Tensor, base: nn.Module, y: torch.Tensor) -> torch.Tensor:
        x = x.to(self.A.dtype)
        delta = self.kron_apply(self.A, self.B, x) - self.kron_apply(self.A0, self.B0, x)  # (..., out)
        return y + delta.to(y.dtype)

    def delta_out_in(self, base: nn.Module) -> torch.Tensor:
        """ΔW (out, in) = Σ_k A_k ⊗ B_k − Σ_k A⁰_k ⊗ B⁰_k."""
        k, m, n = self.A.shape
        p, q = self.B.shape[1:]
        kron = lambda A, B: torch.einsum("kij,kab->iajb", A, B).reshape(m * p, n * q)
        return kron(self.A, self.B) - kron(self.A0, self.B0)

    def export_state(self) -> dict[str, torch.Tensor]:
        return {"soka_A": self.A, "soka_B": self.B}

    @staticmethod
    def peft_fields(cfg: SokaConfig) -> dict[str, Any]:
        return {"r": cfg.r, "block": cfg.block, "energy": cfg.energy}
