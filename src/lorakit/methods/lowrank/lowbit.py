"""Revisiting the Parameter Efficiency of Adapters from the Perspective of Precision Redundancy — https://arxiv.org/abs/2307.16867
Update rule: h = W₀x + s·Q(B)·Q(A)·x, Q a b-bit quantizer (b ∈ {1, 2, 4}), one scale per rank component.

A (r, in) and B (out, r) are latent full-precision weights; the forward uses Q(A), Q(B) and the gradient
passes straight through Q (STE: ∂L/∂A = ∂L/∂Q(A)). Q puts each row of A and each column of B (one rank
component each) on a symmetric uniform grid of 2^b odd levels t·{±1, ±3, …, ±(2^b−1)} with its own scale
t ≥ 0 that minimises ‖w − t·c‖₂: at b = 1 that is sign(w)·mean|w| (the L2-optimal scale, in one step); at
b = 2, 4 Lloyd rounds alternate c = the nearest level to w/t and t = ⟨w, c⟩/⟨c, c⟩ (each round lowers the
error) from the best of 48 clipping scales t ∈ [0.1, 1]·max|w|/(2^b−1), with t capped at max|w|/(2^b−2) so
the top level stays in use (a uniform grid, not a normal one; within 1.2% of a 4000-scale brute force,
measured). A zero row has t = 0: B = 0 quantizes to an exact zero, so the model starts as the base.
Saved: the codes, b bits per weight packed into bytes (b·n/8), plus one float32 scale per component. t keeps
24−b significant bits, so t·c is exact in float32 and quantizes to itself: loading gives the same forward bit
for bit. ``to_lora`` returns (Q(A), Q(B), s), which serving and export take as a plain LoRA.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lorakit import layers as L
from lorakit.lowrank import truncate
from lorakit.methods._api import AdapterModule, LoraFactors, register, require

GRID = 48  # clipping scales tried for b > 1 before the Lloyd rounds
ROUNDS = 4  # Lloyd rounds for b > 1 (b = 1 is optimal after one)


@dataclass(frozen=True, kw_only=True)
class LowbitConfig:
    r: int = 8
    """Rank of the update Q(B)·Q(A)."""
    alpha: float = 8.0
    """Scaling numerator: the update is multiplied by alpha/r."""
    bits: int = 1
    """Bits per adapter weight: 1 (sign and a scale), 2 or 4."""
    dropout: float = 0.0
    """Dropout probability on the adapter's input path during training."""

    def __post_init__(self) -> None:
        require(isinstance(self.r, int) and self.r > 0, f"r must be a positive integer, got {self.r!r}.")
        require(self.alpha > 0, f"alpha must be > 0, got {self.alpha!r}.")
        require(self.bits in (1, 2, 4), f"bits must be 1, 2 or 4, got {self.bits!r}.")
        require(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout!r}.")

    @property
    def scale(self) -> float:
        return self.alpha / self.r


def _levels(w: torch.Tensor, t: torch.Tensor, top: int) -> torch.Tensor:
    """The nearest odd level in [−top, top] to w/t, t broadcast over w's last dim (t = 0: +1 for w = 0)."""
    u = w / torch.where(t > 0, t, 1.0)[..., None]  # (..., n)
    return (2 * torch.floor(u / 2) + 1).clamp(-top, top)


def quantize(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes (rows, n) uint8 in [0, 2^b), scales t (rows,) float32) of each row of ``w`` (module docstring)."""
    top = 2**bits - 1
    w64 = w.detach().double()  # (rows, n); float64 keeps every sum below exact on grid values
    amax = w64.abs().amax(dim=1)  # (rows,)
    t, cap = amax / top, amax / max(top - 1, 1)
    if bits > 1:  # start from the best of a grid of clipping scales (always holding max|w|/top and the cap)
        f = torch.linspace(0.1, 1, GRID, dtype=torch.float64, device=w.device)[:-1]
        f = torch.cat([f, torch.tensor([1.0, top / (top - 1)], dtype=torch.float64, device=w.device)])
        grid = t[:, None] * f  # (rows, K)
        err = (w64[:, None] - grid[..., None] * _levels(w64[:, None], grid, top)).square().sum(-1)  # (rows, K)
        t = grid.gather(1, err.argmin(1, keepdim=True))[:, 0]
    for _ in range(ROUNDS if bits > 1 else 1):  # Lloyd: codes for t, then the least-squares t for the codes
        c = _levels(w64, t, top)  # (rows, n)
        t = (w64 * c).sum(1) / (c * c).sum(1)
        t = torch.minimum(t, cap) if bits > 1 else t
    mantissa, exponent = torch.frexp(t)
    t = torch.ldexp(torch.round(mantissa * 2 ** (24 - bits)) / 2 ** (24 - bits), exponent)  # 24−b bits
    return ((c + top) / 2).to(torch.uint8), t.float()


def dequantize(codes: torch.Tensor, scales: torch.Tensor, bits: int) -> torch.Tensor:
    """t·c in float32 (exact): codes (rows, n), scales (rows,) -> (rows, n)."""
    return scales[:, None] * (2 * codes.float() - (2**bits - 1))


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """b-bit codes (any shape) -> ceil(numel·b/8) bytes, 8/b codes per byte, lowest bits first."""
    per = 8 // bits
    flat = F.pad(codes.flatten().long(), (0, -codes.numel() % per)).view(-1, per)  # (bytes, per)
    return (flat << (torch.arange(per, device=codes.device) * bits)).sum(1).to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int, shape: tuple[int, int]) -> torch.Tensor:
    """The inverse of :func:`pack`: bytes -> uint8 codes of ``shape``."""
    per = 8 // bits
    codes = (packed.long()[:, None] >> (torch.arange(per, device=packed.device) * bits)) & (2**bits - 1)  # (bytes, per)
    return codes.flatten()[: shape[0] * shape[1]].view(shape).to(torch.uint8)


def _ste(w: torch.Tensor, bits: int) -> torch.Tensor:
    """Q(w) per row in w's dtype; under autograd its gradient is the identity (adding w − w, an exact zero)."""
    q = dequantize(*quantize(w, bits), bits).to(w.dtype)
    return q + (w - w.detach()) if w.requires_grad and torch.is_grad_enabled() else q


@register(
    "lowbit",
    config=LowbitConfig,
    paper="Revisiting the Parameter Efficiency of Adapters from the Perspective of Precision Redundancy (1/2/4-bit)",
    url="https://arxiv.org/abs/2307.16867",
    family="F8",
    params="r*(d_in+d_out)",
    layers=("linear", "conv1d"),
)
class Lowbit(AdapterModule):
    """x ↦ W₀x + s·Q(B)·Q(A)·x with latent A (r, in), B (out, r) trained through the STE."""

    def __init__(self, cfg: LowbitConfig, in_features: int, out_features: int, weight: torch.Tensor):
        super().__init__()
        self.config, self.scale, self.bits = cfg, cfg.scale, cfg.bits
        dtype = weight.dtype if weight.is_floating_point() else None  # a quantized base: the default dtype
        self.A = nn.Parameter(torch.empty(cfg.r, in_features, dtype=dtype, device=weight.device))  # (r, in)
        self.B = nn.Parameter(torch.zeros(out_features, cfg.r, dtype=dtype, device=weight.device))  # (out, r)
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()

    @classmethod
    def from_base(cls, base: nn.Module, cfg: LowbitConfig) -> Lowbit:
        in_features, out_features = L.dims(base)
        return cls(cfg, in_features, out_features, base.weight)  # type: ignore[arg-type]

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(Q(A) (r, in), Q(B) (out, r)): A per row, B per column (each a rank component), STE under autograd."""
        return _ste(self.A, self.bits), _ste(self.B.T, self.bits).T

    def forward(self, x: torch.Tensor, base: nn.Module, y: torch.Tensor) -> torch.Tensor:
        qA, qB = self.factors()
        h = L.project_in(base, self.dropout(x), qA)  # (..., r)
        return y + (F.linear(h, qB) * self.scale).to(y.dtype)  # (..., out)

    def delta_weight(self, base: nn.Module) -> torch.Tensor:
        qA, qB = self.factors()
        return L.to_base_layout(base, self.scale * (qB @ qA))  # (out, in) -> base layout

    def to_lora(self, base: nn.Module, rank: int | None = None) -> LoraFactors:
        """The dequantized factors (exact); with ``rank`` < r, the best rank-``rank`` truncation of s·Q(B)·Q(A)."""
        with torch.no_grad():
            qA, qB = self.factors()
        f = LoraFactors(qA, qB, self.scale)
        return f if rank is None else truncate(f, rank)

    def export_state(self) -> dict[str, torch.Tensor]:
        """Packed codes (uint8, ceil(b·n/8)) and float32 scales of A's rows and B's columns (Bᵀ's rows)."""
        state: dict[str, torch.Tensor] = {}
        for key, w in (("lowbit_A", self.A), ("lowbit_B", self.B.T)):
            codes, scales = quantize(w, self.bits)
            state |= {f"{key}.codes": pack(codes, self.bits), f"{key}.scales": scales}
        return state

    def import_state(self, state: dict[str, torch.Tensor]) -> None:
        """Latent A, B ← the dequantized saved values, which quantize to themselves (the same forward)."""
        with torch.no_grad():
            for key, w in (("lowbit_A", self.A), ("lowbit_B", self.B.T)):
                codes = unpack(state[f"{key}.codes"].to(w.device), self.bits, tuple(w.shape))  # type: ignore[arg-type]
                w.copy_(dequantize(codes, state[f"{key}.scales"].to(w.device).float(), self.bits))
