"""VB-LoRA: Extreme Parameter Efficient Fine-Tuning with Vector Banks — https://arxiv.org/abs/2405.15179
Update rule: ΔW = B·A, every length-b sub-vector of A (r, in) and B (out, r) = Σ_top-k softmax(z)_i·bank[i].

One trainable bank (num_vectors, b) is shared by all layers of one ``attach`` (one group, as lotr.py; its shape
does not depend on the layer's). Each layer trains logits z_A (r, in/b, n) and z_B (out/b, r, n); as PEFT's
``VBLoRAModel``, A[i, j·b:(j+1)·b] = Σ_{t ∈ topk(z_A[i,j])} softmax(z_A[i,j])_t·bank[t], B's columns likewise. Init
as PEFT: bank ~ U(−bound, bound), logits ~ N(0, std²), so ΔW ≠ 0. The bank is saved once at PEFT's model-level key
``base_model.vblora_vector_bank`` (``export_shared``), the logits per layer. Trainable: r·n·(in + out)/b per layer
(``params``) plus n·b per attach (``shared_params``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from lorakit import layers as L
from lorakit.errors import ConfigError
from lorakit.lowrank import truncate
from lorakit.methods._api import AdapterModule, LoraFactors, register, require

BANK_KEY = "base_model.vblora_vector_bank"  # PEFT's model-level key (adapter name stripped)
PEFT_NAMES = ("r", "num_vectors", "vector_length", "topk", "init_vector_bank_bound", "init_logits_std")


@dataclass(frozen=True, kw_only=True)
class VBLoraConfig:
    r: int = 4
    """Rank of A (r, in) and B (out, r)."""
    num_vectors: int = 256
    """Number of vectors in the shared bank."""
    vector_length: int = 32
    """Length b of a bank vector; must divide every targeted layer's in and out (paper: 256 on 768/4096-wide
    models; 32 here so the default fits the tiny models' 32-wide k/v and SmolLM2's 576/192/1536)."""
    topk: int = 2
    """k: each sub-vector mixes the k bank vectors with the largest logits (paper: k = 2)."""
    dropout: float = 0.0
    """Dropout probability on the adapter's input path during training."""
    init_vector_bank_bound: float = 0.02
    """The bank starts U(−bound, bound)."""
    init_logits_std: float = 0.1
    """The logits start N(0, std²)."""

    def __post_init__(self) -> None:
        for field in ("r", "num_vectors", "vector_length", "topk"):
            value = getattr(self, field)
            require(isinstance(value, int) and value > 0, f"{field} must be a positive integer, got {value!r}.")
        require(self.topk <= self.num_vectors, f"topk={self.topk} exceeds num_vectors={self.num_vectors}.")
        require(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout!r}.")
        require(self.init_vector_bank_bound > 0, "init_vector_bank_bound must be > 0 (a zero bank gets no gradient).")
        require(self.init_logits_std >= 0, f"init_logits_std must be >= 0, got {self.init_logits_std!r}.")


class VectorBank(nn.Module):
    """The bank (num_vectors, b) of one attach: a submodule of every member, so ``.to()`` moves it once."""

    def __init__(self, cfg: VBLoraConfig, factory: dict[str, Any]):
        super().__init__()
        bound = cfg.init_vector_bank_bound
        self.bank = nn.Parameter(torch.empty(cfg.num_vectors, cfg.vector_length, **factory).uniform_(-bound, bound))


def mix(logits: torch.Tensor, bank: torch.Tensor, k: int) -> torch.Tensor:
    """(..., num_vectors) logits -> (..., b) sub-vectors: Σ over the top k of softmax(top-k logits)·bank rows."""
    top, idx = logits.topk(k, dim=-1)  # (..., k)
    return (F.softmax(top, dim=-1).unsqueeze(-1) * bank[idx]).sum(-2)  # (..., b)


@register(
    "vblora",
    config=VBLoraConfig,
    paper="VB-LoRA: Extreme Parameter Efficient Fine-Tuning with Vector Banks",
    url="https://arxiv.org/abs/2405.15179",
    family="F2",
    params="r*num_vectors*(d_in+d_out)//vector_length",  # per layer; the bank adds num_vectors*vector_length
    identity_at_init=False,
    mergeable=True,
    layers=("linear", "conv1d"),  # PEFT's VB-LoRA wraps Linear and Conv1D only
)
class VBLora(AdapterModule):
    """x ↦ W₀x + B·(A·x), A and B composed from the shared bank by top-k admixture of per-layer logits."""

    peft_type = "VBLORA"
    shared_params: ClassVar[str] = "num_vectors*vector_length"  # the one bank of an attach

    def __init__(self, cfg: VBLoraConfig, shared: VectorBank, d_in: int, d_out: int, kind: str):
        super().__init__()
        self.config, self.shared = cfg, shared
        self.owner = True  # the attach's first layer saves the bank (from_bases clears it on the others)
        b, n, std, like = cfg.vector_length, cfg.num_vectors, cfg.init_logits_std, shared.bank
        self.logits_A = nn.Parameter(torch.randn(cfg.r, d_in // b, n).to(like) * std)  # (r, in/b, n)
        self.logits_B = nn.Parameter(torch.randn(d_out // b, cfg.r, n).to(like) * std)  # (out/b, r, n)
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 and kind != "embedding" else nn.Identity()

    @classmethod
    def from_base(cls, base: nn.Module, cfg: VBLoraConfig) -> VBLora:
        return cls.from_bases({"": base}, {"": cfg})[""]  # type: ignore[return-value]

    @classmethod
    def from_bases(cls, bases: Mapping[str, nn.Module], cfgs: Mapping[str, Any]) -> dict[str, AdapterModule]:
        """One bank per attach (rank_pattern changes r only, so every layer shares it); its first layer owns it."""
        banks: dict[tuple[Any, ...], VectorBank] = {}
        out: dict[str, AdapterModule] = {}
        for name, base in bases.items():
            (d_in, d_out), weight, c = L.dims(base), L.weight_out_in(base), cfgs[name]
            if d_in % c.vector_length or d_out % c.vector_length:
                raise ConfigError(
                    f"vblora vector_length={c.vector_length} must divide a targeted layer's d_in={d_in} and "
                    f"d_out={d_out}; pick a common divisor (e.g. {math.gcd(d_in, d_out)}) "
                    "or leave that layer out of targets."
                )
            factory = {"dtype": weight.dtype if weight.is_floating_point() else None, "device": weight.device}
            key = (c.num_vectors, c.vector_length, c.init_vector_bank_bound, *map(str, factory.values()))
            owner = key not in banks
            if owner:
                banks[key] = VectorBank(c, factory)
            out[name] = adapter = cls(c, banks[key], d_in, d_out, L.layer_kind(base))
            adapter.owner = owner
        return out

    def factors(self) -> LoraFactors:
        """A (r, in) from z_A's sub-vectors laid along in; B (out, r) from z_B's laid along out; scale 1."""
        bank, k, r = self.shared.bank, self.config.topk, self.config.r
        A = mix(self.logits_A, bank, k).reshape(r, -1)  # (r, in/b, b) -> (r, in)
        B = mix(self.logits_B, bank, k).transpose(1, 2).reshape(-1, r)  # (out/b, r, b) -> (out/b, b, r) -> (out, r)
        return LoraFactors(A, B, 1.0)

    def forward(self, x: torch.Tensor, base: nn.Module, y: torch.Tensor) -> torch.Tensor:
        f = self.factors()
        h = L.project_in(base, self.dropout(x), f.A)  # (..., r)
        return y + F.linear(h, f.B).to(y.dtype)  # (..., out)

    def delta_weight(self, base: nn.Module) -> torch.Tensor:
        f = self.factors()
        return L.to_base_layout(base, f.B @ f.A)  # (out, in) -> base layout

    def to_lora(self, base: nn.Module, rank: int | None = None) -> LoraFactors:
        """Exact (A, B composed from the bank); with ``rank`` or r > min(d_in, d_out), the best truncation."""
        with torch.no_grad():
            f = self.factors()
        return truncate(f, min(rank or self.config.r, f.A.shape[1], f.B.shape[0]))

    def export_state(self) -> dict[str, torch.Tensor]:
        return {"vblora_logits_A": self.logits_A, "vblora_logits_B": self.logits_B}

    def export_shared(self) -> dict[str, torch.Tensor]:
        """The bank under PEFT's full file key, from the attach's first layer only."""
        return {BANK_KEY: self.shared.bank} if self.owner else {}

    def import_shared(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            self.shared.bank.copy_(state[BANK_KEY])

    @staticmethod
    def peft_fields(cfg: VBLoraConfig) -> dict[str, Any]:
        fields = {n: getattr(cfg, n) for n in PEFT_NAMES}
        return fields | {"vblora_dropout": cfg.dropout, "save_only_topk_weights": False}

    @staticmethod
    def config_from_peft(fields: dict[str, Any]) -> VBLoraConfig | None:
        if fields.get("peft_type") != "VBLORA":
            return None
        if fields.get("save_only_topk_weights"):
            raise ConfigError("save_only_topk_weights=True (top-k indices only) is not loadable yet; save the logits.")
        return VBLoraConfig(
            dropout=fields.get("vblora_dropout", 0.0), **{n: fields[n] for n in PEFT_NAMES if n in fields}
        )
