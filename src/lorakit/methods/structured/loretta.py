"""LoRETTA: Low-Rank Economic Tensor-Train Adaptation (ultra-low-parameter) — https://arxiv.org/abs/2402.11417
Update rule (LoRETTA_rep): h = W₀x + s·B·A·x, s = α/r, where A (r, in) and Bᵀ (r, out) are tensor trains.

A factor F (r, d) is the tensor with modes (r, n, …, n) — ``order`` modes of size n = ⌈d^(1/order)⌉ — held as
the TT cores G₁ (1, r, R), G₂…G_order (R, n, R), G_last (R, n, 1), R = tt_rank:
  F[i, j₁…j_order] = G₁[i] · G₂[j₁] ⋯ G_last[j_order]   (a product of one slice per core)
contracted to (r, n^order) and cropped to its first d columns. Parameters per factor: the TT formula
Σ_k R_{k−1}·n_k·R_k = R·r + (order−1)·R²·n + R·n. The reference code picks exact mode factorisations from a
per-width table; uniform padded modes (our simplest general rule) work for every width with one formula.
Cores are drawn as the reference does (N(0,1)/√R_k·σ^(1/K) over K cores, σ = √(1/(in+out)), so a
contracted factor has std σ), except B's last core, which starts at zero so that ΔW = 0 at init (LoRA's
zero B) and the model starts as the base. Only LoRETTA_rep is here: LoRETTA_adp (tensorised bottleneck
adapters with a non-linearity) is not a weight update.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lorakit import layers as L
from lorakit.lowrank import truncate
from lorakit.methods._api import AdapterModule, LoraFactors, register, require


@dataclass(frozen=True, kw_only=True)
class LorettaConfig:
    r: int = 8
    """Rank of the update B·A (the reference's r)."""
    alpha: float = 16.0
    """Scaling numerator: the update is multiplied by alpha/r."""
    tt_rank: int = 5
    """Inner TT rank R of every factor's tensor train (the reference's tensor_rank)."""
    order: int = 3
    """Modes each layer dimension d is split into, each of size ⌈d^(1/order)⌉ (d is padded up, then cropped)."""
    dropout: float = 0.05
    """Dropout probability on the adapter's input path during training."""

    def __post_init__(self) -> None:
        for name in ("r", "tt_rank", "order"):
            value = getattr(self, name)
            require(isinstance(value, int) and value > 0, f"{name} must be a positive integer, got {value!r}.")
        require(self.alpha > 0, f"alpha must be > 0, got {self.alpha!r}.")
        require(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout!r}.")

    @property
    def scale(self) -> float:
        return self.alpha / self.r


def mode_size(d: int, order: int) -> int:
    """The smallest n with n**order >= d."""
    n = max(1, round(d ** (1 / order)))
    while n**order < d:
        n += 1
    while n > 1 and (n - 1) ** order >= d:
        n -= 1
    return n


def contract(cores: nn.ParameterList | list[torch.Tensor]) -> torch.Tensor:
    """The full tensor of a train of cores (R_{k−1}, n_k, R_k), R₀ = R_end = 1, flattened to (Π n_k,)."""
    out = cores[0].reshape(-1, cores[0].shape[-1])  # (n₁, R₁)
    for core in cores[1:]:
        out = (out @ core.reshape(core.shape[0], -1)).reshape(-1, core.shape[-1])  # (n₁⋯n_k, R_k)
    return out.reshape(-1)


@register(
    "loretta",
    config=LorettaConfig,
    paper="LoRETTA: Low-Rank Economic Tensor-Train Adaptation (LoRETTA_rep)",
    url="https://arxiv.org/abs/2402.11417",
    family="F2",
    # n = ⌈d^(1/order)⌉ per side; the 1e-9 absorbs float error in roots of exact powers (64**(1/3) < 4)
    params="tt_rank*(2*r+((order-1)*tt_rank+1)*(-(-(d_in**(1/order)-1e-9)//1)-(-(d_out**(1/order)-1e-9)//1)))",
)
class Loretta(AdapterModule):
    """x ↦ W₀x + s·B·A·x with A = TT(A cores)[:, :in] (r, in) and Bᵀ = TT(B cores)[:, :out] (r, out)."""

    def __init__(self, cfg: LorettaConfig, d_in: int, d_out: int, kind: str, weight: torch.Tensor):
        super().__init__()
        self.config, self.d_in, self.d_out, self.scale = cfg, d_in, d_out, cfg.scale
        dtype = weight.dtype if weight.is_floating_point() else None
        factory: dict[str, Any] = {"dtype": dtype, "device": weight.device}
        sigma = math.sqrt(1 / (d_in + d_out))
        self.A_cores = nn.ParameterList(self.make_cores(mode_size(d_in, cfg.order), sigma, factory))
        self.B_cores = nn.ParameterList(self.make_cores(mode_size(d_out, cfg.order), sigma, factory))
        with torch.no_grad():
            self.B_cores[-1].zero_()  # ΔW = 0 at init
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 and kind != "embedding" else nn.Identity()

    def make_cores(self, n: int, sigma: float, factory: dict[str, Any]) -> list[nn.Parameter]:
        """Cores of a train over modes (r, n × order): ranks 1, R, …, R, 1; reference init (see module doc)."""
        cfg = self.config
        shapes = [(1, cfg.r, cfg.tt_rank)] + [(cfg.tt_rank, n, cfg.tt_rank)] * (cfg.order - 1) + [(cfg.tt_rank, n, 1)]
        std = sigma ** (1 / len(shapes))
        return [nn.Parameter(torch.randn(s, **factory) * (std / math.sqrt(s[2]))) for s in shapes]

    @classmethod
    def from_base(cls, base: nn.Module, cfg: LorettaConfig) -> Loretta:
        d_in, d_out = L.dims(base)
        weight: torch.Tensor = base.weight  # type: ignore[assignment]
        return cls(cfg, d_in, d_out, L.layer_kind(base), weight)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A (r, in) and Bᵀ (r, out): the contracted trains, cropped to the layer's widths."""
        A = contract(self.A_cores).reshape(self.config.r, -1)[:, : self.d_in]  # (r, in)
        Bt = contract(self.B_cores).reshape(self.config.r, -1)[:, : self.d_out]  # (r, out)
        return A, Bt

    def forward(self, x: torch.Tensor, base: nn.Module, y: torch.Tensor) -> torch.Tensor:
        A, Bt = self.factors()
        h = L.project_in(base, self.dropout(x), A)  # (..., r)
        return y + (h @ Bt * self.scale).to(y.dtype)  # (..., out)

    def delta_weight(self, base: nn.Module) -> torch.Tensor:
        A, Bt = self.factors()
        return L.to_base_layout(base, self.scale * (Bt.T @ A))  # (out, in) -> base layout

    def to_lora(self, base: nn.Module, rank: int | None = None) -> LoraFactors:
        """Exact (A, B = Bᵀᵀ, s); with ``rank`` or r > min(d_in, d_out), the best truncation to that rank."""
        with torch.no_grad():
            A, Bt = self.factors()
        return truncate(LoraFactors(A, Bt.T, self.scale), min(rank or self.config.r, self.d_in, self.d_out))

    def export_state(self) -> dict[str, torch.Tensor]:
        A = {f"loretta_A.{k}": core for k, core in enumerate(self.A_cores)}
        return A | {f"loretta_B.{k}": core for k, core in enumerate(self.B_cores)}

    @staticmethod
    def peft_fields(cfg: LorettaConfig) -> dict[str, Any]:
        return {"r": cfg.r, "lora_alpha": cfg.alpha, "tensor_rank": cfg.tt_rank, "order": cfg.order}
