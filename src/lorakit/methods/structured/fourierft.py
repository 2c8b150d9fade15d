"""FourierFT: Parameter-Efficient Fine-Tuning with Discrete Fourier Transform — https://arxiv.org/abs/2405.03003
Update rule: h = W₀x + α·Re(IDFT2(S))·x, S (d_out×d_in) zero but for n trained coefficients at fixed random entries.

As PEFT's FourierFT: the n entries are the first n of a random permutation of the d_out·d_in
positions (a CPU generator seeded with ``random_loc_seed``, rows = p // d_in, columns = p % d_in),
regenerated on attach and load (never saved); IDFT2 is torch.fft.ifft2 (1/(d_out·d_in) normalised),
computed in float32. Wraps nn.Linear and GPT-2's Conv1D, as PEFT.

Init: the paper and PEFT's default draw the coefficients N(0, 1) (init='gaussian'); lorakit starts them
at 0 (PEFT's init_weights=True), so the model starts as the base. The random ΔW has entries of about
α·√(n/2)/(d_out·d_in): ≈0.01 on a 576×576 SmolLM2 layer at the defaults, comparable to W itself on
small layers (≈0.8 on a 64×64 one), which a short fine-tune has to undo first.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lorakit import layers as L
from lorakit.errors import ConfigError
from lorakit.lowrank import factorize
from lorakit.methods._api import AdapterModule, LoraFactors, register, require

INITS = ("gaussian", "zeros")


@dataclass(frozen=True, kw_only=True)
class FourierFTConfig:
    n_frequency: int = 1000
    """Number of trained spectral coefficients per layer (≤ d_in·d_out); PEFT's and the paper's NLU default."""
    scaling: float = 150.0
    """α, the scale of ΔW (PEFT's default; the paper uses 300 for LLaMA instruction tuning)."""
    random_loc_seed: int = 777
    """Seed of the random choice of spectral entries (PEFT regenerates them from it, so keep it)."""
    init: str = "zeros"
    """'zeros' (the model starts as the base; PEFT's init_weights=True) or 'gaussian' (N(0, 1), PEFT's default)."""

    def __post_init__(self) -> None:
        require(
            isinstance(self.n_frequency, int) and self.n_frequency > 0,
            f"n_frequency must be a positive integer, got {self.n_frequency!r}.",
        )
        require(isinstance(self.random_loc_seed, int), "random_loc_seed must be an integer seed.")
        require(self.init in INITS, f"init must be one of {INITS}, got {self.init!r}.")


def spectral_indices(d_out: int, d_in: int, n: int, seed: int) -> torch.Tensor:
    """(2, n) row/column indices of the trained coefficients, drawn exactly as PEFT draws them."""
    flat = torch.randperm(d_out * d_in, generator=torch.Generator().manual_seed(seed))[:n]  # (n,)
    return torch.stack([flat // d_in, flat % d_in])  # (2, n)


@register(
    "fourierft",
    config=FourierFTConfig,
    paper="FourierFT: Parameter-Efficient Fine-Tuning with Discrete Fourier Transform",
    url="https://arxiv.org/abs/2405.03003",
    family="F2",
    params="n_frequency",
    layers=("linear", "conv1d"),  # as PEFT's FourierFT
)
class FourierFT(AdapterModule):
    """x ↦ W₀x + ΔW·x with ΔW = α·Re(ifft2(S)) (out, in), S scattered from the trained spectrum (n,)."""

    peft_type = "FOURIERFT"
    indices: torch.Tensor

    def __init__(self, cfg: FourierFTConfig, d_in: int, d_out: int, weight: torch.Tensor):
        super().__init__()
        self.config, self.d_in, self.d_out = cfg, d_in, d_out
        idx = spectral_indices(d_out, d_in, cfg.n_frequency, cfg.random_loc_seed).to(weight.device)
        self.register_buffer("indices", idx, persistent=False)  # (2, n), regenerated from the seed
        dtype = weight.dtype if weight.is_floating_point() else None
        spectrum = torch.randn(cfg.n_frequency) if cfg.init == "gaussian" else torch.zeros(cfg.n_frequency)
        self.fourierft_spectrum = nn.Parameter(spectrum.to(device=weight.device, dtype=dtype))  # (n,)

    @classmethod
    def from_base(cls, base: nn.Module, cfg: FourierFTConfig) -> FourierFT:
        d_in, d_out = L.dims(base)
        if cfg.n_frequency > d_in * d_out:
            raise ConfigError(
                f"fourierft n_frequency={cfg.n_frequency} exceeds the {d_in * d_out} entries of a targeted layer "
                f"(d_in={d_in}, d_out={d_out}); lower n_frequency or leave that layer out of targets."
            )
        weight: torch.Tensor = base.weight  # type: ignore[assignment]
        return cls(cfg, d_in, d_out, weight)

    def delta_out_in(self, base: nn.Module) -> torch.Tensor:
        """ΔW (out, in) in the spectrum's dtype; the transform itself runs in float32 (ifft2 lacks half types)."""
        spectrum = self.fourierft_spectrum
        dense = torch.zeros(self.d_out, self.d_in, device=spectrum.device)  # (out, in)
        dense[self.indices[0], self.indices[1]] = spectrum.float()
        return (torch.fft.ifft2(dense).real * self.config.scaling).to(spectrum.dtype)  # (out, in)

    def forward(self, x: torch.Tensor, base: nn.Module, y: torch.Tensor) -> torch.Tensor:
        delta = self.delta_out_in(base)  # (out, in)
        return y + torch.nn.functional.linear(x.to(delta.dtype), delta).to(y.dtype)  # (..., out)

    def to_lora(self, base: nn.Module, rank: int | None = None) -> LoraFactors:
        """Exact at rank min(2n, d_in, d_out) (each frequency adds a real rank ≤ 2); else the best rank-``rank``."""
        with torch.no_grad():
            full = min(2 * self.config.n_frequency, self.d_in, self.d_out)
            return factorize(self.delta_out_in(base), min(rank or full, full))

    def export_state(self) -> dict[str, torch.Tensor]:
        return {"fourierft_spectrum": self.fourierft_spectrum}

    @staticmethod
    def peft_fields(cfg: FourierFTConfig) -> dict[str, Any]:
        return {
            "n_frequency": cfg.n_frequency,
            "scaling": cfg.scaling,
            "random_loc_seed": cfg.random_loc_seed,
            "init_weights": cfg.init == "zeros",
            "n_frequency_pattern": {},
        }

    @staticmethod
    def config_from_peft(fields: dict[str, Any]) -> FourierFTConfig | None:
        if fields.get("peft_type") != "FOURIERFT":
            return None
        require(
            not fields.get("n_frequency_pattern"),
            f"n_frequency_pattern={fields.get('n_frequency_pattern')!r} (per-layer n_frequency) is not supported "
            "by lorakit yet; re-save the adapter with one n_frequency for all layers.",
        )
        return FourierFTConfig(
            n_frequency=int(fields.get("n_frequency", 1000)),
            scaling=float(fields.get("scaling", 150.0)),
            random_loc_seed=int(fields.get("random_loc_seed", 777)),
            init="zeros" if fields.get("init_weights", False) else "gaussian",
        )
