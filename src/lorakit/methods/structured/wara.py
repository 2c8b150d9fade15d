"""WaRA: Wavelet Low Rank Adaptation — https://arxiv.org/abs/2506.24092
Update rule: h = W₀x + ΔW·x with ΔW = IDWT(s·B·A), the LoRA product B·A holding the 2-D wavelet coefficients of ΔW.

B (out, r) and A (r, in) are an ordinary LoRA pair (Kaiming-uniform A, zero B, s = alpha/r), but their
product is read as the coefficient matrix of an orthonormal 2-D Haar transform with ``level`` levels
(Mallat's pyramid: the low-low quadrant is split again at each level), and ΔW is its inverse transform.
Layout of one level, for an (m, n) block: [[LL, LH], [HL, HH]] with quadrants (m/2, n/2), first letter
the row (output) filter, second the column (input) filter; the inverse is x[2i] = (lo_i + hi_i)/√2,
x[2i+1] = (lo_i − hi_i)/√2 along each axis (pywt's Haar). Choices the paper leaves open (we take the
simplest faithful ones): the Haar wavelet and one level by default. One level is a fixed orthogonal
change of basis on both sides, so rank(ΔW) ≤ r; with L levels rank(ΔW) ≤ (2L − 1)·r. Both dimensions
must be divisible by 2^level. The forward builds the dense ΔW (as PEFT's WaveFT does) and applies it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lorakit import layers as L
from lorakit.methods._api import AdapterModule, register, require


@dataclass(frozen=True, kw_only=True)
class WaraConfig:
    r: int = 8
    """Rank of the coefficient matrix B·A."""
    alpha: float = 8.0
    """Scaling numerator: the coefficients are multiplied by alpha/r."""
    level: int = 1
    """Levels of the 2-D Haar transform; both layer dimensions must be divisible by 2^level."""
    dropout: float = 0.0
    """Dropout probability on the adapter's input path during training."""

    def __post_init__(self) -> None:
        require(isinstance(self.r, int) and self.r > 0, f"r must be a positive integer, got {self.r!r}.")
        require(self.alpha > 0, f"alpha must be > 0, got {self.alpha!r}.")
        require(isinstance(self.level, int) and self.level > 0, f"level must be an integer >= 1, got {self.level!r}.")
        require(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout!r}.")

    @property
    def scale(self) -> float:
        return self.alpha / self.r


def ihaar(c: torch.Tensor, dim: int) -> torch.Tensor:
    """One level of the orthonormal 1-D inverse Haar transform along ``dim`` of a 2-D tensor: (low half, high half)
    ↦ interleaved samples x[2i] = (lo_i + hi_i)/√2, x[2i+1] = (lo_i − hi_i)/√2."""
    lo, hi = c.chunk(2, dim)  # each half of dim
    return torch.stack((lo + hi, lo - hi), dim + 1).flatten(dim, dim + 1) / math.sqrt(2)


def idwt2(coeffs: torch.Tensor, level: int) -> torch.Tensor:
    """The L-level 2-D inverse Haar transform (Mallat's pyramid) of an (m, n) coefficient matrix."""
    out = coeffs
    for depth in reversed(range(level)):  # deepest (smallest top-left block) first
        h, w = coeffs.shape[0] >> depth, coeffs.shape[1] >> depth
        block = ihaar(ihaar(out[:h, :w], 0), 1)  # (h, w), one separable level
        top = torch.cat([block, out[:h, w:]], 1)  # (h, n)
        out = torch.cat([top, out[h:]], 0)  # (m, n)
    return out


@register(
    "wara",
    config=WaraConfig,
    paper="WaRA: Wavelet Low Rank Adaptation",
    url="https://arxiv.org/abs/2506.24092",
    family="F2",
    params="r*(d_in+d_out)",
)
class Wara(AdapterModule):
    """x ↦ W₀x + IDWT(s·B·A)·x with A (r, in), B (out, r)."""

    def __init__(self, cfg: WaraConfig, d_in: int, d_out: int, kind: str, weight: torch.Tensor):
        super().__init__()
        self.config, self.scale = cfg, cfg.scale
        factory: dict[str, Any] = {
            "dtype": weight.dtype if weight.is_floating_point() else None,
            "device": weight.device,
        }
        self.A = nn.Parameter(torch.empty(cfg.r, d_in, **factory))  # (r, in)
        self.B = nn.Parameter(torch.zeros(d_out, cfg.r, **factory))  # (out, r)
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 and kind != "embedding" else nn.Identity()

    @classmethod
    def from_base(cls, base: nn.Module, cfg: WaraConfig) -> Wara:
        d_in, d_out = L.dims(base)
        step = 2**cfg.level
        require(
            d_in % step == 0 and d_out % step == 0,
            f"wara level={cfg.level} halves each dimension {cfg.level} time(s), so d_in={d_in} and d_out={d_out} "
            f"must be divisible by 2^level={step}; lower level or leave this layer out of targets.",
        )
        weight: torch.Tensor = base.weight  # type: ignore[assignment]
        return cls(cfg, d_in, d_out, L.layer_kind(base), weight)

    def lora_rank(self) -> int:
        return (2 * self.config.level - 1) * self.config.r  # to_lora's SVD is exact at this rank

    def delta_out_in(self, base: nn.Module) -> torch.Tensor:
        """ΔW (out, in) = IDWT(s·B·A)."""
        return idwt2(self.scale * (self.B @ self.A), self.config.level)

    def forward(self, x: torch.Tensor, base: nn.Module, y: torch.Tensor) -> torch.Tensor:
        return y + L.project_in(base, self.dropout(x), self.delta_out_in(base)).to(y.dtype)  # (..., out)

    def export_state(self) -> dict[str, torch.Tensor]:
        return {"wara_A": self.A, "wara_B": self.B}

    @staticmethod
    def peft_fields(cfg: WaraConfig) -> dict[str, Any]:
        return {"r": cfg.r, "lora_alpha": cfg.alpha, "level": cfg.level}
