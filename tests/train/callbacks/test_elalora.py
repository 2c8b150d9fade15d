"""The elalora callback (ElaLoRA): ranks are pruned and expanded by gradient importance — the pruned components
are the lowest-scoring allowed ones and the expanded modules those of highest mean score — while the total rank
stays the budget; an expanded component contributes 0 at the expansion step (outputs unchanged to 1e-6 beyond
the masking of the pruned ones); the saved adapter loads in PEFT; bad input is a clear error before the first
step."""

from __future__ import annotations

import copy

import pytest
import torch

import lorakit as lk
from lorakit.inject import wrappers
from lorakit.testing import randomize_adapters, tiny_llama
from lorakit.train.callbacks._masking import apply_masks, lowest
from lorakit.train.callbacks.elalora import ElaLoraAllocator
from lorakit.train.loop import TrainConfig
from lorakit.train.optimizers.adamw import adamw
from tests.helpers import logits
from tests.train.callbacks._allocators import (
    TARGETS,
    X,
    assert_option_refused,
    assert_peft_loads_same,
    assert_refused_before_first_step,
    four_modules,
    ranks,
    train_capturing,
)

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::RuntimeWarning")]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    base = tiny_llama(0)
    torch.manual_seed(0)
    model = lk.attach(copy.deepcopy(base), lk.method_config("lora", r=2, alpha=4.0), targets=TARGETS)
    budget = 2 * len(ranks(model))
    spec = f"elalora:budget={budget},k=2,every=2,t_init=1,t_final=3"
    cfg = TrainConfig(steps=14, batch_size=4, lr=0.01, schedule="constant", seed=3, callbacks=(spec,))
    totals: list[int] = []
    adjust = ElaLoraAllocator.adjust

    def counted(self, layers, step, optimizer=None):
        grown = adjust(self, layers, step, optimizer)
        totals.append(sum(int(a.config.r) for _, _, a in self.layers(model)))
        return grown

    callback = train_capturing(
        ElaLoraAllocator, model, cfg, tmp_path_factory.mktemp("run"), patches={"adjust": counted}
    )
    return base, model.eval(), budget, callback, totals


def test_ranks_are_pruned_and_expanded_by_importance_at_a_constant_total(run):
    base, model, budget, callback, totals = run
    assert [step for step, *_ in callback.history] == [3, 5, 7, 9, 11]  # t_init < step <= 14 - t_final, every 2
    assert totals == [budget] * 5 and sum(ranks(model).values()) == budget  # exactly the budget, throughout
    assert ranks(model) != {n: 2 for n in ranks(model)}  # rank moved between modules
    fresh: dict[str, int] = {}
    for _, scores, pruned, grown in callback.history:
        assert sum(len(v) for v in pruned.values()) == len(grown) == 2
        gone = [float(scores[n][i]) for n, idx in pruned.items() for i in idx]
        left = {n: [i for i in range(s.numel()) if i not in pruned.get(n, [])] for n, s in scores.items()}
        allowed = [  # still prunable: not a module's last component, not grown at the previous adjustment
            float(scores[n][i])
            for n, idx in left.items()
            for i in idx
            if len(idx) > 1 and i < len(scores[n]) - fresh.get(n, 0)
        ]
        assert max(gone) <= min(allowed, default=float("inf"))  # the lowest importance goes
        means = {n: float(scores[n][idx].mean()) for n, idx in left.items()}
        assert sorted(grown, key=lambda n: -means[n]) == sorted(means, key=lambda n: -means[n])[:2]  # the best grow
        fresh = {n: grown.count(n) for n in grown}
    assert (logits(model, X) - logits(base, X)).abs().max() > 1e-3  # training moved the model


def test_an_expanded_component_contributes_nothing_at_the_expansion_step():
    model = lk.attach(tiny_llama(1), lk.method_config("lora", r=2, alpha=4.0), targets=TARGETS)
    randomize_adapters(model, seed=1)
    opt = adamw([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.0)
    allocator = ElaLoraAllocator(budget=12, k=2)
    allocator.check(model, steps=10)
    model.train()(X).logits.sum().backward()
    opt.step()
    layers = allocator.layers(model)
    allocator.update_sensitivity(layers)
    reference = copy.deepcopy(model)  # the same model with only the pruned components masked
    apply_masks(allocator.layers(reference), lowest(allocator.component_scores(layers), 2))
    expected = logits(reference.eval(), X)
    assert (expected - logits(model.eval(), X)).abs().max() > 1e-4  # the pruned components did contribute
    grown = allocator.adjust(layers, step=1, optimizer=opt)
    torch.testing.assert_close(logits(model, X), expected, atol=1e-6, rtol=0)
    adapters = {n: w.adapters["default"] for n, w in wrappers(model)}
    assert len(grown) == 2 and all(not adapters[n].B[:, -1].any() for n in grown)
    assert sum(a.config.r for a in adapters.values()) == 12
    model.train()(X).logits.sum().backward()
    opt.step()  # the optimizer steps the resized tensors


def test_the_saved_adapter_loads_in_peft_with_the_same_logits(run, tmp_path):
    base, model, _, _, _ = run
    assert_peft_loads_same(base, model, tmp_path / "ela", X)


@pytest.mark.parametrize(
    "spec, method, match",
    [
        ("elalora:budget=10", "lora", "budget is held constant"),
        ("elalora:budget=12,k=5", "lora", "k=5 components cannot move"),
        ("elalora:budget=12", "adalora", "attach method 'lora'"),
        ("elalora:budget=12,t_init=4", "lora", "after training ends"),
        ("elalora:budget=12,t_init=2,t_final=2", "lora", "after training ends"),
    ],
)
def test_bad_input_is_a_clear_error_before_the_first_step(tmp_path, spec, method, match):
    model = four_modules(method)
    assert_refused_before_first_step(ElaLoraAllocator, model, spec, match, tmp_path)


@pytest.mark.parametrize(
    "spec, match",
    [
        ("elalora:budget=8,k=0", "k must be an integer >= 1"),
        ("elalora:budget=8,every=0", "every must be an integer >= 1"),
        ("elalora:budget=8,t_init=-1", "t_init must be an integer >= 0"),
        ("elalora:budget=0", "budget must be an integer >= 1"),
        ("elalora:budget=8,beta1=1.5", "beta1"),
        ("elalora:budget=8,rate=2", "it takes"),
    ],
)
def test_bad_options_are_errors_when_the_config_is_built(spec, match):
    assert_option_refused(spec, match)
