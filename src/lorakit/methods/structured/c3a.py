"""C3A: Parameter-Efficient Fine-Tuning via Circular Convolution — https://arxiv.org/abs/2407.19342
Update rule: h = W₀x + ΔW·x, ΔW = [circ(w_ij)]_{i,j} / d_in, applied as FFT circular convolutions.

With block size b, ΔW is an (out/b)×(in/b) grid of b×b circulant blocks, block (i, j) the circulant
whose first row is the kernel w_ij: circ(w)[t, s] = w[(s − t) mod b]. Per input block j the
forward computes y_i = Σ_j Re FFT(IFFT(x_j) ⊙ FFT(w_ij)) / d_in (PEFT's convention, in float32:
torch's FFT has no bf16 on CPU). That costs O(d·log b) instead of a dense matmul, and ΔW can be
full rank with only d_in·d_out/b parameters. The dense matrix is built only to merge.
Init: PEFT's default ``xavier_uniform`` kernel (ΔW ≠ 0 at init); ``zeros`` gives the identity.
Wraps Linear and GPT-2 Conv1D (PEFT's C3A wraps only nn.Linear; no embeddings).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.fft import fft, ifft

from lorakit import layers as L
from lorakit.methods._api import AdapterModule, register, require

INITS = ("xavier_uniform", "kaiming_uniform", "gaussian", "zeros")


@dataclass(frozen=True, kw_only=True)
class C3AConfig:
    block_size: int = 32
    """b: side of each circulant block; must divide in_features and out_features (params = d_in·d_out/b).
    PEFT's 256 suits 4096-wide models; 32 divides every width of SmolLM2 (576, 1536, 192) and the tiny
    test models; on SmolLM2 it trains about as many parameters as LoRA at r ≈ 11 (PEFT's guide: b ≈ √(d_in·d_out)/r)."""
    init: str = "xavier_uniform"
    """Kernel init: 'xavier_uniform' (PEFT's default), 'kaiming_uniform', 'gaussian' or 'zeros' (identity)."""

    def __post_init__(self) -> None:
        require(
            isinstance(self.block_size, int) and self.block_size > 0,
            f"block_size must be a positive integer, got {self.block_size!r}.",
        )
        require(self.init in INITS, f"init must be one of {INITS}, got {self.init!r}.")


@register(
    "c3a",
    config=C3AConfig,
    paper="C3A: Parameter-Efficient Fine-Tuning via Circular Convolution",
    url="https://arxiv.org/abs/2407.19342",
    family="F2",
    params="d_in*d_out//block_size",
    identity_at_init=False,
    layers=("linear", "conv1d"),
)
class C3A(AdapterModule):
    """x ↦ W₀x + blockcirc(w)·x / d_in, with the kernel w (out/b, in/b, b) the only trainable tensor."""

    peft_type = "C3A"

    def __init__(self, cfg: C3AConfig, in_features: int, out_features: int, weight: torch.Tensor):
        super().__init__()
        b = cfg.block_size
        self.config = cfg
        factory: dict[str, Any] = {"dtype": weight.dtype, "device": weight.device}
        self.kernel = nn.Parameter(torch.zeros(out_features // b, in_features // b, b, **factory))  # (m, n, b)
        if cfg.init == "gaussian":
            nn.init.normal_(self.kernel)
        elif cfg.init != "zeros":  # PEFT's bounds, from the whole layer's fan-in and fan-out
            kaiming = cfg.init == "kaiming_uniform"
            bound = math.sqrt(1 / in_features) if kaiming else math.sqrt(6 / (in_features + out_features))
            nn.init.uniform_(self.kernel, -bound, bound)

    @classmethod
    def from_base(cls, base: nn.Module, cfg: C3AConfig) -> C3A:
        d_in, d_out = L.dims(base)
        b = cfg.block_size
        require(
            d_in % b == 0 and d_out % b == 0,
            f"c3a block_size={b} must divide the layer's in_features ({d_in}) and out_features ({d_out}); "
            f"choose a common divisor (their gcd is {math.gcd(d_in, d_out)}), or leave this module out of targets.",
        )
        return cls(cfg, d_in, d_out, L.weight_out_in(base))

    def forward(self, x: torch.Tensor, base: nn.Module, y: torch.Tensor) -> torch.Tensor:
        w = self.kernel.float()  # (m, n, b)
        m, n, b = w.shape
        xs = x.float().reshape(*x.shape[:-1], n, b)  # (..., n, b)
        out = fft(torch.einsum("...nb,mnb->...mb", ifft(xs), fft(w))).real  # (..., m, b)
        return y + (out.reshape(*x.shape[:-1], m * b) / (n * b)).to(y.dtype)  # (..., out)

    def delta_out_in(self, base: nn.Module) -> torch.Tensor:
        """The dense ΔW (out, in): block (i, j)[t, s] = w_ij[(s − t) mod b] / d_in, gathered without an FFT."""
        m, n, b = self.kernel.shape
        ar = torch.arange(b, device=self.kernel.device)
        circ = self.kernel[:, :, (ar[None, :] - ar[:, None]) % b]  # (m, n, b_t, b_s)
        return circ.permute(0, 2, 1, 3).reshape(m * b, n * b) / (n * b)  # (out, in)

    def export_state(self) -> dict[str, torch.Tensor]:
        return {"c3a_kernel": self.kernel}

    @staticmethod
    def peft_fields(cfg: C3AConfig) -> dict[str, Any]:
        init: bool | str = True if cfg.init == "zeros" else cfg.init
        return {"block_size": cfg.block_size, "block_size_pattern": {}, "init_weights": init}

    @staticmethod
    def config_from_peft(fields: dict[str, Any]) -> C3AConfig | None:
        if fields.get("peft_type") != "C3A":
            return None
        require(not fields.get("block_size_pattern"), "c3a: PEFT's block_size_pattern is not supported by lorakit yet.")
        init = fields.get("init_weights", "xavier_uniform")
        if isinstance(init, bool):  # PEFT: True means zeros (identity), False means xavier_uniform
            init = "zeros" if init else "xavier_uniform"
        return C3AConfig(block_size=int(fields.get("block_size") or 256), init=str(init))
