"""The alora_alloc callback (ALoRA): AB-LoRA importance of each rank component by ablation on the step's batch
(kept by a forward pre-hook); the least important components are pruned and as many move to the most important
modules, the total rank constant; a moved component starts at 0 contribution (outputs unchanged to 1e-6 beyond
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
from lorakit.train.callbacks.alora_alloc import AloraAllocator, ablation_importance
from lorakit.train.data import collate
from lorakit.train.loop import TrainConfig, batch_indices
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
    records,
    train_capturing,
)

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::RuntimeWarning")]
PROMPT = 4  # records(prompt=PROMPT): prompts unsupervised, the labels are not the inputs


def batch(seed: int = 0) -> dict[str, torch.Tensor]:
    return collate(records(prompt=PROMPT)[seed : seed + 4], pad_id=0)


def test_importance_is_the_loss_increase_when_the_component_is_masked():
    model = lk.attach(tiny_llama(1), lk.method_config("lora", r=2, dropout=0.1), targets=TARGETS)
    randomize_adapters(model, seed=1)
    layers = AloraAllocator(budget=12).layers(model)
    weights = {n: a.B.detach().clone() for n, _, a in layers}
    scores = ablation_importance(model.train(), layers, (), batch())
    assert model.training and all(torch.equal(a.B, weights[n]) for n, _, a in layers)  # restored
    name, _, a = layers[3]
    with torch.no_grad():
        full = float(model.eval()(**batch()).loss)
        a.B[:, 1] = 0.0
        masked = float(model(**batch()).loss)
    assert scores[name][1].item() == pytest.approx(masked - full, abs=1e-6)
    assert all(s.abs().max() > 0 for s in scores.values())


def test_a_moved_component_starts_at_zero_contribution():
    model = lk.attach(tiny_llama(1), lk.method_config("lora", r=2, alpha=4.0), targets=TARGETS)
    randomize_adapters(model, seed=1)
    opt = adamw([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.0)
    allocator = AloraAllocator(budget=12, k=2)
    allocator.check(model, steps=10)
    allocator.batch = ((), batch())
    scores = ablation_importance(model, allocator.layers(model), (), batch())
    reference = copy.deepcopy(model)  # the same model with only the pruned components masked
    apply_masks(allocator.layers(reference), lowest(scores, 2))
    expected = logits(reference.eval(), X)
    assert (expected - logits(model.eval(), X)).abs().max() > 1e-4  # the pruned components did contribute
    grown = allocator.allocate(model, step=1, optimizer=opt)
    torch.testing.assert_close(logits(model, X), expected, atol=1e-6, rtol=0)
    adapters = {n: w.adapters["default"] for n, w in wrappers(model)}
    assert len(grown) == 2 and all(not adapters[n].B[:, -1].any() for n in grown)
    assert sum(a.config.r for a in adapters.values()) == 12
    model.train()(X).logits.sum().backward()
    opt.step()  # the optimizer steps the resized tensors


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    base = tiny_llama(0)
    torch.manual_seed(0)
    model = lk.attach(copy.deepcopy(base), lk.method_config("lora", r=2, alpha=4.0), targets=TARGETS)
    budget = 2 * len(ranks(model))
    cfg = TrainConfig(
        steps=12,
        batch_size=4,
        lr=0.01,
        schedule="constant",
        seed=3,
        callbacks=(f"alora_alloc:budget={budget},k=2,every=3,t_final=2",),
    )
    seen: list[tuple[int, dict, int]] = []  # (step, kept batch, total rank after)
    allocate = AloraAllocator.allocate

    def allocated(self, model_, step, optimizer=None):
        kept = dict(self.batch[1])
        grown = allocate(self, model_, step, optimizer)
        seen.append((step, kept, sum(ranks(model_).values())))
        return grown

    callback = train_capturing(
        AloraAllocator,
        model,
        cfg,
        tmp_path_factory.mktemp("run"),
        patches={"allocate": allocated},
        data=records(prompt=PROMPT),
    )
    return base, model.eval(), budget, callback, seen, cfg


def test_the_importance_is_measured_on_the_steps_own_batch(run):
    _, model, _, callback, seen, cfg = run
    assert [step for step, _, _ in seen] == [3, 6, 9]  # every 3 up to 12 - t_final
    data = records(prompt=PROMPT)
    for step, kept, _ in seen:
        idx = batch_indices(len(data), cfg.batch_size, step - 1, cfg.seed)  # the step that ended at `step`
        for key, value in collate([data[i] for i in idx], pad_id=0).items():
            assert torch.equal(kept[key].cpu(), value)
    assert not callback.hooks and not model.lm_head._forward_hooks and not model._forward_pre_hooks  # released


def test_the_least_important_components_move_to_the_most_important_modules(run):
    base, model, budget, callback, seen, _ = run
    assert [total for _, _, total in seen] == [budget] * 3 and sum(ranks(model).values()) == budget
    assert ranks(model) != {n: 2 for n in ranks(model)}
    fresh: dict[str, int] = {}
    for _, scores, pruned, grown in callback.history:
        assert sum(len(v) for v in pruned.values()) == len(grown) == 2
        gone = [float(scores[n][i]) for n, idx in pruned.items() for i in idx]
        left = {n: [i for i in range(s.numel()) if i not in pruned.get(n, [])] for n, s in scores.items()}
        allowed = [
            float(scores[n][i])
            for n, idx in left.items()
            for i in idx
            if len(idx) > 1 and i < len(scores[n]) - fresh.get(n, 0)
        ]
        assert max(gone) <= min(allowed, default=float("inf"))  # the least important go
        means = {n: float(scores[n][idx].mean()) for n, idx in left.items()}
        order = sorted(means, key=lambda n: (n in pruned, -means[n]))  # modules that lost none first (the paper)
        assert grown == order[:2]
        fresh = {n: grown.count(n) for n in grown}
    assert (logits(model, X) - logits(base, X)).abs().max() > 1e-3


def test_the_saved_adapter_loads_in_peft_with_the_same_logits(run, tmp_path):
    base, model, *_ = run
    assert_peft_loads_same(base, model, tmp_path / "alora", X)


@pytest.mark.parametrize(
    "spec, method, match",
    [
        ("alora_alloc:budget=13", "lora", "budget is held constant"),
        ("alora_alloc:budget=12,k=5", "lora", "k=5 components cannot move"),
        ("alora_alloc:budget=12", "adalora", "attach method 'lora'"),
        ("alora_alloc:budget=12,t_final=4", "lora", "after training ends"),
        ("alora_alloc:budget=12,t_init=3,t_final=1", "lora", "after training ends"),
    ],
)
def test_bad_input_is_a_clear_error_before_the_first_step(tmp_path, spec, method, match):
    model = four_modules(method)
    assert_refused_before_first_step(AloraAllocator, model, spec, match, tmp_path, data=records(prompt=PROMPT))


@pytest.mark.parametrize(
    "spec, match",
    [
        ("alora_alloc:budget=8,k=0", "k must be an integer >= 1"),
        ("alora_alloc:budget=8,every=-1", "every must be an integer >= 1"),
        ("alora_alloc:budget=8,t_init=1.5", "t_init must be an integer >= 0"),
        ("alora_alloc:budget=-2", "budget must be an integer >= 1"),
        ("alora_alloc:budget=8,beta1=0.9", "it takes"),
    ],
)
def test_bad_options_are_errors_when_the_config_is_built(spec, match):
    assert_option_refused(spec, match)
