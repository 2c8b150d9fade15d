"""DCFT: Parameter-Efficient Fine-Tuning of LLMs via Deconvolution in Subspace — https://arxiv.org/abs/2503.01419
Update rule: h = W₀x + s·ConvT(B·A, K)·x, a k×k transposed convolution (stride k) of the subspace matrix B·A.

The subspace matrix M = B·A is (out/k, in/k) with A (r, in/k), B (out/k, r); the deconvolution kernel K is
(k, k). With stride equal to the kernel size (the paper's choice) every entry of M is spread over its own
k×k block: ΔW[(i, a), (j, b)] = s·M[i, j]·K[a, b], i.e. ΔW = s·(M ⊗ K), of rank ≤ r·rank(K) ≤ r·k. The kernel
size sets the parameter count, r·(in + out)/k + k² (16× fewer than LoRA at r = 8 with the defaults). As the
official code (AdaLoRA-based): A, B and K all start N(0, 0.02²) — so ΔW is tiny but not zero at init — and
s = alpha/r; alpha = 4 with r = 1 reproduces its GLUE scripts' effective scale (lora_alpha 32 over ranknum 8,
with rank-1 factors).
Left out: the paper's orthogonality regulariser on A and B (a training-loss term, not part of the update).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lorakit import layers as L
from lorakit.methods._api import AdapterModule, register, require


@dataclass(frozen=True, kw_only=True)
class DcftConfig:
    r: int = 1
    """Rank of the subspace matrix B·A (the official code trains rank-1 factors)."""
    kernel_size: int = 2
    """k: side of the deconvolution kernel and its stride; must divide in_features and out_features."""
    alpha: float = 4.0
    """Scaling numerator: the update is multiplied by alpha/r."""
    dropout: float = 0.0
    """Dropout probability on the adapter's input path during training."""

    def __post_init__(self) -> None:
        require(isinstance(self.r, int) and self.r > 0, f"r must be a positive integer, got {self.r!r}.")
        require(
            isinstance(self.kernel_size, int) and self.kernel_size > 0,
            f"kernel_size must be a positive integer, got {self.kernel_size!r}.",
        )
        require(self.alpha > 0, f"alpha must be > 0, got {self.alpha!r}.")
        require(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout!r}.")

    @property
    def scale(self) -> float:
        return self.alpha / self.r


@register(
    "dcft",
    config=DcftConfig,
    paper="DCFT: Parameter-Efficient Fine-Tuning of Large Language Models via Deconvolution in Subspace",
    url="https://arxiv.org/abs/2503.01419",
    family="F2",
    params="r*(d_in+d_out)//kernel_size + kernel_size**2",
    identity_at_init=False,
)
class Dcft(AdapterModule):
    """x ↦ W₀x + s·ConvT_k(B·A, K)·x with A (r, in/k), B (out/k, r), K (k, k)."""

    def __init__(self, cfg: DcftConfig, d_in: int, d_out: int, kind: str, weight: torch.Tensor):
        super().__init__()
        k = cfg.kernel_size
        self.config, self.scale = cfg, cfg.scale
        factory: dict[str, Any] = {
            "dtype": weight.dtype if weight.is_floating_point() else None,
            "device": weight.device,
        }
        self.A = nn.Parameter(torch.randn(cfg.r, d_in // k, **factory) * 0.02)  # (r, in/k)
        self.B = nn.Parameter(torch.randn(d_out // k, cfg.r, **factory) * 0.02)  # (out/k, r)
        self.kernel = nn.Parameter(torch.randn(k, k, **factory) * 0.02)  # (k, k)
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 and kind != "embedding" else nn.Identity()

    @classmethod
    def from_base(cls, base: nn.Module, cfg: DcftConfig) -> Dcft:
        d_in, d_out = L.dims(base)
        k = cfg.kernel_size
        require(
            d_in % k == 0 and d_out % k == 0,
            f"dcft kernel_size={k} (the deconvolution stride) must divide the layer's in_features ({d_in}) and "
            f"out_features ({d_out}); choose a common divisor, or leave this module out of targets.",
        )
        weight: torch.Tensor = base.weight  # type: ignore[assignment]
        return cls(cfg, d_in, d_out, L.layer_kind(base), weight)

    def lora_rank(self) -> int:
        return self.config.r * self.config.kernel_size  # to_lora's SVD is exact at this rank

    def delta_out_in(self, base: nn.Module) -> torch.Tensor:
        """ΔW (out, in) = s·ConvT(B·A, K) with stride k: each subspace entry becomes a k×k block."""
        M = self.B @ self.A  # (out/k, in/k)
        k = self.config.kernel_size
        return self.scale * F.conv_transpose2d(M[None, None], self.kernel[None, None], stride=k)[0, 0]  # (out, in)

    def forward(self, x: torch.Tensor, base: nn.Module, y: torch.Tensor) -> torch.Tensor:
        return y + L.project_in(base, self.dropout(x), self.delta_out_in(base)).to(y.dtype)  # (..., out)

    def export_state(self) -> dict[str, torch.Tensor]:
        return {"dcft_A": self.A, "dcft_B": self.B, "dcft_kernel": self.kernel}

    @staticmethod
    def peft_fields(cfg: DcftConfig) -> dict[str, Any]:
        return {"r": cfg.r, "lora_alpha": cfg.alpha, "kernel_size": cfg.kernel_size, "lora_dropout": cfg.dropout}
