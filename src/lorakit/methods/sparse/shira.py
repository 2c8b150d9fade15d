"""SHiRA: Sparse High Rank Adapters — https://arxiv.org/abs/2406.13175
Update rule: W = W₀ + ΔW with ΔW = scatter(values at mask), only nnz(mask) = r·(d_in + d_out) entries trainable.

The mask is a fixed random set of r·(d_in+d_out) positions of the (out, in) weight — as many
parameters as LoRA at rank r, but ΔW can be high rank. It is drawn as PEFT's ``random_mask`` does
(``randperm`` from a fresh ``torch.Generator``, seeded with ``random_seed`` when given) and kept as
a persistent buffer of (row, col) indices, saved as ``shira_indices``. Init: zero values, so ΔW = 0.
The training forward adds x·ΔWᵀ with ΔW densified (as PEFT does); ``scatter_``/``restore_`` are the
paper's rapid switching: write the nnz values into the base weight in place, and put the saved
originals back bit-exactly. Wraps Linear and GPT-2 Conv1D (PEFT's SHiRA wraps only nn.Linear).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lorakit import layers as L
from lorakit.errors import AdapterFormatError
from lorakit.methods._api import AdapterModule, register, require


@dataclass(frozen=True, kw_only=True)
class ShiraConfig:
    r: int = 8
    """Sizes the mask: nnz = r·(d_in + d_out), LoRA's parameter count at rank r (not a rank limit). The paper
    trains 1–2% of each weight (PEFT's r=32 on 4096-wide models); r=8 gives about 2% on SmolLM2."""
    random_seed: int | None = None
    """Seed of the mask's torch.Generator (None: the generator's fixed default seed, as PEFT)."""

    def __post_init__(self) -> None:
        require(isinstance(self.r, int) and self.r > 0, f"r must be a positive integer, got {self.r!r}.")
        require(self.random_seed is None or isinstance(self.random_seed, int), "random_seed must be an int or None.")


def random_mask_indices(d_out: int, d_in: int, nnz: int, seed: int | None) -> torch.Tensor:
    """(2, nnz) row/col indices of ``nnz`` random positions of an (out, in) matrix, in row-major order (PEFT's)."""
    g = torch.Generator()
    if seed is not None:
        g.manual_seed(seed)
    flat = torch.randperm(d_out * d_in, generator=g)[:nnz].sort().values  # (nnz,)
    return torch.stack([flat // d_in, flat % d_in])  # (2, nnz)


@register(
    "shira",
    config=ShiraConfig,
    paper="SHiRA: Sparse High Rank Adapters",
    url="https://arxiv.org/abs/2406.13175",
    family="F6",
    params="r*(d_in+d_out)",
    layers=("linear", "conv1d"),
)
class Shira(AdapterModule):
    """x ↦ W₀x + ΔW·x, ΔW[rows, cols] = values (trainable), zero elsewhere."""

    peft_type = "SHIRA"
    indices: torch.Tensor  # (2, nnz) buffer: row (out) and column (in) of each trainable entry

    def __init__(self, cfg: ShiraConfig, in_features: int, out_features: int, weight: torch.Tensor):
        super().__init__()
        nnz = cfg.r * (in_features + out_features)
        require(
            nnz <= in_features * out_features,
            f"shira r={cfg.r} asks for r·(in+out) = {nnz} trainable entries, more than the layer's "
            f"{out_features}×{in_features} = {in_features * out_features} weights; lower r or leave this module out.",
        )
        self.config, self.shape = cfg, (out_features, in_features)
        self.values = nn.Parameter(torch.zeros(nnz, dtype=weight.dtype, device=weight.device))  # (nnz,)
        indices = random_mask_indices(out_features, in_features, nnz, cfg.random_seed)
        self.register_buffer("indices", indices.to(weight.device))  # (2, nnz)

    @classmethod
    def from_base(cls, base: nn.Module, cfg: ShiraConfig) -> Shira:
        d_in, d_out = L.dims(base)
        return cls(cfg, d_in, d_out, L.weight_out_in(base))

    def delta_out_in(self, base: nn.Module) -> torch.Tensor:
        """The dense ΔW (out, in): ``values`` at the mask, exact zeros elsewhere."""
        zeros = torch.zeros(self.shape, dtype=self.values.dtype, device=self.values.device)  # (out, in)
        return zeros.index_put((self.indices[0], self.indices[1]), self.values)

    def forward(self, x: torch.Tensor, base: nn.Module, y: torch.Tensor) -> torch.Tensor:
        return y + torch.nn.functional.linear(x.to(self.values.dtype), self.delta_out_in(base)).to(
            y.dtype
        )  # (..., out)

    @torch.no_grad()
    def scatter_(self, base: nn.Module) -> torch.Tensor:
        """Rapid switching: W₀[mask] += values in place (only the nnz entries); returns the old W₀[mask]."""
        W, (rows, cols) = L.weight_out_in(base), self.indices  # W: (out, in) view of the base weight
        old = W[rows, cols].clone()  # (nnz,)
        W[rows, cols] = old + self.values.to(W.dtype)
        return old

    @torch.no_grad()
    def restore_(self, base: nn.Module, old: torch.Tensor) -> None:
        """Undo :meth:`scatter_`: write the saved entries back, so the base weight is bit-identical again."""
        L.weight_out_in(base)[self.indices[0], self.indices[1]] = old

    def export_state(self) -> dict[str, torch.Tensor]:
        return {"shira_weight": self.values, "shira_indices": self.indices.to(torch.int32)}  # PEFT saves int32

    def import_state(self, state: dict[str, torch.Tensor]) -> None:
        indices = state["shira_indices"].long()  # (2, nnz)
        if not bool((indices >= 0).all() and (indices.amax(dim=1) < torch.tensor(self.shape)).all()):
            raise AdapterFormatError(f"shira_indices point outside the layer's {self.shape[0]}×{self.shape[1]} weight.")
        with torch.no_grad():
            self.values.copy_(state["shira_weight"])
            self.indices.copy_(indices)

    @staticmethod
    def peft_fields(cfg: ShiraConfig) -> dict[str, Any]:
        return {"r": cfg.r, "mask_type": "random", "random_seed": cfg.random_seed, "init_weights": True}

    @staticmethod
    def config_from_peft(fields: dict[str, Any]) -> ShiraConfig | None:
        """Any PEFT mask_type loads: the mask itself is read from ``shira_indices``."""
        if fields.get("peft_type") != "SHIRA":
            return None
        seed = fields.get("random_seed")
        return ShiraConfig(r=int(fields.get("r") or 32), random_seed=None if seed is None else int(seed))
