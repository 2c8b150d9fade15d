"""LoftQ: LoRA-Fine-Tuning-aware Quantization for Large Language Models — https://arxiv.org/abs/2310.08659
Update rule: for t = 1..T: Q ← q_N(W − s·B·A); s·B·A ← best rank-r approximation of W − Q (SVD); base ← Q.

The base becomes the quantized matrix Q (dequantized: the model stays full precision) and the adapter
starts at the rank-r part of the quantization error, so Q + s·B·A ≈ W, closer than Q(W) alone. q_N is the
reference blockwise quantizer (``lorakit/quant/_reference.py``, block 64): NF4 at 4 bits, whose bytes equal
bitsandbytes' (and PEFT's LoftQ), and the 2/3-bit normal grids. The iteration is PEFT's ``loftq_init``
step for step, so at 4 bits and α = r (s = 1) A and B equal PEFT's; for other α lorakit's s·B·A is PEFT's
B·A (PEFT leaves the scale out). Saved dirs say ``init_lora_weights="loftq"`` with ``loftq_config``: PEFT
(4 bits) and lorakit rebuild Q from the original W on load, then read A and B. To train on a really
quantized base, run LoftQ on the full-precision model and ``lk.quantize(model, "nf4")`` after: NF4 maps Q
onto itself, so the quantized base holds Q exactly. A saved dir loads onto a quantized base as it is (at 4
bits and one iteration Q = NF4(W), so the NF4-quantized original is that base).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from lorakit import layers as L
from lorakit.errors import ConfigError
from lorakit.init._api import InitContext, InitFactors, register_init
from lorakit.quant._reference import fake_quantize


@dataclass(frozen=True, kw_only=True)
class LoftqOptions:
    bits: int = 4
    """Bits of the base's quantization grid: 4 (NF4, as bitsandbytes), 3 or 2 (normal-float grids)."""
    iterations: int = 1
    """Alternating quantize / SVD steps T (PEFT's loftq_iter); 1 quantizes W itself."""

    def __post_init__(self) -> None:
        if self.bits not in (2, 3, 4):
            raise ConfigError(f"loftq: bits must be 2, 3 or 4, got {self.bits!r}.")
        if not (isinstance(self.iterations, int) and self.iterations >= 1):
            raise ConfigError(f"loftq: iterations must be an integer >= 1, got {self.iterations!r}.")


def loftq(
    W: torch.Tensor, r: int, bits: int = 4, iterations: int = 1
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(Q, Lf, Rf) with Q on the ``bits`` grid and Lf (out, r)·Rf (r, in) the rank-r SVD part of W − Q (float32)."""
    W = W.detach().float()  # (out, in)
    residual = W
    for t in range(iterations):
        Q = fake_quantize(residual, bits)  # (out, in)
        U, S, Vh = torch.linalg.svd(W - Q, full_matrices=False)
        Lf = U @ torch.sqrt(torch.diag(S)[:, :r])  # (out, r), as PEFT's _low_rank_decomposition
        Rf = torch.sqrt(torch.diag(S)[:r, :]) @ Vh  # (r, in)
        if t + 1 < iterations:
            residual = W - Lf @ Rf
    return Q, Lf, Rf


def peft_fields(opts: LoftqOptions) -> dict[str, Any]:
    return {"init_lora_weights": "loftq", "loftq_config": {"loftq_bits": opts.bits, "loftq_iter": opts.iterations}}


def reload(fields: dict[str, Any]) -> dict[str, Any] | None:
    """The options of a saved dir's LoftQ (PEFT's loftq_config), or None when it is not a LoftQ dir."""
    if fields.get("init_lora_weights") != "loftq":
        return None
    config = fields.get("loftq_config") or {}
    given = {"bits": config.get("loftq_bits", 4), "iterations": config.get("loftq_iter", 1)}
    return {k: v for k, v in given.items() if v != getattr(LoftqOptions(), k)}  # defaults left out, as when attached


@register_init(
    "loftq",
    options=LoftqOptions,
    paper="LoftQ: LoRA-Fine-Tuning-aware Quantization for Large Language Models",
    url="https://arxiv.org/abs/2310.08659",
    methods=("lora",),
    identity_at_init=False,
    peft=peft_fields,
    replaces_base=True,
    reload=reload,
)
def loftq_init(ctx: InitContext, opts: LoftqOptions) -> dict[str, InitFactors]:
    """Per layer: Q and the rank-r factors of W − Q; the base becomes Q, and s·B·A = Lf·Rf."""
    out = {}
    for name, t in ctx.targets.items():
        L.require_dense(t.base, f"init 'loftq' on {name}")
        Q, Lf, Rf = loftq(L.weight_out_in(t.base), t.r, opts.bits, opts.iterations)
        root = t.scale**0.5
        out[name] = InitFactors(Rf / root, Lf / root, base=Q)
    return out
