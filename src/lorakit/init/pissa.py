"""PiSSA: Principal Singular Values and Singular Vectors Adaptation of LLMs — https://arxiv.org/abs/2404.02948
Update rule: W = U S Vᵀ; s·B·A = U_r S_r V_rᵀ (B = U_r √(S_r/s), A = √(S_r/s) V_rᵀ), base ← W − s·B·A.

The adapter trains the principal part of W while the frozen residual W_res = W − U_r S_r V_rᵀ keeps
the rest, so the model's outputs are unchanged at init. ``niter`` = N uses the randomized SVD
(``torch.svd_lowrank``, PEFT's ``init_lora_weights="pissa_niter_N"``) instead of the exact one.
Saved adapters are plain LoRA relative to the original W, of rank 2r (ΔW − U_r S_r V_rᵀ); see
``io/adapter.py``. Deleting or disabling the adapter leaves the residual base, as in PEFT.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lorakit import layers as L
from lorakit.errors import ConfigError
from lorakit.init._api import InitContext, InitFactors, register_init
from lorakit.lowrank import principal


@dataclass(frozen=True, kw_only=True)
class PissaOptions:
    niter: int | None = None
    """None: exact SVD of W; N: randomized SVD with N subspace iterations (PEFT's 'pissa_niter_N')."""

    def __post_init__(self) -> None:
        if not (self.niter is None or (isinstance(self.niter, int) and self.niter >= 0)):
            raise ConfigError(f"pissa: niter must be None (exact SVD) or an integer >= 0, got {self.niter!r}.")


def peft_fields(opts: PissaOptions) -> dict[str, Any]:
    return {"init_lora_weights": "pissa" if opts.niter is None else f"pissa_niter_{opts.niter}"}


@register_init(
    "pissa",
    options=PissaOptions,
    paper="PiSSA: Principal Singular Values and Singular Vectors Adaptation of Large Language Models",
    url="https://arxiv.org/abs/2404.02948",
    shifts_base=True,
    peft=peft_fields,
)
def pissa(ctx: InitContext, opts: PissaOptions) -> dict[str, InitFactors]:
    """A, B from the top-r SVD of each W, which then leaves the base (W ← W − s·B·A)."""
    out = {}
    for name, t in ctx.targets.items():
        d_in, d_out = L.dims(t.base)
        if t.r > min(d_in, d_out):
            raise ConfigError(
                f"pissa: r={t.r} exceeds min(d_in, d_out) = {min(d_in, d_out)} of {name} ({d_in}→{d_out}); "
                "lower r or leave that module out."
            )
        W = L.weight_out_in(t.base).detach().float()  # (out, in)
        U, S, Vh = principal(W, t.r, opts.niter)
        root = (S / t.scale).sqrt()  # (r,)
        out[name] = InitFactors(root[:, None] * Vh, U * root, shift=True)  # s·B·A = U_r S_r V_rᵀ
    return out
