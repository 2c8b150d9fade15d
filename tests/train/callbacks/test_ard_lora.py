"""The ard_lora callback: the ℓ1 + total-variation regulariser's gradient matches autograd; the gates B·diag(g) are
exact (outputs, and the chain rule to B and g); folding g into B and removing zero-gate components leave outputs
unchanged (1e-6); a run shrinks the effective rank (#|g| > threshold), keeps exactly the budget's largest gates and
saves an adapter PEFT loads with the same logits; bad input is a clear error before the first step."""

from __future__ import annotations

import copy

import pytest
import torch

import lorakit as lk
from lorakit.inject import wrappers
from lorakit.testing import randomize_adapters, tiny_llama
from lorakit.train.callbacks._rank import top_k
from lorakit.train.callbacks.ard_lora import ArdLoraAllocator, regulariser, regulariser_grad
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


def random_groups(seed: int) -> list[list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    sizes = [[4, 4, 4], [2, 3], [5]]  # three module types over layers (one of a single layer)
    return [[(torch.randn(r, generator=g) * 0.8 + 0.3).requires_grad_(True) for r in rs] for rs in sizes]


@pytest.mark.parametrize("l1, tv", [(1e-3, 1e-3), (0.5, 0.0), (0.0, 2.0), (0.3, 0.7)])
def test_the_regulariser_gradient_matches_autograd(l1, tv):
    for seed in range(5):
        groups = random_groups(seed)
        flat = [g for gs in groups for g in gs]
        auto = torch.autograd.grad(regulariser(groups, l1, tv), flat)
        mine = [d for ds in regulariser_grad(groups, l1, tv) for d in ds]
        for a, b in zip(auto, mine, strict=True):
            torch.testing.assert_close(b, a, atol=1e-7, rtol=1e-6)


def test_the_regulariser_shrinks_the_gates_and_pulls_neighbouring_layers_together():
    groups = random_groups(0)
    with torch.no_grad():
        for gs in groups:
            for g in gs:
                g.abs_()
    l1_only = regulariser_grad(groups, 1.0, 0.0)
    tv_only = regulariser_grad(groups, 0.0, 1.0)
    step = 1e-3
    shrunk = [[g - step * d for g, d in zip(gs, ds, strict=True)] for gs, ds in zip(groups, l1_only, strict=True)]
    assert regulariser(shrunk, 1.0, 0.0) < regulariser(groups, 1.0, 0.0)
    smooth = [[g - step * d for g, d in zip(gs, ds, strict=True)] for gs, ds in zip(groups, tv_only, strict=True)]
    assert regulariser(smooth, 0.0, 1.0) < regulariser(groups, 0.0, 1.0)


def test_the_gates_are_exact_in_outputs_and_gradients():
    """With gates g the model equals a plain LoRA of B·diag(g), and autograd's gradients are the chain rule:
    ∂L/∂g_i = Σ_o B_oi·∂L/∂(Bg)_oi and ∂L/∂B = ∂L/∂(Bg)·diag(g) (the fused training path included)."""
    model = lk.attach(tiny_llama(1), lk.method_config("lora", r=4), targets=TARGETS)
    randomize_adapters(model, seed=1)
    allocator = ArdLoraAllocator(budget=12)
    gen = torch.Generator().manual_seed(3)
    gates = {n: torch.rand(4, generator=gen) + 0.5 for n, _ in wrappers(model)}
    plain = copy.deepcopy(model)
    with torch.no_grad():
        for n, w in wrappers(plain):
            w.adapters["default"].B.mul_(gates[n])  # B·diag(g)
    allocator.install(allocator.layers(model))
    with torch.no_grad():
        for n, g in allocator.gates.items():
            g.copy_(gates[n])
    torch.testing.assert_close(logits(model.eval(), X), logits(plain.eval(), X), atol=1e-6, rtol=0)
    model.train()(X).logits.square().mean().backward()
    plain.train()(X).logits.square().mean().backward()
    theirs = dict(wrappers(plain))
    for name, _, a in allocator.modules:
        eff = theirs[name].adapters["default"].B  # (out, r) the plain model's B·diag(g)
        original = a.parametrizations.B.original
        torch.testing.assert_close(
            allocator.gates[name].grad, (original.detach() * eff.grad).sum(0), atol=1e-6, rtol=1e-5
        )
        torch.testing.assert_close(original.grad, eff.grad * gates[name], atol=1e-7, rtol=1e-5)


def test_folding_the_gates_and_removing_zero_gate_components_leave_the_outputs_unchanged():
    model = lk.attach(tiny_llama(1), lk.method_config("lora", r=4), targets=TARGETS)
    randomize_adapters(model, seed=1)
    names = [n for n, _ in wrappers(model)]
    allocator = ArdLoraAllocator(budget=4 * len(names) - 7)
    allocator.install(allocator.layers(model))
    gen = torch.Generator().manual_seed(4)
    zeros = {names[0]: [1, 3], names[1]: [0], names[3]: [0, 1, 2], names[5]: [2]}  # 7 components switched off
    with torch.no_grad():
        for n, g in allocator.gates.items():
            g.copy_(torch.rand(4, generator=gen) + 0.2)
            g[zeros.get(n, [])] = 0.0
    before = logits(model.eval(), X)
    gated = {n: a.B.detach().clone() for n, _, a in allocator.modules}  # B·diag(g) as the forward sees it
    final = allocator.finish(None)
    assert final == {n: 4 - len(zeros.get(n, [])) for n in names} == ranks(model)
    torch.testing.assert_close(logits(model, X), before, atol=1e-6, rtol=0)
    for n, w in wrappers(model):
        a = w.adapters["default"]
        assert type(a).__name__ == "Lora" and isinstance(a.B, torch.nn.Parameter)
        kept = [i for i in range(4) if i not in zeros.get(n, [])]
        torch.testing.assert_close(a.B, gated[n][:, kept], atol=0, rtol=0)  # the fold: B ← B·diag(g)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    base = tiny_llama(0)
    torch.manual_seed(0)
    model = lk.attach(copy.deepcopy(base), lk.method_config("lora", r=4, alpha=8.0), targets=TARGETS)
    budget = 4 * len(ranks(model)) - 9
    spec = f"ard_lora:budget={budget},l1=0.05,tv=0.05,threshold=0.95,gate_lr=0.02"
    cfg = TrainConfig(steps=8, batch_size=4, lr=0.01, schedule="constant", seed=3, callbacks=(spec,))
    callback = train_capturing(ArdLoraAllocator, model, cfg, tmp_path_factory.mktemp("run"))
    return base, model.eval(), budget, callback


def test_a_run_shrinks_the_effective_rank_and_keeps_the_budgets_largest_gates(run):
    base, model, budget, callback = run
    final = ranks(model)
    assert sum(final.values()) == budget and final == callback.ranks
    effective = [sum(ranks.values()) for _, _, ranks in callback.history]
    assert effective[0] == 4 * len(final) and effective[-1] < effective[0]  # ℓ1 pulled gates under the threshold
    assert all(a >= b for a, b in zip(effective, effective[1:], strict=False))
    values = [v for _, v, _ in callback.history]
    assert values[-1] < values[0]
    scores = {}
    for n, g in callback.gates.items():
        s = g.detach().abs().clone()
        s[s.argmax()] = float("inf")
        scores[n] = s
    assert {n: int(m.sum()) for n, m in top_k(scores, budget).items()} == final
    assert (logits(model, X) - logits(base, X)).abs().max() > 1e-3  # training moved the model
    assert all(type(w.adapters["default"]).__name__ == "Lora" for _, w in wrappers(model))


def test_the_saved_adapter_loads_in_peft_with_the_same_logits(run, tmp_path):
    base, model, _, _ = run
    assert_peft_loads_same(base, model, tmp_path / "ard", X)


@pytest.mark.parametrize(
    "spec, method, match",
    [
        ("ard_lora:budget=13", "lora", "exceeds the attached capacity"),
        ("ard_lora:budget=3", "lora", "below one rank for each of the 4 modules"),
        ("ard_lora:budget=8", "adalora", "attach method 'lora'"),
    ],
)
def test_bad_input_is_a_clear_error_before_the_first_step(tmp_path, spec, method, match):
    model = four_modules(method)
    assert_refused_before_first_step(ArdLoraAllocator, model, spec, match, tmp_path)


@pytest.mark.parametrize(
    "spec, match",
    [
        ("ard_lora:budget=0", "integer >= 1"),
        ("ard_lora:budget=8,l1=-1", "l1 must be a number >= 0"),
        ("ard_lora:budget=8,tv=x", "tv must be a number >= 0"),
        ("ard_lora:budget=8,threshold=-0.1", "threshold must be a number >= 0"),
        ("ard_lora:budget=8,gate_lr=0", "gate_lr must be > 0"),
        ("ard_lora:budget=8,rank=2", "it takes"),
    ],
)
def test_bad_options_are_errors_when_the_config_is_built(spec, match):
    assert_option_refused(spec, match)
