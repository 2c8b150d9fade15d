"""The colora callback (CoLoRA, contribution-based): the measured contribution is the RMS of what each adapter adds
to its layer's output; the budget is apportioned to per-module ranks summing to it exactly (1 ≤ r ≤ cap, more
contribution never less rank); pruning equals zeroing the dropped components' B columns and growing leaves the
output unchanged (1e-6); the pattern is kept, read back by rank_pattern() and carried by the saved adapter that PEFT
loads with the same logits; bad input is a clear error before the first step."""

from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import pytest
import torch

import lorakit as lk
from lorakit.errors import ConfigError
from lorakit.inject import wrappers
from lorakit.testing import randomize_adapters, tiny_llama
from lorakit.train.callbacks.colora import CoLoraAllocator, apportion, rank_pattern
from lorakit.train.loop import TrainConfig
from tests.helpers import logits
from tests.train.callbacks._allocators import (
    TARGETS,
    X,
    assert_option_refused,
    assert_peft_loads_same,
    assert_refused_before_first_step,
    four_modules,
    train_capturing,
)

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::RuntimeWarning")]


@pytest.mark.parametrize("seed", range(4))
def test_apportioning_sums_to_the_budget_within_the_caps_and_follows_the_scores(seed):
    g = torch.Generator().manual_seed(seed)
    names = [f"m{i}" for i in range(7)]
    scores = dict(zip(names, torch.rand(7, generator=g).tolist(), strict=True))
    caps = dict(zip(names, torch.randint(1, 9, (7,), generator=g).tolist(), strict=True))
    for budget in range(7, sum(caps.values()) + 1):
        ranks = apportion(scores, budget, caps)
        assert sum(ranks.values()) == budget
        assert all(1 <= ranks[n] <= caps[n] for n in names)
        for a in names:  # more contribution never gets less rank, unless the other is capped
            for b in names:
                if scores[a] > scores[b] and ranks[a] < caps[a]:
                    assert ranks[a] >= ranks[b]
    with pytest.raises(ConfigError, match="must lie in"):
        apportion(scores, sum(caps.values()) + 1, caps)


def test_the_contribution_is_the_rms_of_what_each_adapter_adds_to_its_output():
    model = lk.attach(tiny_llama(1), lk.method_config("lora", r=3), targets=TARGETS).eval()
    randomize_adapters(model, seed=1)
    callback = CoLoraAllocator(budget=12, warmup=1)
    callback.check(model, steps=4)
    inputs: dict[str, torch.Tensor] = {}
    handles = [
        w.register_forward_hook(lambda m, args, out, n=n: inputs.__setitem__(n, args[0])) for n, w in wrappers(model)
    ]
    callback.measure(model)
    logits(model, X)
    callback.stop()
    for h in handles:
        h.remove()
    for name, w in wrappers(model):
        a = w.adapters["default"]
        delta = inputs[name] @ (a.scale * a.B @ a.A).T  # (2, 10, out)
        total, parts, n = callback.sums[name]
        assert n == 20
        torch.testing.assert_close(torch.tensor(total), delta.square().sum(), rtol=1e-5, atol=1e-7)
        per = (inputs[name] @ a.A.T).square().sum(dim=(0, 1)) * (a.scale * a.B).square().sum(dim=0)  # (r,)
        torch.testing.assert_close(parts, per.detach(), rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("grow", [False, True])
def test_the_surgery_prunes_like_zeroed_components_and_grows_with_outputs_unchanged(grow):
    model = lk.attach(tiny_llama(2), lk.method_config("lora", r=3, alpha=6.0), targets=TARGETS).eval()
    randomize_adapters(model, seed=2)
    budget = 24 if grow else 10  # 6 modules × 3 = 18 attached
    callback = CoLoraAllocator(budget=budget, warmup=1, grow=grow)
    callback.check(model, steps=4)
    callback.measure(model)
    logits(model, X)
    callback.stop()
    parts = {n: callback.sums[n][1].clone() for n in callback.sums}
    expected = copy.deepcopy(model)
    caps = {n: budget if grow else 3 for n in parts}
    scores = {n: (callback.sums[n][0] / callback.sums[n][2]) ** 0.5 for n in parts}
    want = apportion(scores, budget, caps)
    with torch.no_grad():
        for n, w in wrappers(expected):
            dropped = parts[n].argsort(descending=True, stable=True)[want[n] :]  # empty where it grows or stays
            w.adapters["default"].B[:, dropped] = 0.0
    pattern = callback.allocate(callback.layers(model))
    assert pattern == want == rank_pattern(model) and sum(pattern.values()) == budget
    assert any(r > 3 for r in pattern.values()) == grow  # grown above the attached r only with grow
    assert grow or any(r < 3 for r in pattern.values())
    torch.testing.assert_close(logits(model, X), logits(expected, X), atol=1e-6, rtol=0)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    base = tiny_llama(0)
    torch.manual_seed(0)
    model = lk.attach(copy.deepcopy(base), lk.method_config("lora", r=4, alpha=8.0), targets=TARGETS)
    budget = 15  # of 6 × 4
    cfg = TrainConfig(
        steps=10, batch_size=4, lr=0.01, schedule="constant", seed=3, callbacks=(f"colora:budget={budget},warmup=4",)
    )
    allocate = CoLoraAllocator.allocate
    at: list[int] = []

    def watch(self, layers, optimizer=None):
        at.append(sum(1 for h in self.hooks))
        return allocate(self, layers, optimizer)

    callback = train_capturing(CoLoraAllocator, model, cfg, tmp_path_factory.mktemp("run"), patches={"allocate": watch})
    return base, model.eval(), budget, callback, at


def test_a_run_maps_contributions_to_ranks_that_sum_to_the_budget(run):
    base, model, budget, callback, at = run
    assert at == [0]  # one allocation, the hooks removed before it
    assert callback.pattern == rank_pattern(model) and sum(callback.pattern.values()) == budget
    assert callback.pattern == apportion(callback.scores, budget, dict.fromkeys(callback.scores, 4))
    assert all(s > 0 for s in callback.scores.values())
    assert len(set(callback.pattern.values())) > 1  # the contributions differ, so do the ranks
    assert not any(m._forward_hooks for _, m in wrappers(model))
    assert (logits(model, X) - logits(base, X)).abs().max() > 1e-3  # training moved the model


def test_the_saved_adapter_carries_the_rank_pattern_and_loads_in_peft_with_the_same_logits(run, tmp_path):
    base, model, _, callback, _ = run
    path, theirs = assert_peft_loads_same(base, model, tmp_path / "colora", X)
    fields = json.loads((path / "adapter_config.json").read_text())
    saved = {n: fields["rank_pattern"].get(n, fields["r"]) for n in callback.pattern}
    assert saved == callback.pattern
    ranks = {n: theirs.get_submodule(f"base_model.model.{n}").r["default"] for n in callback.pattern}
    assert ranks == callback.pattern


def test_allocating_without_a_measured_contribution_is_an_error():
    callback = CoLoraAllocator(budget=4, warmup=2)
    with pytest.raises(RuntimeError, match="no contribution was measured"):
        model = lk.attach(tiny_llama(0), lk.method_config("lora", r=2), targets=["q_proj", "v_proj"])
        callback.check(model, steps=4)
        callback.after_optimizer_step(SimpleNamespace(model=model, step=2, optimizer=None))


@pytest.mark.parametrize(
    "spec, method, match",
    [
        ("colora:budget=13", "lora", "exceeds the attached capacity"),
        ("colora:budget=3", "lora", "below one rank for each of the 4 modules"),
        ("colora:budget=3,grow=true", "lora", "below one rank for each of the 4 modules"),
        ("colora:budget=6", "adalora", "attach method 'lora'"),
        ("colora:budget=6,warmup=4", "lora", "after the end of the 4-step run"),
    ],
)
def test_bad_input_is_a_clear_error_before_the_first_step(tmp_path, spec, method, match):
    model = four_modules(method)
    assert_refused_before_first_step(CoLoraAllocator, model, spec, match, tmp_path, hook="after_optimizer_step")


@pytest.mark.parametrize(
    "spec, match",
    [
        ("colora:budget=0", "must be an integer >= 1"),
        ("colora:budget=8,warmup=0", "must be an integer >= 1"),
        ("colora:budget=8,grow=3", "grow must be true or false"),
    ],
)
def test_bad_options_are_errors_when_the_config_is_built(spec, match):
    assert_option_refused(spec, match)
