"""MoRA: High-Rank Updating for Parameter-Efficient Fine-Tuning — https://arxiv.org/abs/2405.12130
Update rule: h = W₀x + f_decomp(M·f_comp(x)), M square r̂×r̂ trained, r̂ = ⌊√(r·(d_in+d_out)) + ½⌋ (LoRA-r budget).

The compress and decompress operators have no parameters (the authors' code, peft-mora):
x is padded cyclically to k·r̂ entries (k = ⌈d_in/r̂⌉) and cut into k chunks of r̂; the output
period is tiled or cut to d_out.
- 'sharing' (Eq. 6, their type 1, for large r): f_comp sums the chunks; M's output is tiled.
- 'rope' (Eq. 9, their type 6, the default, for small r): chunk i is rotated as RoPE at position i,
  M maps every chunk; the concatenated outputs are cut or tiled to d_out. r̂ is rounded to the
  nearest even number (rotation pairs dimensions; it equals the code's r̂ wherever that one runs).
M starts at 0, so the model starts as the base; ΔW is materialised for merging by folding the
padded-space map back onto the inputs (its rank is up to min(d_in, d_out) for 'rope').
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lorakit import layers as L
from lorakit.lowrank import factorize
from lorakit.methods._api import AdapterModule, LoraFactors, register, require

VARIANTS = ("rope", "sharing")


@dataclass(frozen=True, kw_only=True)
class MoraConfig:
    r: int = 8
    """The LoRA rank whose parameter budget r·(d_in+d_out) sets the square size r̂ of M."""
    variant: str = "rope"
    """Compression operators: 'rope' (Eq. 9, the paper's choice for small r) or 'sharing' (Eq. 6, large r)."""
    dropout: float = 0.0
    """Dropout probability on the adapter's input path during training."""

    def __post_init__(self) -> None:
        require(isinstance(self.r, int) and self.r > 0, f"r must be a positive integer, got {self.r!r}.")
        require(self.variant in VARIANTS, f"variant must be one of {VARIANTS}, got {self.variant!r}.")
        require(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout!r}.")


def square_size(cfg: MoraConfig, d_in: int, d_out: int) -> int:
    """r̂: the side of M whose r̂² parameters match a rank-r LoRA's r·(d_in+d_out) (nearest even for 'rope')."""
    root = math.sqrt(cfg.r * (d_in + d_out))
    return int(root + 0.5) if cfg.variant == "sharing" else 2 * int(root / 2 + 0.5)


@register(
    "mora",
    config=MoraConfig,
    paper="MoRA: High-Rank Updating for Parameter-Efficient Fine-Tuning",
    url="https://arxiv.org/abs/2405.12130",
    family="F2",
    params="(((r*(d_in+d_out))**0.5+0.5)//1)**2 if variant == 'sharing' else (2*(((r*(d_in+d_out))**0.5/2+0.5)//1))**2",
    layers=("linear", "conv1d"),  # as the authors' code
)
class Mora(AdapterModule):
    """x ↦ W₀x + f_decomp(M·f_comp(x)) with M (r̂, r̂) and fixed index/rotation buffers."""

    pad_index: torch.Tensor
    out_index: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor

    def __init__(self, cfg: MoraConfig, d_in: int, d_out: int, weight: torch.Tensor):
        super().__init__()
        self.config, self.d_in, self.d_out = cfg, d_in, d_out
        n = self.n = square_size(cfg, d_in, d_out)
        k = self.k = -(-d_in // n)  # chunks
        period = n if cfg.variant == "sharing" else k * n  # length of the decompressor's output before tiling
        device, dtype = weight.device, weight.dtype if weight.is_floating_point() else None
        self.register_buffer("pad_index", torch.arange(k * n, device=device) % d_in, persistent=False)  # (k·r̂,)
        self.register_buffer("out_index", torch.arange(d_out, device=device) % period, persistent=False)  # (out,)
        inv_freq = 1.0 / (10000 ** (torch.arange(0, n, 2).float() / n))  # (r̂/2,) as RoPE
        angles = torch.outer(torch.arange(k).float(), inv_freq).repeat(1, 2)  # (k, r̂)
        self.register_buffer("cos", angles.cos().to(device, dtype), persistent=False)  # (k, r̂)
        self.register_buffer("sin", angles.sin().to(device, dtype), persistent=False)  # (k, r̂)
        self.M = nn.Parameter(torch.zeros(n, n, device=device, dtype=dtype))  # (r̂, r̂)
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()

    @classmethod
    def from_base(cls, base: nn.Module, cfg: MoraConfig) -> Mora:
        d_in, d_out = L.dims(base)
        weight: torch.Tensor = base.weight  # type: ignore[assignment]
        return cls(cfg, d_in, d_out, weight)

    @staticmethod
    def rotate_half(t: torch.Tensor) -> torch.Tensor:
        half = t.shape[-1] // 2
        return torch.cat([-t[..., half:], t[..., :half]], dim=-1)

    def mora_out(self, x: torch.Tensor) -> torch.Tensor:
        """f_decomp(M·f_comp(x)), shape (..., out)."""
        chunks = x[..., self.pad_index].unflatten(-1, (self.k, self.n))  # (..., k, r̂), cyclic padding
        if self.config.variant == "sharing":
            h = torch.nn.functional.linear(chunks.sum(dim=-2), self.M)  # (..., r̂)
        else:
            rotated = chunks * self.cos + self.rotate_half(chunks) * self.sin  # (..., k, r̂)
            h = torch.nn.functional.linear(rotated, self.M).flatten(-2)  # (..., k·r̂)
        return h[..., self.out_index]  # (..., out): tiled or cut

    def forward(self, x: torch.Tensor, base: nn.Module, y: torch.Tensor) -> torch.Tensor:
        return y + self.mora_out(self.dropout(x).to(self.M.dtype)).to(y.dtype)

    def delta_out_in(self, base: nn.Module) -> torch.Tensor:
        """ΔW (out, in): the map on padded positions (sharing: M tiled; rope: blockdiag(M·R_i)), folded onto inputs."""
        M = self.M
        if self.config.variant == "sharing":
            padded = M.repeat(1, self.k)  # (r̂, k·r̂)
        else:
            MJ = -self.rotate_half(M)  # (r̂, r̂): M·J for the rotate-half matrix J
            blocks = M[None] * self.cos[:, None, :] + MJ[None] * self.sin[:, None, :]  # (k, r̂, r̂): M·R_i
            padded = torch.block_diag(*blocks)  # (k·r̂, k·r̂)
        folded = padded.new_zeros(padded.shape[0], self.d_in).index_add(1, self.pad_index, padded)  # (period, in)
        return folded[self.out_index]  # (out, in)

    def to_lora(self, base: nn.Module, rank: int | None = None) -> LoraFactors:
        """The best rank-(``rank`` or r̂) factorisation of ΔW (exact for 'sharing', whose rank is ≤ r̂)."""
        with torch.no_grad():
            return factorize(self.delta_out_in(base), min(rank or self.n, self.d_in, self.d_out))

    def export_state(self) -> dict[str, torch.Tensor]:
        return {"mora_M": self.M}

    @staticmethod
    def peft_fields(cfg: MoraConfig) -> dict[str, Any]:
        return {"r": cfg.r, "use_mora": True, "mora_type": 1 if cfg.variant == "sharing" else 6}
