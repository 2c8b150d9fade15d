"""Elastic low-rank super-adapters (Neural Low-rank adapter Search), written once for ``lonas`` and ``shears``.

A plain ``lora`` adapter of rank r on each adapted module m is a weight-sharing super-adapter over an elastic rank
set {r_1 < ... < r_k ≤ r}: the sub-adapter with config c (a rank c_m from the set per module) is every module's
nested slice, h = W₀x + (α/c_m)·B[:, :c_m]·A[:c_m]·x (``Lora.rank_limit``, as DyLoRA). Each optimizer step draws c
(every c_m uniform on the set, a pure function of (seed, step, module index)) and trains only that slice:
components past c_m get zero gradients and are restored after the optimizer step (momentum and weight decay
included). After training, :func:`search` picks a config whose sub-adapter has at most ``budget`` trainable
parameters (Σ_m c_m·(d_in + d_out)) and the best ``evaluate`` score; :func:`extract` writes it as a standard PEFT
LoRA with per-module ``rank_pattern`` and the same ``lora_alpha`` — so its scale α/c_m is the slice's, exactly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import random
import re
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import safetensors.torch
import torch
from torch import nn

from lorakit.errors import ConfigError
from lorakit.inject import active_layers
from lorakit.io.atomic import atomic_dir
from lorakit.io.dirs import read_config, read_tensors
from lorakit.io.peft_format import CONFIG_NAME, PREFIX, WEIGHTS_NAME, require_plain_lora
from lorakit.methods.lowrank.lora import Lora
from lorakit.train.callbacks._api import Callback, TrainState

Config = dict[str, int]  # module name -> its rank in the sub-adapter
FACTOR_KEYS = ("lora_A.weight", "lora_B.weight", "lora_embedding_A", "lora_embedding_B")


def parse_ranks(name: str, ranks: Any) -> tuple[int, ...]:
    """``"2|4|8"`` (the CLI form), ``4`` or ``[2, 4, 8]`` -> the sorted elastic rank set, or a clear ConfigError."""
    items = str(ranks).split("|") if isinstance(ranks, (str, int)) and not isinstance(ranks, bool) else ranks
    if not isinstance(items, (list, tuple)) or not items or not all(str(p).strip().isdigit() for p in items):
        raise ConfigError(f"{name}: ranks must be positive integers separated by '|' (e.g. 2|4|8), got {ranks!r}.")
    values = tuple(sorted({int(p) for p in items}))
    if values[0] < 1:
        raise ConfigError(f"{name}: ranks must be positive integers separated by '|' (e.g. 2|4|8), got {ranks!r}.")
    return values


def elastic_adapters(model: nn.Module, name: str = "elastic") -> dict[str, Lora]:
    """Module -> the active plain ``lora`` adapter of every adapted layer, or a clear ConfigError."""
    found: dict[str, Lora] = {}
    for module, _, adapter in active_layers(model):
        if type(adapter) is not Lora:
            raise ConfigError(
                f"{name} trains elastic ranks of plain 'lora' adapters; {module} has a {type(adapter).method_name!r} "
                "adapter (no rank dimension to slice). Attach lk.method_config('lora', r=...) (--method lora)."
            )
        if adapter.b is not None or adapter.base_shift() is not None:
            raise ConfigError(
                f"{name}: {module}'s adapter has lora_bias or a base-rewriting init ({adapter.config.init!r}), so a "
                "rank slice is not a standalone LoRA; attach lora without lora_bias and with init='default'."
            )
        found[module] = adapter
    if not found:
        raise ConfigError(f"{name} found no active adapter; attach a 'lora' adapter before training.")
    return found


def sample_config(seed: int, step: int, modules: list[str], ranks: tuple[int, ...]) -> Config:
    """The sub-adapter step ``step`` trains: each module's rank uniform on ``ranks``, a pure function of (seed,
    step) (module i gets the i-th draw)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    picks = torch.randint(0, len(ranks), (len(modules),), generator=g).tolist()
    return {m: ranks[i] for m, i in zip(modules, picks, strict=True)}


def params(adapters: dict[str, Lora], config: Config) -> int:
    """Trainable parameters of the sub-adapter ``config``: Σ_m c_m·(d_in + d_out)."""
    return sum(config[m] * (a.A.shape[1] + a.B.shape[0]) for m, a in adapters.items())


@contextlib.contextmanager
def use_config(model: nn.Module, config: Config) -> Iterator[nn.Module]:
    """Run ``model`` as the sub-adapter ``config`` (every module at its rank limit) inside the block."""
    adapters = elastic_adapters(model)
    try:
        for m, a in adapters.items():
            a.rank_limit = config[m]
        yield model
    finally:
        for a in adapters.values():
            a.rank_limit = None


def check_budget(name: str, adapters: dict[str, Lora], ranks: tuple[int, ...], budget: int) -> None:
    """A ConfigError when no sub-adapter fits ``budget`` or it exceeds the largest one (the capacity)."""
    smallest = min(a.config.r for a in adapters.values())
    if ranks[-1] > smallest:
        raise ConfigError(f"{name}: the largest elastic rank {ranks[-1]} exceeds the attached rank r={smallest}.")
    low, high = (params(adapters, dict.fromkeys(adapters, r)) for r in (ranks[0], ranks[-1]))
    if isinstance(budget, bool) or not isinstance(budget, int) or not low <= budget <= high:
        raise ConfigError(
            f"{name}: budget={budget!r} must be an integer number of parameters between {low} (every module at rank "
            f"{ranks[0]}) and {high} (every module at rank {ranks[-1]}, the capacity)."
        )


def search(
    model: nn.Module,
    evaluate: Callable[[nn.Module], float],
    budget: int,
    ranks: Any,
    samples: int = 16,
    seed: int = 0,
) -> Config:
    """The config with the lowest ``evaluate(model)`` (run with the model at that config) among: the heuristic
    sub-adapter (the middle rank of the set everywhere), then ``samples`` seeded candidates, alternately random and
    a one-module mutation of the best so far; each candidate over ``budget`` parameters is lowered one rank level
    at a random module at a time until it fits, so every candidate (and the result) fits the budget."""
    ranks = parse_ranks("search", ranks)
    adapters = elastic_adapters(model, "search")
    check_budget("search", adapters, ranks, budget)
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 0:
        raise ConfigError(f"search: samples must be an integer >= 0, got {samples!r}.")
    rng, modules = random.Random(seed), list(adapters)

    def fit(c: Config) -> Config:
        while params(adapters, c) > budget:
            m = rng.choice([m for m in modules if c[m] > ranks[0]])
            c[m] = ranks[ranks.index(c[m]) - 1]
        return c

    scores: dict[tuple[int, ...], float] = {}
    best: Config = {}
    for i in range(samples + 1):
        if i == 0:
            c = dict.fromkeys(modules, ranks[len(ranks) // 2])
        elif i % 2 or not best:
            c = {m: rng.choice(ranks) for m in modules}
        else:
            c = {**best, rng.choice(modules): rng.choice(ranks)}
        c = fit(c)
        key = tuple(c[m] for m in modules)
        if key not in scores:
            with use_config(model, c), torch.no_grad():
                scores[key] = float(evaluate(model))
            if not best or scores[key] < scores[tuple(best[m] for m in modules)]:
                best = c
    return best


def extract(model_or_dir: nn.Module | str | Path, config: Config, out: str | Path) -> Path:
    """Write the sub-adapter ``config`` of a super-adapter (a model, or its saved dir) to ``out``: a standard PEFT
    LoRA, module m's first c_m components with ``rank_pattern`` c_m and the same ``lora_alpha``, whose outputs are
    the super-adapter's at ``config``. Returns ``out``."""
    if isinstance(model_or_dir, nn.Module):
        with tempfile.TemporaryDirectory() as tmp:
            from lorakit.io.adapter import save_adapter  # io.adapter loads the registry: only when needed

            return extract(save_adapter(model_or_dir, Path(tmp) / "super"), config, out)
    src = Path(model_or_dir)
    fields = read_config(src)
    require_plain_lora(fields, src, "extract takes a plain LoRA super-adapter dir (as lonas and shears train).")
    if fields.get("lora_bias") or fields.get("rank_pattern"):
        raise ConfigError(f"extract: {src} has lora_bias or a rank_pattern; a super-adapter has one rank r.")
    tensors, block = read_tensors(src / WEIGHTS_NAME)
    cut: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        suffix = next((x for x in FACTOR_KEYS if key.endswith(f".{x}")), None)
        module = None if suffix is None else key.removeprefix(PREFIX)[: -len(suffix) - 1]
        if module is not None:
            if module not in config:
                raise ConfigError(f"extract: the config has no rank for {module}; give one for every adapted module.")
            b = config[module]
            if not isinstance(b, int) or isinstance(b, bool) or not 1 <= b <= int(fields["r"]):
                raise ConfigError(f"extract: {module}'s rank must be an integer in [1, {fields['r']}], got {b!r}.")
            t = t[:b] if key.endswith(("lora_A.weight", "lora_embedding_A")) else t[:, :b]  # (b, in) / (out, b)
        cut[key] = t.contiguous()
    r = max(set(config.values()), key=list(config.values()).count)  # the most common rank: fewest patterns
    pattern = {re.escape(m): b for m, b in config.items() if b != r}
    fields = {**fields, "r": r, "rank_pattern": pattern}
    metadata: dict[str, Any] = {"format": "pt"}
    if block:
        metadata["lorakit"] = json.dumps({**block, "config": {**block.get("config", {}), "r": r}})
    with atomic_dir(out, marker=CONFIG_NAME) as tmp:
        (tmp / CONFIG_NAME).write_text(json.dumps(fields, indent=2) + "\n")
        safetensors.torch.save_file(cut, str(tmp / WEIGHTS_NAME), metadata=metadata)
    return Path(out)


def shrink(model: nn.Module, config: Config) -> None:
    """Replace every adapter by its sub-adapter at ``config`` in place (rank c_m, same alpha: the same outputs), so
    ``save_adapter`` writes what :func:`extract` would."""
    for m, wrapper, adapter in active_layers(model):
        old = cast(Lora, adapter)
        new = Lora.from_base(wrapper.base_layer, dataclasses.replace(old.config, r=config[m]))
        with torch.no_grad():
            new.A.copy_(old.A[: config[m]])  # (c_m, in)
            new.B.copy_(old.B[:, : config[m]])  # (out, c_m)
        wrapper.adapters[str(wrapper.active)] = new.train(old.training)


class ElasticLora(Callback):
    """The super-adapter training both callbacks share; with ``budget``, the search and shrink at the end."""

    name = "elastic"

    def __init__(self, ranks: Any, budget: int | None = None, samples: int = 16, eval_batches: int = 4):
        self.ranks = parse_ranks(self.name, ranks)
        for key, value, low in (("budget", budget, 1), ("samples", samples, 0), ("eval_batches", eval_batches, 1)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
                raise ConfigError(f"{self.name}: {key} must be an integer >= {low}, got {value!r}.")
        self.budget, self.samples, self.eval_batches = budget, samples, eval_batches
        self.config: Config = {}  # this step's sub-adapter; after a budgeted run, the one searched
        self.kept: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.batches: list[dict[str, torch.Tensor]] = []  # the last eval_batches micro-batches (for the search)
        self.hook: Any = None

    def check(self, model: nn.Module) -> dict[str, Lora]:
        adapters = elastic_adapters(model, self.name)
        if self.budget is None:
            check_budget(self.name, adapters, self.ranks, params(adapters, dict.fromkeys(adapters, self.ranks[0])))
        else:
            check_budget(self.name, adapters, self.ranks, self.budget)
        return adapters

    def on_step_begin(self, state: TrainState) -> None:
        adapters = self.check(state.model)
        if self.budget is not None and self.hook is None:
            self.hook = backbone(state.model).register_forward_pre_hook(self.keep_batch, with_kwargs=True)
        self.config = sample_config(state.config.seed, state.step, list(adapters), self.ranks)
        for m, a in adapters.items():
            a.rank_limit = self.config[m]

    def keep_batch(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None and torch.is_grad_enabled():  # a training forward, not the search's own
            mask = kwargs.get("attention_mask")
            self.batches = [*self.batches, {"input_ids": ids.detach(), "attention_mask": mask}][-self.eval_batches :]

    def after_backward(self, state: TrainState) -> None:
        for m, a in elastic_adapters(state.model, self.name).items():
            self.kept[m] = (a.A.detach().clone(), a.B.detach().clone())

    def after_optimizer_step(self, state: TrainState) -> None:
        with torch.no_grad():
            for m, a in elastic_adapters(state.model, self.name).items():
                A, B = self.kept.pop(m)
                a.A[self.config[m] :].copy_(A[self.config[m] :])  # components past c_m: as they were
                a.B[:, self.config[m] :].copy_(B[:, self.config[m] :])
                a.rank_limit = None

    def on_end(self, state: TrainState) -> None:
        for a in elastic_adapters(state.model, self.name).values():
            a.rank_limit = None
        if self.hook is not None:
            self.hook.remove()
        if self.budget is None:
            return
        batches, training = self.batches, state.model.training
        state.model.eval()  # no dropout while scoring
        score = lambda model: batch_loss(model, batches)  # noqa: E731
        self.config = search(state.model, score, self.budget, self.ranks, self.samples, state.config.seed)
        state.model.train(training)
        shrink(state.model, self.config)


def backbone(model: nn.Module) -> nn.Module:
    """The module every forward of the loop passes its batch to (``model.model`` of a Hugging Face LM)."""
    inner = getattr(model, str(getattr(model, "base_model_prefix", "")), None)
    return inner if isinstance(inner, nn.Module) else model


def batch_loss(model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> float:
    """Mean next-token loss of ``model`` on ``batches`` (padding, where the attention mask is 0, ignored)."""
    total = 0.0
    for b in batches:
        labels = (
            b["input_ids"]
            if b["attention_mask"] is None
            else b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)
        )
        total += float(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=labels).loss)
    return total / max(len(batches), 1)
