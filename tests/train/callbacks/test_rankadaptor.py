"""The rankadaptor callback on a structurally pruned tiny Llama (each layer's MLP cut to a different width):
the probe holds the adapter still and the surgery leaves the output unchanged (1e-6); the chosen per-layer ranks
make the budget exactly, cost no more trainable parameters than uniform LoRA at the same total rank, and are the
performance model's best feasible config; the model fits its samples; PEFT loads the result with the same logits;
bad input is a clear error before the first step."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from torch import nn

import lorakit as lk
from lorakit.errors import ConfigError
from lorakit.testing import tiny_llama
from lorakit.train.callbacks.rankadaptor import RankAdaptorAllocator, layer_groups
from lorakit.train.loop import TrainConfig, train
from tests.helpers import logits
from tests.train.callbacks._allocators import (
    X,
    assert_option_refused,
    assert_peft_loads_same,
    assert_refused_before_first_step,
    ranks,
    records,
    train_capturing,
)

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::RuntimeWarning")]
TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]
KEEP = [128, 96, 48, 24]  # each layer's MLP width after pruning (of 128)


def pruned_llama(seed: int = 0) -> nn.Module:
    """tiny_llama with 4 layers whose MLPs keep the KEEP[l] intermediate channels of largest norm (gate and up
    rows, down columns), in fresh nn.Linear modules: a structurally pruned model."""
    model = tiny_llama(seed, layers=4)
    for layer, keep in zip(model.model.layers, KEEP, strict=True):
        mlp = layer.mlp
        norm = mlp.gate_proj.weight.norm(dim=1) + mlp.up_proj.weight.norm(dim=1) + mlp.down_proj.weight.norm(dim=0)
        idx = torch.sort(torch.topk(norm, keep).indices).values  # (keep,)
        hidden = mlp.gate_proj.in_features
        gate, up, down = (
            nn.Linear(hidden, keep, bias=False),
            nn.Linear(hidden, keep, bias=False),
            nn.Linear(keep, hidden, bias=False),
        )
        with torch.no_grad():
            gate.weight.copy_(mlp.gate_proj.weight[idx])  # (keep, hidden)
            up.weight.copy_(mlp.up_proj.weight[idx])  # (keep, hidden)
            down.weight.copy_(mlp.down_proj.weight[:, idx])  # (hidden, keep)
        mlp.gate_proj, mlp.up_proj, mlp.down_proj, mlp.intermediate_size = gate, up, down, keep
    return model.eval()


def trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    base = pruned_llama(0)
    torch.manual_seed(0)
    model = lk.attach(copy.deepcopy(base), lk.method_config("lora", r=4, alpha=8.0), targets=TARGETS)
    budget = 3 * len(ranks(model))  # uniform LoRA at r=3
    spec = f"rankadaptor:budget={budget},candidates=1|2|4|6,trials=40,probe=2"
    cfg = TrainConfig(steps=8, batch_size=4, lr=0.01, schedule="constant", seed=3, callbacks=(spec,))
    outputs: list[tuple[torch.Tensor, torch.Tensor]] = []
    allocate = RankAdaptorAllocator.allocate

    def watched(self, layers, optimizer=None):
        model.eval()
        before = logits(model, X)
        chosen = allocate(self, self.layers(model), optimizer)
        outputs.append((before, logits(model, X)))
        model.train()
        return chosen

    callback = train_capturing(
        RankAdaptorAllocator, model, cfg, tmp_path_factory.mktemp("run"), patches={"allocate": watched}
    )
    return base, model.eval(), budget, callback, outputs


def test_the_probe_holds_the_adapter_still_and_the_surgery_leaves_the_output_unchanged(run):
    base, _, _, callback, outputs = run
    assert len(outputs) == 1
    before, after = outputs[0]
    torch.testing.assert_close(after, before, atol=1e-6, rtol=0)
    torch.testing.assert_close(before, logits(base, X), atol=1e-6, rtol=0)  # B still 0 after the probe steps
    assert set(callback.grads) == {n for ms in callback.groups.values() for n in ms}


def test_the_chosen_ranks_make_the_budget_exactly_within_uniform_loras_parameters(run):
    base, model, budget, callback, _ = run
    final = ranks(model)
    assert sum(final.values()) == budget
    groups = layer_groups(list(final))
    assert list(groups) == [f"layers.{i}" for i in range(4)]
    for group, modules in groups.items():
        assert {final[m] for m in modules} == {callback.chosen[group]}  # one rank per layer
        assert callback.chosen[group] in callback.candidates
    uniform = lk.attach(copy.deepcopy(base), lk.method_config("lora", r=budget // len(final)), targets=TARGETS)
    assert sum(ranks(uniform).values()) == budget
    assert trainable(model) <= trainable(uniform)
    assert (logits(model, X) - logits(base, X)).abs().max() > 1e-3  # training moved the model


def test_the_performance_model_fits_its_samples_and_the_choice_is_its_best_feasible_config(run):
    _, _, budget, callback, _ = run
    assert len(callback.samples) == min(40, len(callback.pool)) and len(callback.pool) > 1
    assert callback.fit_r2 > 0.99
    energy = callback.energies()
    chosen = tuple(callback.chosen.values())
    best = max(callback.proxy(c, energy) for c in callback.pool)
    assert callback.proxy(chosen, energy) == pytest.approx(best, rel=1e-6)
    assert all(callback.proxy(c, energy) <= best + 1e-9 for c, _ in callback.samples)
    # the layer-wise widths matter: the parameter bound rules out configs that a width-blind choice could take
    n = [len(m) for m in callback.groups.values()]
    blind = [
        c
        for c in itertools.product(callback.candidates, repeat=4)
        if sum(k * r for k, r in zip(n, c, strict=True)) == budget
    ]
    assert len(blind) > len(callback.pool)


def test_the_saved_adapter_loads_in_peft_with_the_same_logits(run, tmp_path):
    base, model, _, _, _ = run
    assert_peft_loads_same(base, model, tmp_path / "ra", X)


@pytest.mark.parametrize(
    "spec, method, targets, match",
    [
        ("rankadaptor:budget=7,candidates=2|4", "lora", ["q_proj", "v_proj"], "no per-layer ranks"),
        ("rankadaptor:budget=8,candidates=2|64", "lora", ["q_proj", "v_proj"], "exceeds the narrowest"),
        ("rankadaptor:budget=8,probe=4", "lora", ["q_proj", "v_proj"], "probe=4 is at or after the end"),
        ("rankadaptor:budget=8", "lora", ["q_proj", "embed_tokens"], "is an embedding"),
        ("rankadaptor:budget=8", "adalora", ["q_proj", "v_proj"], "attach method 'lora'"),
    ],
)
def test_bad_input_is_a_clear_error_before_the_first_step(tmp_path, spec, method, targets, match):
    model = lk.attach(pruned_llama(0), lk.method_config(method, r=4), targets=targets)
    assert_refused_before_first_step(RankAdaptorAllocator, model, spec, match, tmp_path, hook="after_optimizer_step")


def test_a_trained_adapter_is_refused(tmp_path):
    from lorakit.testing import randomize_adapters

    model = lk.attach(pruned_llama(0), lk.method_config("lora", r=4), targets=["q_proj", "v_proj"])
    randomize_adapters(model, seed=1)
    cfg = TrainConfig(steps=4, batch_size=2, callbacks=("rankadaptor:budget=16,candidates=2|4",))
    with pytest.raises(ConfigError, match="B is not zero"):
        train(model, records(), cfg, out_dir=tmp_path, pad_id=0)


@pytest.mark.parametrize(
    "spec, match",
    [
        ("rankadaptor:budget=8,trials=0", "must be an integer >= 1"),
        ("rankadaptor:budget=0", "must be an integer >= 1"),
        ("rankadaptor:budget=8,probe=0", "must be an integer >= 1"),
        ("rankadaptor:budget=8,candidates=a|b", "candidates must be positive integers"),
        ("rankadaptor:budget=8,candidates=0|2", "candidates must be positive integers"),
    ],
)
def test_bad_options_are_errors_when_the_config_is_built(spec, match):
    assert_option_refused(spec, match)


def test_many_layers_sample_feasible_configs_instead_of_enumerating():
    """5 candidates over 12 layers (5¹² configs) are too many to enumerate: the pool is a seeded sample, each
    config making the budget exactly within uniform LoRA's parameters."""
    model = lk.attach(tiny_llama(0, layers=12), lk.method_config("lora", r=4), targets=["q_proj", "v_proj", "up_proj"])
    allocator = RankAdaptorAllocator(budget=4 * 36, candidates="1|2|4|8|16", trials=8)
    allocator.check(model, steps=10)
    pool = allocator.pool
    assert len(allocator.candidates) ** len(allocator.groups) > 20000 and len(pool) > 100
    assert len(set(pool)) == len(pool)
    for config in pool:
        assert sum(3 * r for r in config) == 4 * 36 and allocator.params(config) <= allocator.limit
