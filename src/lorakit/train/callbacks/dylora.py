"""dylora: DyLoRA — https://arxiv.org/abs/2210.07558 and QDyLoRA (the same on a 4-bit base).

Each optimizer step samples b ~ U{r_min, ..., r_max} (a pure function of the training seed and the step, so
runs and resumes repeat) and every active ``lora`` adapter runs as its nested rank-b slice:
h = W₀x + (α/b)·B[:, :b]·A[:b]·x (``Lora.rank_limit``, ``lowrank.nested_B``). Components past b get zero
gradients and are left exactly as they were by the optimizer step (momentum and weight decay included);
``frozen=True`` is the paper's frozen mode, which trains only the b-th component (components below b are kept
too). After the last step the adapters are full rank again; :func:`truncate` cuts the saved dir to any rank b
in [r_min, r_max] as a standard rank-b PEFT LoRA whose outputs equal the model at ``rank_limit = b``.

Scaling α/b (α/√b with rsLoRA): the paper's forward pass scales the rank-b slice by α/b, and with it a rank-b
truncation is an ordinary LoRA with the same ``lora_alpha`` and ``r = b`` — nothing in the saved config changes
but ``r``. QDyLoRA needs nothing more: on an NF4 base (``lk.quantize(model, "nf4")``) the same adapters train
through the quantized layers, and each truncation loads as a rank-b QLoRA adapter.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import nn

from lorakit.errors import ConfigError
from lorakit.inject import active_layers
from lorakit.io.atomic import atomic_dir
from lorakit.io.dirs import read_config, read_tensors
from lorakit.io.peft_format import CONFIG_NAME, WEIGHTS_NAME, require_plain_lora
from lorakit.methods.lowrank.lora import Lora
from lorakit.train.callbacks._api import Callback, TrainState, register_callback


def _active_lora(model: nn.Module) -> dict[str, Lora]:
    """Module name -> the active adapter of every adapted layer; a clear error for any that is not plain LoRA."""
    found: dict[str, Lora] = {}
    for name, _, adapter in active_layers(model):
        if type(adapter) is not Lora:
            raise ConfigError(
                f"dylora trains nested ranks of plain 'lora' adapters; {name} has a {type(adapter).__name__} adapter "
                "(no rank dimension DyLoRA can slice). Attach lk.method_config('lora', r=...) instead."
            )
        if adapter.b is not None:
            raise ConfigError(
                f"dylora: {name} has lora_bias, which is scaled by α/r and would change with the rank; "
                "attach the lora adapter without lora_bias."
            )
        if adapter.base_shift() is not None:
            raise ConfigError(
                f"dylora: {name}'s init ({adapter.config.init!r}) moved part of the base into the adapter, so a "
                "rank-b slice is not a standalone LoRA; use init='default' or 'gaussian'."
            )
        found[name] = adapter
    if not found:
        raise ConfigError("dylora found no active adapter; attach a 'lora' adapter before training.")
    return found


def sample_rank(seed: int, step: int, r_min: int, r_max: int) -> int:
    """The rank b of optimizer step ``step``: uniform on [r_min, r_max], a pure function of (seed, step)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return int(torch.randint(r_min, r_max + 1, (1,), generator=g))


@register_callback(
    "dylora",
    help="DyLoRA: each step trains every lora adapter at a rank b from r_min..r_max (nested, scale α/b); each "
    "rank-b truncation is a standard LoRA; QDyLoRA on an NF4 base. Options: r_min, r_max, frozen.",
)
class DyLora(Callback):
    def __init__(self, r_min: int = 1, r_max: int | None = None, frozen: bool = False) -> None:
        for key, value in (("r_min", r_min), ("r_max", r_max)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ConfigError(f"dylora: {key} must be a positive integer, got {value!r}.")
        if r_max is not None and r_min > r_max:
            raise ConfigError(f"dylora: r_min ({r_min}) must be <= r_max ({r_max}).")
        if not isinstance(frozen, bool):
            raise ConfigError(f"dylora: frozen must be true or false, got {frozen!r}.")
        self.r_min, self.r_max, self.frozen = r_min, r_max, frozen
        self.b = 0  # this step's rank
        self.kept: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # module -> (A, B) before the optimizer step

    def check(self, model: nn.Module) -> tuple[dict[str, Lora], int]:
        """The adapters and r_max, or a ConfigError before anything trains."""
        adapters = _active_lora(model)
        smallest = min(a.config.r for a in adapters.values())
        r_max = smallest if self.r_max is None else self.r_max
        if r_max > smallest:
            raise ConfigError(f"dylora: r_max={r_max} exceeds the smallest attached rank r={smallest}; lower r_max.")
        if self.r_min > r_max:
            raise ConfigError(f"dylora: r_min={self.r_min} exceeds r_max={r_max} (the attached rank); lower r_min.")
        return adapters, r_max

    def on_step_begin(self, state: TrainState) -> None:
        adapters, r_max = self.check(state.model)
        self.b = sample_rank(state.config.seed, state.step, self.r_min, r_max)
        for adapter in adapters.values():
            adapter.rank_limit = self.b

    def after_backward(self, state: TrainState) -> None:
        lo = self.b - 1 if self.frozen else 0  # the first component this step trains
        for name, adapter in _active_lora(state.model).items():
            if lo and adapter.A.grad is not None:
                adapter.A.grad[:lo] = 0  # frozen mode: only component b learns
            if lo and adapter.B.grad is not None:
                adapter.B.grad[:, :lo] = 0
            self.kept[name] = (adapter.A.detach().clone(), adapter.B.detach().clone())

    def after_optimizer_step(self, state: TrainState) -> None:  # right after the update, before anyone reads it
        lo = self.b - 1 if self.frozen else 0
        with torch.no_grad():
            for name, adapter in _active_lora(state.model).items():
                A, B = self.kept.pop(name)
                adapter.A[:lo].copy_(A[:lo])  # untrained components stay as they were
                adapter.A[self.b :].copy_(A[self.b :])
                adapter.B[:, :lo].copy_(B[:, :lo])
                adapter.B[:, self.b :].copy_(B[:, self.b :])
                adapter.rank_limit = None

    def on_end(self, state: TrainState) -> None:
        for adapter in _active_lora(state.model).values():
            adapter.rank_limit = None


def truncate(src: str | Path, rank: int, out: str | Path) -> Path:
    """Write the first ``rank`` components of the LoRA adapter dir ``src`` to ``out`` as a standard rank-``rank``
    PEFT LoRA (same ``lora_alpha``, so its scale is α/rank): for a DyLoRA-trained adapter, the model at rank
    ``rank``. Returns ``out``."""
    src = Path(src)
    fields = read_config(src)
    require_plain_lora(fields, src, "truncate takes a plain LoRA adapter dir (as DyLoRA saves).")
    tensors, block = read_tensors(src / WEIGHTS_NAME)
    if fields.get("lora_bias"):
        raise ConfigError(f"truncate: {src} has lora_bias, scaled by α/r, so no rank-b LoRA reproduces it.")
    ranks = [int(fields["r"]), *(int(v) for v in (fields.get("rank_pattern") or {}).values())]
    if not isinstance(rank, int) or not 1 <= rank <= min(ranks):
        raise ConfigError(f"truncate: rank must be an integer in [1, {min(ranks)}] for {src}, got {rank!r}.")
    cut: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        if key.endswith(("lora_A.weight", "lora_embedding_A")):
            t = t[:rank]  # (rank, in)
        elif key.endswith(("lora_B.weight", "lora_embedding_B")):
            t = t[:, :rank]  # (out, rank)
        cut[key] = t.contiguous()
    fields = {**fields, "r": rank, "rank_pattern": {}}
    metadata: dict[str, Any] = {"format": "pt"}
    if block:
        block = {**block, "config": {**block.get("config", {}), "r": rank}}
        metadata["lorakit"] = json.dumps(block)
    with atomic_dir(out, marker=CONFIG_NAME) as tmp:
        (tmp / CONFIG_NAME).write_text(json.dumps(fields, indent=2) + "\n")
        safetensors.torch.save_file(cut, str(tmp / WEIGHTS_NAME), metadata=metadata)
    return Path(out)
