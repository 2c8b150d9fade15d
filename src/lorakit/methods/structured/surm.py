"""SURM: Structured Unrestricted-Rank Matrices for Parameter Efficient Fine-tuning — https://arxiv.org/abs/2406.17740
Update rule (SURM-LoRA): h = W₀x + s·ΔW·x, ΔW a low displacement rank matrix (LDRM) applied by FFT.

Structures (generators in brackets; n = max(d_in, d_out); Z_f is the f-circulant shift):
  circulant  C(c)[i, j] = c[(i − j) mod n]                       [c: n]         ∇(C) = Z₁C − CZ₋₁ has rank 1
  toeplitz   T(t)[i, j] = t[i − j + d_in − 1], (out, in)         [t: in+out−1]  rank ≤ 2
  ldr        Σ_k C(g_k)·S(h_k), S skew-circulant: S[i, j] = ±h[(i − j) mod n], − above the diagonal
                                                                 [g, h: r × n]  rank ≤ r
Every matrix of (Z₁, Z₋₁)-displacement rank r has the ldr form (Pan), so the parameter count of the general
family is the displacement-rank formula 2·r·n. Square n×n matrices are cropped to (out, in) for rectangular
layers (the reference code only handles square ones; a rectangular Toeplitz needs no crop). Products are
computed in O(n log n): C·x is a circular convolution (FFT), S·x a negacyclic one (FFT of ω-weighted
sequences, ωⁿ = −1), T·x a zero-padded linear convolution; in float32, as torch has no bf16 FFT on CPU.
Init: c = 0, t = 0, g = 0 with h ~ N(0, 0.02²) (the reference's ldr init), so ΔW = 0; s = alpha (reference 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.fft import fft, ifft, irfft, rfft

from lorakit import layers as L
from lorakit.methods._api import AdapterModule, register, require

STRUCTURES = ("circulant", "toeplitz", "ldr")


@dataclass(frozen=True, kw_only=True)
class SurmConfig:
    structure: str = "circulant"
    """'circulant', 'toeplitz' or 'ldr' (a sum of r circulant × skew-circulant products)."""
    r: int = 1
    """Displacement rank of the 'ldr' structure (its number of products); the other structures ignore it."""
    alpha: float = 1.0
    """Scale s of the update (the reference's circ_alpha / toep_alpha)."""
    dropout: float = 0.0
    """Dropout probability on the adapter's input path during training."""

    def __post_init__(self) -> None:
        require(self.structure in STRUCTURES, f"structure must be one of {STRUCTURES}, got {self.structure!r}.")
        require(isinstance(self.r, int) and self.r > 0, f"r must be a positive integer, got {self.r!r}.")
        require(self.alpha > 0, f"alpha must be > 0, got {self.alpha!r}.")
        require(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout!r}.")


def circ_mul(c: torch.Tensor, x: torch.Tensor, n: int) -> torch.Tensor:
    """C(c)·x for x (..., ≤n), zero-padded to n: the circular convolution c ⊛ x, shape (..., n)."""
    return irfft(rfft(c, n) * rfft(x, n), n)


def skew_mul(h: torch.Tensor, x: torch.Tensor, n: int) -> torch.Tensor:
    """S(h)·x (negacyclic convolution): ω̄^i·(ωh ⊛ ωx)[i] with ω_j = e^{iπj/n}, shape (..., n)."""
    w = torch.exp(1j * math.pi * torch.arange(n, device=h.device) / n)  # (n,)
    return (w.conj() * ifft(fft(w * h, n) * fft(w * nn.functional.pad(x, (0, n - x.shape[-1]))))).real


@register(
    "surm",
    config=SurmConfig,
    paper="SURM: Structured Unrestricted-Rank Matrices for Parameter Efficient Fine-tuning",
    url="https://arxiv.org/abs/2406.17740",
    family="F2",
    params=(  # toeplitz: one value per diagonal; circulant: n; ldr: the displacement-rank formula 2·r·n
        "d_in + d_out - 1 if structure == 'toeplitz' "
        "else (d_in if d_in > d_out else d_out) * (2*r if structure == 'ldr' else 1)"
    ),
    layers=("linear", "conv1d"),
)
class Surm(AdapterModule):
    """x ↦ W₀x + s·ΔW·x with ΔW circulant, Toeplitz or Σ_k circulant·skew-circulant (cropped to (out, in))."""

    def __init__(self, cfg: SurmConfig, d_in: int, d_out: int, weight: torch.Tensor):
        super().__init__()
        self.config, self.d_in, self.d_out, self.n = cfg, d_in, d_out, max(d_in, d_out)
        factory: dict[str, Any] = {"dtype": weight.dtype, "device": weight.device}
        self.generators = nn.ParameterDict()
        if cfg.structure == "circulant":
            self.generators["c"] = nn.Parameter(torch.zeros(self.n, **factory))  # (n,) first column
        elif cfg.structure == "toeplitz":
            self.generators["t"] = nn.Parameter(torch.zeros(d_in + d_out - 1, **factory))  # (in+out−1,) diagonals
        else:
            self.generators["g"] = nn.Parameter(torch.zeros(cfg.r, self.n, **factory))  # (r, n) circulant columns
            self.generators["h"] = nn.Parameter(torch.randn(cfg.r, self.n, **factory) * 0.02)  # (r, n) skew
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()

    @classmethod
    def from_base(cls, base: nn.Module, cfg: SurmConfig) -> Surm:
        d_in, d_out = L.dims(base)
        return cls(cfg, d_in, d_out, L.weight_out_in(base))

    def matvec(self, x: torch.Tensor) -> torch.Tensor:
        """ΔW·x by FFT (float32), shape (..., out), without the scale."""
        gen, n, x = {k: p.float() for k, p in self.generators.items()}, self.n, x.float()
        if "t" in gen:  # y[i] = Σ_j t[i − j + in − 1]·x[j]: a slice of the linear convolution t * x
            size = gen["t"].shape[0] + self.d_in - 1
            full = irfft(rfft(gen["t"], size) * rfft(x, size), size)  # (..., size)
            return full[..., self.d_in - 1 : self.d_in - 1 + self.d_out]
        if "c" in gen:
            return circ_mul(gen["c"], x, n)[..., : self.d_out]
        out = circ_mul(gen["g"], skew_mul(gen["h"], x[..., None, :], n), n)  # (..., r, n): C(g_k)·S(h_k)·x
        return out.sum(-2)[..., : self.d_out]

    def forward(self, x: torch.Tensor, base: nn.Module, y: torch.Tensor) -> torch.Tensor:
        return y + (self.config.alpha * self.matvec(self.dropout(x))).to(y.dtype)  # (..., out)

    def delta_out_in(self, base: nn.Module) -> torch.Tensor:
        """The dense ΔW (out, in), gathered from the generators (no FFT)."""
        gen = dict(self.generators.items())
        ar = torch.arange(self.n, device=next(iter(gen.values())).device)
        if "t" in gen:
            return self.config.alpha * gen["t"][ar[: self.d_out, None] - ar[None, : self.d_in] + self.d_in - 1]
        ii, jj = ar[:, None], ar[None, :]
        wrap = (ii - jj) % self.n  # (n, n) index of the generator entry on each diagonal
        if "c" in gen:
            return self.config.alpha * gen["c"][wrap][: self.d_out, : self.d_in]
        sign = torch.where(ii >= jj, 1.0, -1.0).to(gen["h"])  # skew-circulant: negated above the diagonal
        full = torch.einsum("kab,kbc->ac", gen["g"][:, wrap], gen["h"][:, wrap] * sign)  # Σ_k C(g_k)·S(h_k)
        return self.config.alpha * full[: self.d_out, : self.d_in]

    def export_state(self) -> dict[str, torch.Tensor]:
        return {f"surm_{key}": p for key, p in self.generators.items()}

    @staticmethod
    def peft_fields(cfg: SurmConfig) -> dict[str, Any]:
        return {"structure": cfg.structure, "r": cfg.r, "alpha": cfg.alpha, "dropout": cfg.dropout}
