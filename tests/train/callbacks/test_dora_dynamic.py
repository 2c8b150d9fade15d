"""The dora_dynamic callback (DoRA, dynamic rank distribution): the LoRA split into rank-1 components scored by
their share of ‖ΔW‖_F (EMA); the budget falls on the cubic schedule and pruning to budget B leaves exactly B
active components, the pruned ones contributing 0 (B columns held at 0) until surgery removes them with the
outputs unchanged; the dimensional equilibrium modulator's gradient matches autograd; the saved adapter loads in
PEFT; bad input is a clear error before the first step."""

from __future__ import annotations

import copy

import pytest
import torch

import lorakit as lk
from lorakit.testing import randomize_adapters, tiny_llama
from lorakit.train.callbacks._rank import cubic_budget
from lorakit.train.callbacks.dora_dynamic import (
    DoraDynamicAllocator,
    add_dimensional_equilibrium_gradient,
    component_shares,
    dimensional_equilibrium,
)
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
STEPS, T_INIT, T_FINAL = 14, 2, 3


def test_a_components_score_is_its_share_of_the_update_norm():
    g = torch.Generator().manual_seed(0)
    A, B = torch.randn(4, 12, generator=g), torch.randn(9, 4, generator=g)
    explicit = torch.stack([(B[:, i : i + 1] @ A[i : i + 1]).norm() for i in range(4)]) / (B @ A).norm()
    torch.testing.assert_close(component_shares(A, B), explicit, rtol=1e-5, atol=1e-6)


def test_the_dimensional_equilibrium_gradient_matches_autograd():
    model = lk.attach(tiny_llama(1), lk.method_config("lora", r=3), targets=TARGETS)
    randomize_adapters(model, seed=2)
    layers = DoraDynamicAllocator(budget=6).layers(model)
    (0.3 * dimensional_equilibrium(layers)).backward()
    expected = {id(p): p.grad.clone() for _, _, a in layers for p in (a.A, a.B)}
    start = {id(p): torch.randn(p.shape) for _, _, a in layers for p in (a.A, a.B)}  # .grad += adds to what is there
    for _, _, a in layers:
        for p in (a.A, a.B):
            p.grad = start[id(p)].clone()
    add_dimensional_equilibrium_gradient(layers, 0.3)
    for _, _, a in layers:
        for p in (a.A, a.B):
            torch.testing.assert_close(p.grad, start[id(p)] + expected[id(p)], rtol=1e-5, atol=1e-7)
    assert any(expected[id(a.B)].abs().max() > 0 for _, _, a in layers)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    base = tiny_llama(0)
    torch.manual_seed(0)
    model = lk.attach(copy.deepcopy(base), lk.method_config("lora", r=3, alpha=6.0), targets=TARGETS)
    initial, budget = 3 * len(ranks(model)), len(ranks(model)) + 3
    spec = f"dora_dynamic:budget={budget},every=2,t_init={T_INIT},t_final={T_FINAL},reg=0.1"
    cfg = TrainConfig(steps=STEPS, batch_size=4, lr=0.01, schedule="constant", seed=3, callbacks=(spec,))
    at_end: dict = {}
    on_end = DoraDynamicAllocator.on_end

    def end(self, state):
        layers = self.layers(state.model)
        at_end["masked_B"] = torch.cat([a.B[:, ~self.masks[n]].reshape(-1) for n, _, a in layers])
        at_end["active"] = sum(int(m.sum()) for m in self.masks.values())
        at_end["before"] = logits(state.model.eval(), X)
        on_end(self, state)
        at_end["after"] = logits(state.model, X)

    callback = train_capturing(
        DoraDynamicAllocator, model, cfg, tmp_path_factory.mktemp("run"), patches={"on_end": end}
    )
    return base, model.eval(), initial, budget, callback, at_end


def test_pruning_follows_the_cubic_schedule_down_to_exactly_the_budget(run):
    base, model, initial, budget, callback, at_end = run
    end = STEPS - T_FINAL
    assert [s for s, _, _ in callback.history] == [4, 6, 8, 10, 11]  # every 2 after t_init, and at T - t_final
    for step, b, active in callback.history:
        assert b == cubic_budget(step, initial=initial, final=budget, t_init=T_INIT, t_final=T_FINAL, total=STEPS)
        assert active == b  # exactly b(t) active components after each pruning
    assert callback.history[-1][:2] == (end, budget)
    assert at_end["active"] == budget and sum(ranks(model).values()) == budget  # exactly B, then B after surgery
    assert all(r >= 1 for r in ranks(model).values()) and len(set(ranks(model).values())) > 1
    assert (logits(model, X) - logits(base, X)).abs().max() > 1e-3  # training moved the model


def test_pruned_components_contribute_nothing_and_their_removal_leaves_the_outputs(run):
    _, _, initial, budget, _, at_end = run
    assert at_end["masked_B"].numel() > 0 and not at_end["masked_B"].any()  # held at 0 through training
    torch.testing.assert_close(at_end["after"], at_end["before"], atol=1e-6, rtol=0)


def test_the_saved_adapter_loads_in_peft_with_the_same_logits(run, tmp_path):
    base, model, *_ = run
    assert_peft_loads_same(base, model, tmp_path / "dora_dynamic", X)


@pytest.mark.parametrize(
    "spec, method, match",
    [
        ("dora_dynamic:budget=13", "lora", "exceeds the attached capacity"),
        ("dora_dynamic:budget=3", "lora", "below one rank for each of the 4 modules"),
        ("dora_dynamic:budget=6", "adalora", "attach method 'lora'"),
        ("dora_dynamic:budget=6,t_final=4", "lora", "after training ends"),
        ("dora_dynamic:budget=6,t_init=2,t_final=2", "lora", "after training ends"),
    ],
)
def test_bad_input_is_a_clear_error_before_the_first_step(tmp_path, spec, method, match):
    model = four_modules(method)
    assert_refused_before_first_step(DoraDynamicAllocator, model, spec, match, tmp_path, hook="after_optimizer_step")


@pytest.mark.parametrize(
    "spec, match",
    [
        ("dora_dynamic:budget=8,every=0", "every must be an integer >= 1"),
        ("dora_dynamic:budget=8,beta=1", "beta must be a number in"),
        ("dora_dynamic:budget=8,reg=-0.1", "reg must be a number >= 0"),
        ("dora_dynamic:budget=0", "budget must be an integer >= 1"),
        ("dora_dynamic:budget=8,t_final=x", "t_final must be an integer >= 0"),
    ],
)
def test_bad_options_are_errors_when_the_config_is_built(spec, match):
    assert_option_refused(spec, match)
