"""The lora2 callback (LoRA²): the orthogonality regulariser's gradient added in after_backward equals autograd of
the penalty; a run with orth > 0 drives ‖A₁A₂ᵀ‖ down (and below an orth = 0 run); importance pruning follows the
cubic schedule and ends at the budget exactly; removing the masked components leaves the outputs unchanged; the
saved adapter loads in PEFT with the same logits; bad input is a clear error before the first step."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

import lorakit as lk
from lorakit.inject import wrappers
from lorakit.testing import randomize_adapters, tiny_llama
from lorakit.train.callbacks._rank import cubic_budget
from lorakit.train.callbacks.lora2 import Lora2Allocator, orth_grads, orth_penalty
from lorakit.train.loop import TrainConfig
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
STEPS = 16


@pytest.mark.parametrize("r, split", [(4, 2), (5, 3)])
def test_the_closed_form_gradient_equals_autograd_of_the_penalty(r, split):
    g = torch.Generator().manual_seed(r)
    A = torch.randn(r, 7, generator=g, dtype=torch.float64, requires_grad=True)
    B = torch.randn(6, r, generator=g, dtype=torch.float64, requires_grad=True)
    orth_penalty(A, B, split).backward()
    gA, gB = orth_grads(A.detach(), B.detach(), split)
    torch.testing.assert_close(gA, A.grad)
    torch.testing.assert_close(gB, B.grad)


def test_after_backward_adds_orth_times_the_penalty_gradient_to_the_factors_grads():
    model = lk.attach(tiny_llama(1), lk.method_config("lora", r=5), targets=TARGETS)
    randomize_adapters(model, seed=1)  # nonzero B: both halves of the penalty count
    model.train()(X).logits.sum().backward()
    layers = [(n, w.adapters["default"]) for n, w in wrappers(model)]
    loss_grads = {n: (a.A.grad.clone(), a.B.grad.clone()) for n, a in layers}
    callback = Lora2Allocator(budget=12, orth=0.3)
    callback.check(model, steps=10)
    callback.after_backward(SimpleNamespace(model=model))
    for n, a in layers:
        A, B = a.A.detach().clone().requires_grad_(), a.B.detach().clone().requires_grad_()
        (0.3 * orth_penalty(A, B, 3)).backward()  # ⌈5/2⌉ = 3
        torch.testing.assert_close(a.A.grad, loss_grads[n][0] + A.grad)
        torch.testing.assert_close(a.B.grad, loss_grads[n][1] + B.grad)


def test_removing_masked_components_leaves_the_output_unchanged():
    model = lk.attach(tiny_llama(2), lk.method_config("lora", r=4, alpha=8.0), targets=TARGETS)
    randomize_adapters(model, seed=2)
    callback = Lora2Allocator(budget=10, orth=0.0)
    callback.check(model, steps=10)
    layers = callback.layers(model)
    scores = {n: torch.randn(4, generator=torch.Generator().manual_seed(i)) for i, (n, _, _) in enumerate(layers)}
    callback.masks = {
        n: torch.isin(torch.arange(4), s.argsort()[:2]) | (i % 2 == 0) for i, (n, s) in enumerate(scores.items())
    }  # even modules keep all 4, odd ones 2
    callback.apply(layers)
    before = logits(model.eval(), X)
    callback.on_end(SimpleNamespace(model=model, optimizer=None))
    torch.testing.assert_close(logits(model, X), before, atol=1e-6, rtol=0)
    assert ranks(model) == {n: int(m.sum()) for n, m in callback.masks.items()}


def _run(orth: float, budget: int, out):
    base = tiny_llama(0)
    torch.manual_seed(0)
    model = lk.attach(copy.deepcopy(base), lk.method_config("lora", r=4, alpha=8.0), targets=TARGETS)
    spec = f"lora2:budget={budget},orth={orth},t_init=2,t_final=4,delta_t=2"
    cfg = TrainConfig(steps=STEPS, batch_size=4, lr=0.01, schedule="constant", seed=3, callbacks=(spec,))
    callback = Lora2Allocator(budget, orth=orth)
    callback.check(model, STEPS)
    start = callback.orthogonality(callback.layers(model))
    later = {"on_end": lambda self, state: None}  # surgery later: ‖A₁A₂ᵀ‖ on the full A
    callback = train_capturing(Lora2Allocator, model, cfg, out, patches=later)
    end = callback.orthogonality(callback.layers(model))
    before = logits(model.eval(), X)
    Lora2Allocator.on_end(callback, SimpleNamespace(model=model, optimizer=None))
    torch.testing.assert_close(logits(model, X), before, atol=1e-6, rtol=0)  # the final surgery
    return base, model, callback, start, end


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    budget = 9  # of 6 modules × 4
    return budget, _run(1.0, budget, tmp_path_factory.mktemp("orth")), _run(0.0, budget, tmp_path_factory.mktemp("no"))


def test_the_regulariser_drives_the_two_loras_towards_orthogonal_planes(runs):
    _, (_, _, _, start, end), (_, _, _, start0, end0) = runs
    assert start == start0  # same seed, same init
    assert sum(end.values()) < 0.5 * sum(start.values())
    for name in start:
        assert end[name] < start[name]  # ‖A₁A₂ᵀ‖ falls with orth = 1
        assert end[name] < end0[name]  # and ends below the unregularised run's


def test_pruning_follows_the_cubic_schedule_and_ends_at_the_budget_exactly(runs):
    budget, (base, model, callback, _, _), _ = runs
    initial = 6 * 4
    ends = {"t_init": 2, "t_final": 4, "total": STEPS}
    expected = [(k, cubic_budget(k, initial=initial, final=budget, **ends)) for k in range(4, STEPS - 4, 2)]
    assert callback.history == expected + [(STEPS - 4, budget)]
    assert sum(ranks(model).values()) == budget
    assert min(ranks(model).values()) >= 1
    assert (logits(model, X) - logits(base, X)).abs().max() > 1e-3  # training moved the model


def test_the_saved_adapter_loads_in_peft_with_the_same_logits(runs, tmp_path):
    _, (base, model, _, _, _), _ = runs
    assert_peft_loads_same(base, model, tmp_path / "lora2", X)


@pytest.mark.parametrize(
    "spec, method, r, match",
    [
        ("lora2:budget=13", "lora", 3, "exceeds the attached capacity"),
        ("lora2:budget=3", "lora", 3, "below one rank for each of the 4 modules"),
        ("lora2:budget=6", "adalora", 3, "attach method 'lora'"),
        ("lora2:budget=6,t_init=2,t_final=2", "lora", 3, "after training ends"),
        ("lora2:budget=4", "lora", 1, "two LoRAs need r >= 2"),
    ],
)
def test_bad_input_is_a_clear_error_before_the_first_step(tmp_path, spec, method, r, match):
    model = four_modules(method, r=r)
    assert_refused_before_first_step(Lora2Allocator, model, spec, match, tmp_path)


@pytest.mark.parametrize(
    "spec, match",
    [
        ("lora2:budget=0", "must be an integer >= 1"),
        ("lora2:budget=8,delta_t=0", "must be an integer >= 1"),
        ("lora2:budget=8,t_init=-1", "must be an integer >= 0"),
        ("lora2:budget=8,orth=-0.5", "orth must be a finite number >= 0"),
    ],
)
def test_bad_options_are_errors_when_the_config_is_built(spec, match):
    assert_option_refused(spec, match)
