"""LoQT: Low-Rank Adapters for Quantized Pretraining — https://arxiv.org/abs/2405.16528
Update rule: h = Q(W)·x + s·P·B·x; every T steps W ← Q(W + s·P·B) and B ← 0, P (out, r) from the SVD of ∇_W L.

P holds the top-r left singular vectors of the full gradient G = ∇_W L on the calibration batches
(``init/_calib.full_gradients``, which reaches a quantized layer through a zero probe); it is frozen and saved
with the adapter. B (r, in) trains from zero, so the model starts as the base. Every ``merge_every`` optimizer
steps the ``loqt`` training callback calls :meth:`Loqt.fold`: s·P·B goes into the base weight in the layer's own
storage (``layers.store``: a quantized layer is quantized again with its own quantizer, as ``lk.merge`` does),
B restarts at 0 with fresh optimizer state, and P is taken again from the SVD of ∇_W L on the fold step's own
batches (as the paper does). Across a fold the outputs change only by that re-quantization (none on a
full-precision base). After folds the base holds the earlier updates, so a saved adapter is the update since
the last fold, for that base (the dir fingerprints the folded base); ``lk.merge`` gives the whole model. Not built:
quantizing P itself, and the paper's peak-memory benchmark.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lorakit import layers as L
from lorakit.init._calib import as_batches, full_gradients
from lorakit.lowrank import truncate
from lorakit.methods._api import AdapterModule, LoraFactors, register, require


@dataclass(frozen=True, kw_only=True)
class LoqtConfig:
    r: int = 8
    """Rank of the update P·B: the number of gradient directions P keeps."""
    alpha: float = 8.0
    """Scaling numerator: the update is multiplied by alpha/r."""
    merge_every: int = 100
    """T: the ``loqt`` training callback folds s·P·B into the base weight every T optimizer steps."""

    def __post_init__(self) -> None:
        require(isinstance(self.r, int) and self.r > 0, f"r must be a positive integer, got {self.r!r}.")
        require(self.alpha > 0, f"alpha must be > 0, got {self.alpha!r}.")
        require(
            isinstance(self.merge_every, int) and self.merge_every > 0,
            f"merge_every must be a positive integer (optimizer steps), got {self.merge_every!r}.",
        )

    @property
    def scale(self) -> float:
        return self.alpha / self.r


@register(
    "loqt",
    config=LoqtConfig,
    paper="LoQT: Low-Rank Adapters for Quantized Pretraining",
    url="https://arxiv.org/abs/2405.16528",
    family="F8",
    params="r*d_in",
    layers=("linear", "conv1d"),
    calibration=True,
)
class Loqt(AdapterModule):
    """x ↦ Q(W)·x + s·P·B·x with P (out, r) a frozen, saved buffer and B (r, in) trained."""

    P: torch.Tensor

    def __init__(self, cfg: LoqtConfig, in_features: int, out_features: int, weight: torch.Tensor):
        super().__init__()
        self.config, self.scale = cfg, cfg.scale
        dtype = weight.dtype if weight.is_floating_point() else None  # a quantized base: the default dtype
        factory: dict[str, Any] = {"dtype": dtype, "device": weight.device}
        self.register_buffer("P", torch.zeros(out_features, cfg.r, **factory))  # (out, r), set by initialize
        self.B = nn.Parameter(torch.zeros(cfg.r, in_features, **factory))  # (r, in)

    @classmethod
    def from_base(cls, base: nn.Module, cfg: LoqtConfig) -> Loqt:
        in_features, out_features = L.dims(base)
        require(
            cfg.r <= min(in_features, out_features),
            f"loqt: r={cfg.r} exceeds the rank a ({out_features}, {in_features}) gradient can have; lower r.",
        )
        return cls(cfg, in_features, out_features, base.weight)  # type: ignore[arg-type]

    @classmethod
    def initialize(
        cls, model: nn.Module, adapters: dict[str, AdapterModule], cfg: LoqtConfig, batches: list[dict] | None
    ) -> None:
        """P ← the top-r left singular vectors of each targeted layer's full gradient on ``batches``."""
        mine = {name: a for name, a in adapters.items() if isinstance(a, Loqt)}
        rank = max(a.config.r for a in mine.values())
        grads = full_gradients(model, list(mine), as_batches(batches, need_labels=True, min_rows=rank, where="loqt"))
        for name, adapter in mine.items():
            adapter.set_projection(grads[name])

    def set_projection(self, G: torch.Tensor) -> None:
        """P ← the top-r left singular vectors of an (out, in) gradient G, each column's largest entry made > 0."""
        U = torch.linalg.svd(G.detach().double(), full_matrices=False)[0][:, : self.config.r]  # (out, r)
        U = U * torch.sign(U.gather(0, U.abs().argmax(0, keepdim=True)))
        with torch.no_grad():
            self.P.copy_(U.to(self.P.dtype))

    def forward(self, x: torch.Tensor, base: nn.Module, y: torch.Tensor) -> torch.Tensor:
        h = L.project_in(base, x, self.B)  # (..., r)
        return y + (F.linear(h, self.P) * self.scale).to(y.dtype)  # (..., out)

    def delta_weight(self, base: nn.Module) -> torch.Tensor:
        return L.to_base_layout(base, self.scale * (self.P @ self.B))  # (out, in) -> base layout

    def to_lora(self, base: nn.Module, rank: int | None = None) -> LoraFactors:
        """Exact (A = B, B = P in LoRA's names); with ``rank`` < r, the best rank-``rank`` truncation."""
        f = LoraFactors(self.B.detach(), self.P.detach(), self.scale)
        return f if rank is None else truncate(f, rank)

    def fold(self, base: nn.Module) -> None:
        """LoQT's merge: W ← Q(W + s·P·B) in the layer's own storage, then B ← 0 (its optimizer state: the caller's)."""
        with torch.no_grad():
            W = L.weight_out_in(base).float() + self.scale * (self.P.float() @ self.B.float())  # (out, in)
            L.store(base, W)
            self.B.zero_()

    def export_state(self) -> dict[str, torch.Tensor]:
        return {"loqt_P": self.P, "loqt_B": self.B}
