"""PLoP: Precise LoRA Placement for Efficient Finetuning of Large Models — https://arxiv.org/abs/2506.20629
Score: NFN(type) = Σ_{m∈type} Σ_t ‖W_m ẑ_t‖ / Σ_{m∈type} Σ_t ‖W_m ε̂_t‖, ẑ = z/‖z‖, ε̂ = ε/‖ε‖, ε ~ N(0, I);
targets = the k module types of lowest NFN.

The Normalised Feature Norm measures how aligned a module's weights W are with its inputs z on the finetuning
data: ‖W ẑ‖ of the data's (unit) input directions against ‖W ε̂‖ of random unit directions, the same number of
them. The paper's analysis (feature-norm growth under training comes from this alignment) reads a low NFN as a
module type the pretrained model has not yet aligned to the task, hence where an adapter helps most; PLoP adapts
the module types of lowest NFN. One forward of the base model per batch, no gradient.

Here: every module ``all-linear`` selects (less ``exclude``) is a candidate; the hook sees its input z (B, T, d_in)
and keeps the tokens the attention mask marks (padding excluded); W·x is the layer's own linear part
``layer(x) − layer(0)`` (bias removed), so Linear, GPT-2's Conv1D and quantized layers score alike. A module's
two sums run over every token of every batch, a type's sums over its modules (as the paper's reference code:
the ratio of the summed norms, not the mean of per-layer ratios). The random directions are drawn once per
(batch, d_in) from a generator seeded by ``seed`` (:func:`probe_directions`), shared by the modules of the same
input width: the scores are the same for the same seed and batches.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from lorakit.errors import ConfigError
from lorakit.inject import logical_modules
from lorakit.train.placement._api import Batch, Placement, candidates, forward_batch, module_type, register_placement


def probe_directions(seed: int, batch: int, n: int, d: int) -> torch.Tensor:
    """The random unit directions ε̂ (n, d) of the baseline for batch number ``batch``: ε ~ N(0, I) from a CPU
    generator seeded by (seed, batch, d), each row divided by its norm."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + batch * 65_537 + d)
    eps = torch.randn(n, d, generator=gen, dtype=torch.float32)  # (n, d)
    return eps / eps.norm(dim=-1, keepdim=True)


def _rows(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The rows (N, d) of x (B, T, d) that ``mask`` (B, T) marks; every row when there is no such mask."""
    return x[mask] if mask is not None and x.shape[:-1] == mask.shape else x.reshape(-1, x.shape[-1])


def feature_norms(
    model: nn.Module, batches: Sequence[Batch], *, seed: int = 0, exclude: Sequence[str] | None = None
) -> dict[str, tuple[float, float]]:
    """{module name: (Σ_t ‖W ẑ_t‖, Σ_t ‖W ε̂_t‖)} over the valid tokens of ``batches``, for every candidate.

    ‖W ẑ‖ = ‖W z‖ / ‖z‖ comes from the layer's own output (its bias, ``layer(0)``, taken off); the random term
    runs the layer once more on the probes (through ``layer.forward``: its hooks do not run)."""
    names = candidates(model, exclude)
    layers = dict(logical_modules(model))
    sums = {name: [0.0, 0.0] for name in names}
    state: dict[str, Any] = {}

    def hook(name: str) -> Any:
        def run(layer: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> None:
            z = _rows(args[0].detach(), state["mask"])  # (N, d_in): the real tokens
            n, d_in = z.shape
            probes = probe_directions(seed, state["batch"], n, d_in).to(z.device, z.dtype)  # (N, d_in)
            zero = layer.forward(torch.zeros_like(z[:1])).float()  # (1, d_out): the bias
            wz = _rows(out.detach(), state["mask"]).float() - zero  # (N, d_out): W·z
            sums[name][0] += float((wz.norm(dim=-1) / z.float().norm(dim=-1).clamp_min(1e-12)).sum())
            sums[name][1] += float((layer.forward(probes).float() - zero).norm(dim=-1).sum())

        return run

    handles = [layers[name].register_forward_hook(hook(name)) for name in names]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for j, batch in enumerate(batches):
                mask = batch.get("attention_mask")
                state["batch"] = j
                state["mask"] = mask.bool().to(next(model.parameters()).device) if mask is not None else None
                forward_batch(model, {k: v for k, v in batch.items() if k != "labels"})
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return {name: (a, r) for name, (a, r) in sums.items()}


def nfn_scores(
    model: nn.Module, batches: Sequence[Batch], *, seed: int = 0, exclude: Sequence[str] | None = None
) -> dict[str, float]:
    """{module type: NFN} — the ratio of the type's summed data and random feature norms (lower: less aligned)."""
    totals: dict[str, list[float]] = {}
    for name, (actual, random) in feature_norms(model, batches, seed=seed, exclude=exclude).items():
        pair = totals.setdefault(module_type(name), [0.0, 0.0])
        pair[0], pair[1] = pair[0] + actual, pair[1] + random
    return {kind: actual / random if random > 0 else float("inf") for kind, (actual, random) in totals.items()}


@register_placement(
    "plop",
    help="PLoP: adapt the k module types of lowest Normalised Feature Norm (alignment of weights and data) on a "
    "few training batches. Options: k (module types, default 2).",
)
class PLoP(Placement):
    name = "plop"

    def __init__(self, k: int = 2):
        """``k``: how many module types to adapt (the k lowest NFN scores)."""
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ConfigError(f"placement plop: k must be a positive integer (module types to adapt), got {k!r}.")
        self.k = k
        self.scores: dict[str, float] = {}
        """The last :meth:`choose`'s NFN per module type."""

    def choose(
        self, model: nn.Module, batches: Sequence[Batch], *, seed: int = 0, exclude: Sequence[str] | None = None
    ) -> list[str]:
        self.scores = nfn_scores(model, batches, seed=seed, exclude=exclude)
        if self.k > len(self.scores):
            raise ConfigError(
                f"placement plop: k={self.k} but the model has only {len(self.scores)} module types to choose "
                f"from ({', '.join(sorted(self.scores))})."
            )
        ranked = sorted(self.scores, key=lambda kind: (self.scores[kind], kind))  # lowest NFN first; ties by name
        return ranked[: self.k]
