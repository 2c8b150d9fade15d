"""SALT: Singular Value Adaptation with Low-Rank Transformation — https://arxiv.org/abs/2503.16055
Update rule: W' = U_k·diag(ReLU(a ⊙ σ_k + b))·V_kᵀ + W_rest + s·P_U⊥·B·A·P_V⊥, with W₀ = U_k·diag(σ_k)·V_kᵀ + W_rest.

The k largest singular values of W₀ get a trained scale a (starts at 1) and shift b (starts at 0), kept
non-negative by a ReLU as in the authors' code; the rest of the spectrum gets a rank-r LoRA B·A confined
to the orthogonal complement of the top-k singular subspaces (P_U⊥ = I − U_k·U_kᵀ on the output side,
P_V⊥ = I − V_k·V_kᵀ on the input side), so the two parts never overlap. B starts at zero, so the merged
weight starts as W₀ exactly. U_k, σ_k, V_k are frozen buffers recomputed from the base on attach and load
(only a, b, A, B are saved); the top-k part is invariant to the SVD's sign choices. Trainable: 2k + r·(d_in + d_out).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lorakit import layers as L
from lorakit.errors import ConfigError
from lorakit.methods._api import AdapterModule, register, require


@dataclass(frozen=True, kw_only=True)
class SaltConfig:
    k: int = 8
    """How many of the largest singular values get a trained scale and shift."""
    r: int = 8
    """Rank of the LoRA on the rest of the spectrum (the authors' r_lora = 8)."""
    alpha: float | None = None
    """LoRA scaling numerator (update × alpha/r); None means scale 1, the authors' unscaled X·Y."""
    dropout: float = 0.0
    """Dropout probability on the LoRA path's input during training."""

    def __post_init__(self) -> None:
        require(isinstance(self.k, int) and self.k > 0, f"k must be a positive integer, got {self.k!r}.")
        require(isinstance(self.r, int) and self.r > 0, f"r must be a positive integer, got {self.r!r}.")
        require(self.alpha is None or self.alpha > 0, f"alpha must be > 0 or None, got {self.alpha!r}.")
        require(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout!r}.")

    @property
    def scale(self) -> float:
        return 1.0 if self.alpha is None else self.alpha / self.r


@register(
    "salt",
    config=SaltConfig,
    paper="SALT: Singular Value Adaptation with Low-Rank Transformation",
    url="https://arxiv.org/abs/2503.16055",
    family="F2",
    params="2*k + r*(d_in+d_out)",
)
class Salt(AdapterModule):
    """x ↦ W₀x + U·((ReLU(a⊙σ+b) − σ) ⊙ Vh·x) + s·P_U⊥·B·A·P_V⊥·x with frozen U (out, k), σ (k,), Vh (k, in)."""

    U: torch.Tensor
    S: torch.Tensor
    Vh: torch.Tensor

    def __init__(self, cfg: SaltConfig, U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, kind: str):
        super().__init__()
        self.config, self.scale = cfg, cfg.scale
        self.register_buffer("U", U, persistent=False)  # (out, k), recomputed from the base, never saved
        self.register_buffer("S", S, persistent=False)  # (k,)
        self.register_buffer("Vh", Vh, persistent=False)  # (k, in)
        factory: dict[str, Any] = {"dtype": U.dtype, "device": U.device}
        self.a = nn.Parameter(torch.ones(cfg.k, **factory))  # (k,) scale of the top singular values
        self.b = nn.Parameter(torch.zeros(cfg.k, **factory))  # (k,) shift
        self.A = nn.Parameter(torch.empty(cfg.r, Vh.shape[1], **factory))  # (r, in)
        self.B = nn.Parameter(torch.zeros(U.shape[0], cfg.r, **factory))  # (out, r)
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 and kind != "embedding" else nn.Identity()

    @classmethod
    def from_base(cls, base: nn.Module, cfg: SaltConfig) -> Salt:
        d_in, d_out = L.dims(base)
        if cfg.k > min(d_in, d_out):
            raise ConfigError(
                f"salt k={cfg.k} exceeds the number of singular values of a layer with d_in={d_in}, d_out={d_out} "
                f"({min(d_in, d_out)}); lower k or leave that layer out of targets."
            )
        W = L.weight_out_in(base).detach()  # (out, in)
        U, S, Vh = torch.linalg.svd(W.float(), full_matrices=False)  # U (out, n), S (n,), Vh (n, in)
        dtype = W.dtype if W.is_floating_point() else torch.float32
        k = cfg.k
        return cls(cfg, U[:, :k].to(dtype), S[:k].to(dtype), Vh[:k].to(dtype), L.layer_kind(base))

    def spectrum_shift(self) -> torch.Tensor:
        """ReLU(a ⊙ σ + b) − σ, shape (k,): the change of the top-k singular values (0 at init)."""
        return F.relu(self.a * self.S + self.b) - self.S

    def forward(self, x: torch.Tensor, base: nn.Module, y: torch.Tensor) -> torch.Tensor:
        U, Vh = self.U, self.Vh
        t = L.project_in(base, x, Vh)  # (..., k) top-k coordinates of x
        out = F.linear(t * self.spectrum_shift(), U)  # (..., out)
        xd = self.dropout(x)
        td = t if xd is x else L.project_in(base, xd, Vh)  # (..., k)
        h = L.project_in(base, xd, self.A) - F.linear(td, self.A @ Vh.T)  # (..., r) = A·P_V⊥·x
        o = F.linear(h, self.B)  # (..., out)
        o = o - F.linear(F.linear(o, U.T), U)  # (..., out) = P_U⊥·B·A·P_V⊥·x
        return y + (out + self.scale * o).to(y.dtype)

    def lora_rank(self) -> int:
        return self.config.k + self.config.r  # to_lora's SVD is exact at this rank

    def delta_out_in(self, base: nn.Module) -> torch.Tensor:
        """ΔW (out, in) = U·diag(ReLU(a⊙σ+b) − σ)·Vh + s·P_U⊥·B·A·P_V⊥."""
        U, Vh = self.U, self.Vh
        M = self.B @ (self.A - (self.A @ Vh.T) @ Vh)  # (out, in) = B·A·P_V⊥
        M = M - U @ (U.T @ M)  # (out, in)
        return (U * self.spectrum_shift()) @ Vh + self.scale * M

    def export_state(self) -> dict[str, torch.Tensor]:
        return {"salt_scale": self.a, "salt_shift": self.b, "lora_A.weight": self.A, "lora_B.weight": self.B}

    @staticmethod
    def peft_fields(cfg: SaltConfig) -> dict[str, Any]:
        return {"r": cfg.r, "lora_alpha": cfg.r if cfg.alpha is None else cfg.alpha}
