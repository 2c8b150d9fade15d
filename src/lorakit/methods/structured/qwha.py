"""QWHA: Quantization-Aware Walsh-Hadamard Adaptation for PEFT on LLMs — https://arxiv.org/abs/2509.17428
Update rule: h = Q(W)·x + ΔW·x, ΔW = F·H (paper) or Hᵀ·F·H (transform='both'), F sparse with n = r·(d_in + d_out).

H is the normalised Walsh–Hadamard matrix (``methods/_hadamard.py``: symmetric, H·H = I). A width that is not a
power of two is zero-padded to the next one: x is padded before the transform and ΔW is the top-left
(d_out, d_in) block of the padded product. F holds n trainable values at fixed (row, col) positions of the
(padded) coefficient space, a saved buffer. The forward never forms ΔW: x̂ = FWHT(pad(x)), y += x̂·Fᵀ (then a
second FWHT on the output for 'both'), O(n + d log d) transform work per token on top of one sparse-filled
(d_out, d_in) coefficient matmul.

Init (``quant``): with quant=None, F is zero at random positions (``seed``), so the model starts as the base.
With quant='nf4' (any ``lk.quantize`` kind), attach to the full-precision model: for each layer E = W − Q(W)
(``init/_quant_error.py``), the coefficients C of E in the Hadamard basis (E = C·H, resp. Hᵀ·C·H) are
computed and F keeps the n of largest |C| with their values — the paper's magnitude-based selection; in an
orthonormal basis those values are the least-squares optimum on that support (also under padding), so
‖E − ΔW‖_F < ‖E‖_F. Then save the adapter and load it onto ``lk.quantize(model, quant)``: Q(W) + ΔW ≈ W.
An already quantized base has no W to read, which is a clear error. Not built: the paper's AdaAlloc
(per-row budgets) and its value refinement beyond this projection.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lorakit import layers as L
from lorakit.errors import AdapterFormatError, ConfigError
from lorakit.init._calib import base_layer
from lorakit.init._quant_error import quantization_error
from lorakit.methods._api import AdapterModule, register, require
from lorakit.methods._hadamard import fwht, next_pow2

TRANSFORMS = ("in", "both")


@dataclass(frozen=True, kw_only=True)
class QwhaConfig:
    r: int = 8
    """Sizes F: n = r·(d_in + d_out) trainable coefficients per layer, LoRA's parameter count at rank r."""
    transform: str = "in"
    """'in': ΔW = F·H on the input side (the paper's ΔW = F·H⁻¹); 'both': ΔW = Hᵀ·F·H on both sides."""
    quant: str | None = None
    """None: zero F at random positions. A quantization kind ('nf4', ...): F from the WHT of W − Q(W)."""
    seed: int = 0
    """Seed of the random positions (quant=None)."""

    def __post_init__(self) -> None:
        require(isinstance(self.r, int) and self.r > 0, f"r must be a positive integer, got {self.r!r}.")
        require(self.transform in TRANSFORMS, f"transform must be one of {TRANSFORMS}, got {self.transform!r}.")
        require(self.quant is None or isinstance(self.quant, str), "quant must be a quantization kind name or None.")
        require(isinstance(self.seed, int), f"seed must be an integer, got {self.seed!r}.")


@register(
    "qwha",
    config=QwhaConfig,
    paper="QWHA: Quantization-Aware Walsh-Hadamard Adaptation for Parameter-Efficient Fine-Tuning on LLMs",
    url="https://arxiv.org/abs/2509.17428",
    family="F8",
    params="r*(d_in+d_out)",
    layers=("linear", "conv1d"),
)
class Qwha(AdapterModule):
    """x ↦ W₀x + ΔW·x with ΔW = F·H (or Hᵀ·F·H); F (rows, N_in) zero but for ``values`` at ``indices``."""

    indices: torch.Tensor  # (2, n) buffer: row and column of each trained coefficient in the padded space

    def __init__(self, cfg: QwhaConfig, d_in: int, d_out: int, weight: torch.Tensor):
        super().__init__()
        self.config, self.d_in, self.d_out = cfg, d_in, d_out
        self.n_in = next_pow2(d_in)
        self.both = cfg.transform == "both"
        self.rows = next_pow2(d_out) if self.both else d_out  # F is (rows, n_in)
        n = cfg.r * (d_in + d_out)
        require(
            n <= self.rows * self.n_in,
            f"qwha r={cfg.r} asks for r·(in+out) = {n} coefficients, more than the layer's {self.rows}×{self.n_in} "
            "coefficient space; lower r or leave this module out of targets.",
        )
        flat = torch.randperm(self.rows * self.n_in, generator=torch.Generator().manual_seed(cfg.seed))[:n]  # (n,)
        self.register_buffer("indices", torch.stack([flat // self.n_in, flat % self.n_in]).to(weight.device))
        dtype = weight.dtype if weight.is_floating_point() else None  # a quantized base: the default dtype
        self.values = nn.Parameter(torch.zeros(n, dtype=dtype, device=weight.device))  # (n,)

    @classmethod
    def from_base(cls, base: nn.Module, cfg: QwhaConfig) -> Qwha:
        d_in, d_out = L.dims(base)
        return cls(cfg, d_in, d_out, L.weight_out_in(base))

    @classmethod
    def initialize(cls, model: nn.Module, adapters: dict[str, AdapterModule], cfg: QwhaConfig, batches: object) -> None:
        """With ``quant`` set: each adapter's F ← the n largest WHT coefficients of its layer's W − Q(W)."""
        for name, adapter in adapters.items():
            if isinstance(adapter, Qwha) and adapter.config.quant is not None:
                base = base_layer(model, name)
                if L.is_quantized(base):
                    raise ConfigError(
                        f"qwha quant={adapter.config.quant!r} reads the full-precision W of {name}, but that layer is "
                        "already quantized. Attach to the full-precision model, save the adapter and load it onto "
                        "lk.quantize(model, kind); or use quant=None on a quantized base."
                    )
                adapter.fit(quantization_error(base, adapter.config.quant))

    def coefficients(self, E: torch.Tensor) -> torch.Tensor:
        """C (rows, n_in) with E = [C·H]₍d_out, d_in₎ (resp. [Hᵀ·C·H]): the padded E in the Hadamard basis."""
        C = fwht(F.pad(E.float(), (0, self.n_in - self.d_in)), dim=1)  # (out, n_in): E·H
        return fwht(F.pad(C, (0, 0, 0, self.rows - self.d_out)), dim=0) if self.both else C  # H·E·H

    @torch.no_grad()
    def fit(self, E: torch.Tensor) -> None:
        """Support and values ← the n largest-magnitude coefficients of the (out, in) target E."""
        C = self.coefficients(E).flatten()  # (rows·n_in,)
        flat = C.abs().topk(self.values.numel()).indices.sort().values  # (n,)
        self.indices.copy_(torch.stack([flat // self.n_in, flat % self.n_in]))
        self.values.copy_(C[flat].to(self.values.dtype))

    def coefficient_matrix(self) -> torch.Tensor:
        """F (rows, n_in): the sparse coefficients scattered into zeros (the coefficient space, not ΔW)."""
        zeros = torch.zeros(self.rows, self.n_in, dtype=self.values.dtype, device=self.values.device)
        return zeros.index_put((self.indices[0], self.indices[1]), self.values)

    def forward(self, x: torch.Tensor, base: nn.Module, y: torch.Tensor) -> torch.Tensor:
        xh = fwht(F.pad(x.to(self.values.dtype), (0, self.n_in - self.d_in)))  # (..., n_in): pad(x)·H
        z = F.linear(xh, self.coefficient_matrix())  # (..., rows): F·H·x
        if self.both:
            z = fwht(z)[..., : self.d_out]  # (..., out): Hᵀ·F·H·x, cropped
        return y + z.to(y.dtype)

    def delta_out_in(self, base: nn.Module) -> torch.Tensor:
        """The dense ΔW (out, in), for merging and export only."""
        D = fwht(self.coefficient_matrix(), dim=1)  # (rows, n_in): F·H
        D = fwht(D, dim=0) if self.both else D  # Hᵀ·F·H
        return D[: self.d_out, : self.d_in]

    def export_state(self) -> dict[str, torch.Tensor]:
        return {"qwha_values": self.values, "qwha_indices": self.indices.to(torch.int32)}

    def import_state(self, state: dict[str, torch.Tensor]) -> None:
        indices = state["qwha_indices"].long()  # (2, n)
        if not bool((indices >= 0).all() and (indices.amax(dim=1) < torch.tensor([self.rows, self.n_in])).all()):
            raise AdapterFormatError(f"qwha_indices point outside the layer's {self.rows}×{self.n_in} coefficients.")
        with torch.no_grad():
            self.values.copy_(state["qwha_values"])
            self.indices.copy_(indices)
