"""DoTA: Weight-Decomposed Tensor Adaptation for Large Language Models — https://arxiv.org/abs/2412.20891
Update rule: h = W_res·x + MPO(T₁,T₂,T₃)·x, W_res = W − MPO(T⁰), T⁰ = the bond-D MPO of W; the cores T train.

MPO (tensor-train matrix) of W (out, in): out and in are each split into three modes, o = (o₁,o₂,o₃),
i = (i₁,i₂,i₃), and W[o, i] = T₁[o₁,i₁]·T₂[o₂,i₂]·T₃[o₃,i₃], each T_k[o_k,i_k] a (d_{k−1} × d_k) matrix,
d₀ = d₃ = 1. The cores come from sequential SVDs of the reshaped W (TT-SVD), each truncated to the bond
dimension D; at full bond dimension (D ≥ n_o·n_i) they reconstruct W exactly. Modes are uniform: n = ⌈d^(1/3)⌉
per side, W zero-padded to (n_o³, n_i³) and the product cropped back, so any width works with one formula.

The paper rewrites the base as W_res = W − MPO(T⁰), which is not low rank, so ``base_shift()`` (a LoRA of the
shift) cannot express it. lorakit keeps the base and stores T⁰ instead: ΔW = MPO(T) − MPO(T⁰), so
W + ΔW = W_res + MPO(T) — the paper's layer, its outputs and gradients, at every step, with ΔW = 0 at init.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lorakit import layers as L
from lorakit.lowrank import factorize
from lorakit.methods._api import AdapterModule, LoraFactors, register, require

_P = "(-(-(d_in**(1/3)-1e-9)//1))*(-(-(d_out**(1/3)-1e-9)//1))"  # p = n_in·n_out: one core's mode pair
_D = f"(({_P}+bond_dim-(({_P}-bond_dim)**2)**0.5)/2)"  # d = min(bond_dim, p), the bond after truncation


@dataclass(frozen=True, kw_only=True)
class DotaConfig:
    bond_dim: int = 8
    """Bond dimension D of the MPO (its two inner ranks, capped at n_o·n_i); larger D keeps more of W."""

    def __post_init__(self) -> None:
        require(
            isinstance(self.bond_dim, int) and self.bond_dim > 0,
            f"dota: bond_dim must be a positive integer, got {self.bond_dim!r}.",
        )


def mode_size(d: int) -> int:
    """The smallest n with n³ ≥ d."""
    n = max(1, round(d ** (1 / 3)))
    while n**3 < d:
        n += 1
    while n > 1 and (n - 1) ** 3 >= d:
        n -= 1
    return n


def mpo_decompose(W: torch.Tensor, bond: int) -> list[torch.Tensor]:
    """TT-SVD of W (out, in) into cores (1, n_o, n_i, d), (d, n_o, n_i, d), (d, n_o, n_i, 1), d = min(bond, n_o·n_i)."""
    (d_out, d_in), n_o, n_i = W.shape, mode_size(W.shape[0]), mode_size(W.shape[1])
    p = n_o * n_i
    padded = W.new_zeros(n_o**3, n_i**3)
    padded[:d_out, :d_in] = W
    T = padded.reshape(n_o, n_o, n_o, n_i, n_i, n_i).permute(0, 3, 1, 4, 2, 5)  # (o₁, i₁, o₂, i₂, o₃, i₃)
    U, S, Vh = torch.linalg.svd(T.reshape(p, p * p), full_matrices=False)  # U (p, p), Vh (p, p²)
    d1 = min(bond, S.numel())
    core1 = U[:, :d1].reshape(1, n_o, n_i, d1)
    rest = (S[:d1, None] * Vh[:d1]).reshape(d1 * p, p)  # (d₁·o₂·i₂, o₃·i₃)
    U, S, Vh = torch.linalg.svd(rest, full_matrices=False)  # U (d₁p, p), Vh (p, p)
    d2 = min(bond, S.numel())
    return [core1, U[:, :d2].reshape(d1, n_o, n_i, d2), (S[:d2, None] * Vh[:d2]).reshape(d2, n_o, n_i, 1)]


def mpo_contract(cores: Any, d_out: int, d_in: int) -> torch.Tensor:
    """The (d_out, d_in) matrix of three MPO cores: Σ over bonds of T₁[o₁,i₁]·T₂[o₂,i₂]·T₃[o₃,i₃], cropped."""
    T1, T2, T3 = cores
    full = torch.einsum("xaby,ycdz,zefw->acebdf", T1, T2, T3)  # (o₁, o₂, o₃, i₁, i₂, i₃)
    n_o, n_i = T1.shape[1], T1.shape[2]
    return full.reshape(n_o**3, n_i**3)[:d_out, :d_in]  # (out, in)


@register(
    "dota",
    config=DotaConfig,
    paper="DoTA: Weight-Decomposed Tensor Adaptation for Large Language Models",
    url="https://arxiv.org/abs/2412.20891",
    family="F3",
    params=f"{_P}*{_D}*(2+{_D})",
)
class Dota(AdapterModule):
    """x ↦ W·x + (MPO(T) − MPO(T⁰))·x with trained cores T and their frozen initial values T⁰."""

    def __init__(self, cfg: DotaConfig, cores: list[torch.Tensor], d_in: int, d_out: int, kind: str):
        super().__init__()
        self.config, self.kind, self.d_in, self.d_out = cfg, kind, d_in, d_out
        self.cores = nn.ParameterList([nn.Parameter(c.clone()) for c in cores])  # T₁, T₂, T₃
        for k, c in enumerate(cores):
            self.register_buffer(f"init{k}", c.clone(), persistent=False)  # T⁰_k

    @classmethod
    def from_base(cls, base: nn.Module, cfg: DotaConfig) -> Dota:
        d_in, d_out = L.dims(base)
        weight: torch.Tensor = base.weight  # type: ignore[assignment]
        dtype = weight.dtype if weight.is_floating_point() else torch.float32
        cores = mpo_decompose(L.weight_out_in(base).detach().float(), cfg.bond_dim)
        return cls(cfg, [c.to(dtype) for c in cores], d_in, d_out, L.layer_kind(base))

    def initial(self) -> list[torch.Tensor]:
        return [getattr(self, f"init{k}") for k in range(3)]

    def delta(self) -> torch.Tensor:
        """ΔW = MPO(T) − MPO(T⁰), (out, in); exactly 0 while T = T⁰."""
        return mpo_contract(self.cores, self.d_out, self.d_in) - mpo_contract(self.initial(), self.d_out, self.d_in)

    def forward(self, x: torch.Tensor, base: nn.Module, y: torch.Tensor) -> torch.Tensor:
        return y + L.project_in(base, x, self.delta()).to(y.dtype)  # (..., out)

    def delta_weight(self, base: nn.Module) -> torch.Tensor:
        return L.to_base_layout(base, self.delta())  # (out, in) -> base layout

    def to_lora(self, base: nn.Module, rank: int | None = None) -> LoraFactors:
        """ΔW is full rank in general: by default exact at rank min(d_in, d_out); else its best rank-``rank`` part."""
        with torch.no_grad():
            return factorize(self.delta(), rank or min(self.d_in, self.d_out))

    def export_state(self) -> dict[str, torch.Tensor]:
        trained = {f"dota_core_{k}": c for k, c in enumerate(self.cores)}
        return trained | {f"dota_init_{k}": c for k, c in enumerate(self.initial())}

    @staticmethod
    def peft_fields(cfg: DotaConfig) -> dict[str, Any]:
        return {"bond_dim": cfg.bond_dim}
