"""The sensitivity_lora callback: Hutchinson's estimate matches the exact Hessian diagonal of a tiny net; ranks are
proportional to the combined sensitivity and sum exactly to the budget; growing and dropping zero-contribution
components leaves the outputs unchanged (1e-6); a run saves an adapter PEFT loads with the same logits; bad input
is a clear error before the first step."""

from __future__ import annotations

import copy

import pytest
import torch

import lorakit as lk
from lorakit.errors import ConfigError
from lorakit.inject import wrappers
from lorakit.testing import randomize_adapters, tiny_llama
from lorakit.train.callbacks._hessian import hutchinson_diagonal
from lorakit.train.callbacks.sensitivity_lora import SensitivityLoraAllocator, combined_scores, proportional_ranks
from lorakit.train.data import collate
from lorakit.train.loop import TrainConfig, batch_indices
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


def test_hutchinson_is_exact_for_a_diagonal_hessian_with_one_sample():
    c = torch.rand(3, 4, generator=torch.Generator().manual_seed(0))
    w = torch.randn(3, 4, requires_grad=True)
    (h,) = hutchinson_diagonal(lambda: (c * w**2).sum() + w.sum(), [w], samples=1)
    torch.testing.assert_close(h, 2 * c)


def test_hutchinson_matches_the_exact_hessian_diagonal_of_a_tiny_net():
    """A two-layer tanh net with a cross-entropy loss: the estimate of each entry lies within 5 standard deviations
    of the exact diagonal (σ² = Σ_{j≠i} H_ij² / samples over both weights, from the exact Hessian), and the whole
    diagonal within 10%."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 5, generator=g), torch.randint(0, 3, (16,), generator=g)
    w1, w2 = torch.randn(6, 5, generator=g) * 0.7, torch.randn(3, 6, generator=g) * 0.7

    def loss(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(torch.tanh(x @ a.T) @ b.T, y)

    exact = torch.autograd.functional.hessian(loss, (w1, w2))
    samples = 4000
    params = [w1.clone().requires_grad_(True), w2.clone().requires_grad_(True)]
    gen = torch.Generator().manual_seed(1)
    est = hutchinson_diagonal(lambda: loss(*params), params, samples=samples, generator=gen)
    n1, n2 = w1.numel(), w2.numel()
    full = torch.cat(
        [
            torch.cat([exact[0][0].reshape(n1, n1), exact[0][1].reshape(n1, n2)], dim=1),
            torch.cat([exact[1][0].reshape(n2, n1), exact[1][1].reshape(n2, n2)], dim=1),
        ]
    )  # (n1 + n2, n1 + n2): the Hessian over both weights, cross blocks included
    diag, h = full.diagonal(), torch.cat([e.reshape(-1) for e in est])
    sigma = ((full**2).sum(dim=1) - diag**2).clamp_min(0).div(samples).sqrt()  # (n,) the estimate's std
    assert ((h - diag).abs() <= 5 * sigma + 1e-6).all()
    assert (h - diag).norm() <= 0.1 * diag.norm()


def test_proportional_ranks_sum_to_the_budget_within_the_caps():
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        n = int(torch.randint(1, 8, (1,), generator=g))
        caps = torch.randint(1, 9, (n,), generator=g).tolist()
        scores = (torch.rand(n, generator=g) ** 3).tolist()
        budget = int(torch.randint(n, sum(caps) + 1, (1,), generator=g))
        r = proportional_ranks(scores, budget, caps)
        assert sum(r) == budget and all(1 <= a <= c for a, c in zip(r, caps, strict=True))
        uncapped = [i for i in range(n) if r[i] < caps[i]]
        for i in uncapped:  # a higher score never gets less rank, unless a cap bound the other
            for j in uncapped:
                if scores[i] > scores[j]:
                    assert r[i] >= r[j]
    assert proportional_ranks([3.0, 1.0], 10, [10, 10]) == [7, 3]  # 1 + 1 each, then 8 split 6 : 2
    with pytest.raises(ConfigError, match="between"):
        proportional_ranks([1.0, 1.0], 1, [4, 4])


def test_the_local_metric_favours_spread_sensitivity():
    w = torch.ones(10, 10)
    spread, peaked = torch.ones(10, 10), torch.zeros(10, 10)
    peaked[0, :] = 10.0  # the same total mass in one row
    s = combined_scores([spread, peaked], [w, w], topk=0.1, mix=1.0)
    assert s[0] > s[1]
    assert combined_scores([spread, peaked], [w, w], topk=0.1, mix=0.0) == pytest.approx([0.5, 0.5])


def test_growing_and_dropping_zero_components_leaves_the_outputs_unchanged():
    """Modules that shrink lose exactly their zero-B components (the smallest norms), the others grow by zero
    columns: the logits are unchanged to 1e-6 and the ranks are the allocation's."""
    model = lk.attach(tiny_llama(1), lk.method_config("lora", r=4), targets=TARGETS)
    randomize_adapters(model, seed=1)
    allocator = SensitivityLoraAllocator(budget=4 * 6, mix=0.3)
    layers = allocator.layers(model)
    g = torch.Generator().manual_seed(2)
    for i, (name, wrapper, _) in enumerate(layers):  # sensitivities of very different sizes
        allocator.hdiag[name] = torch.rand(wrapper.base_layer.weight.shape, generator=g) * (10.0 if i % 2 else 0.1)
    weights = [w.base_layer.weight for _, w, _ in layers]
    scores = combined_scores([allocator.hdiag[n] for n, _, _ in layers], weights, allocator.topk, allocator.mix)
    want = proportional_ranks(scores, allocator.budget, [64] * len(layers))
    assert any(r < 4 for r in want) and any(r > 4 for r in want)
    with torch.no_grad():
        for (_, _, a), r in zip(layers, want, strict=True):
            a.B[:, r:] = 0.0  # the components a shrinking module drops contribute nothing
    before = logits(model.eval(), X)
    assert allocator.allocate(layers) == dict(zip([n for n, _, _ in layers], want, strict=True))
    assert list(ranks(model).values()) == want
    torch.testing.assert_close(logits(model, X), before, atol=1e-6, rtol=0)


def test_the_estimate_uses_the_batch_the_loop_trains_on(tmp_path):
    """probe=1: the Hessian is estimated at step 0 (B = 0) on the loop's first batch; the same draws on that batch
    (rebuilt with the loop's batch_indices and collate) on a fresh copy of the model give the same estimate."""
    base = tiny_llama(0)
    torch.manual_seed(0)
    model = lk.attach(copy.deepcopy(base), lk.method_config("lora", r=2), targets=["q_proj"])
    torch.manual_seed(0)
    fresh = lk.attach(copy.deepcopy(base), lk.method_config("lora", r=2), targets=["q_proj"]).train()
    cfg = TrainConfig(steps=2, batch_size=4, seed=3, callbacks=("sensitivity_lora:budget=3,probe=1,samples=2",))
    callback = train_capturing(SensitivityLoraAllocator, model, cfg, tmp_path)
    batch = collate([records()[i] for i in batch_indices(len(records()), 4, 0, cfg.seed)], pad_id=0)
    want = callback.estimate(fresh, callback.layers(fresh), batch, seed=callback.draw_seed(0, 0))
    assert set(want) == set(callback.hdiag)
    for name, h in want.items():
        torch.testing.assert_close(callback.hdiag[name], h, atol=1e-6, rtol=1e-4)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    base = tiny_llama(0)
    torch.manual_seed(0)
    model = lk.attach(copy.deepcopy(base), lk.method_config("lora", r=4, alpha=8.0), targets=TARGETS)
    budget = 4 * len(ranks(model)) - 5
    spec = f"sensitivity_lora:budget={budget},probe=2,samples=4"
    cfg = TrainConfig(steps=6, batch_size=4, lr=0.01, schedule="constant", seed=3, callbacks=(spec,))
    callback = train_capturing(SensitivityLoraAllocator, model, cfg, tmp_path_factory.mktemp("run"))
    return base, model.eval(), budget, callback


def test_a_run_sets_ranks_proportional_to_the_sensitivities_summing_to_the_budget(run):
    base, model, budget, callback = run
    final = ranks(model)
    assert sum(final.values()) == budget
    assert final == callback.ranks
    names = list(final)
    assert proportional_ranks([callback.scores[n] for n in names], budget, [64] * len(names)) == list(final.values())
    assert all(torch.isfinite(h).all() and h.abs().sum() > 0 for h in callback.hdiag.values())
    assert not callback.hooks  # the capture and the head's hook are gone after the allocation
    assert all(not w.base_layer.weight.requires_grad for _, w in wrappers(model))
    assert (logits(model, X) - logits(base, X)).abs().max() > 1e-3  # training moved the model


def test_the_saved_adapter_loads_in_peft_with_the_same_logits(run, tmp_path):
    base, model, _, _ = run
    assert_peft_loads_same(base, model, tmp_path / "sens", X)


@pytest.mark.parametrize(
    "spec, method, match",
    [
        ("sensitivity_lora:budget=13", "lora", "exceeds the attached capacity"),
        ("sensitivity_lora:budget=3", "lora", "below one rank for each of the 4 modules"),
        ("sensitivity_lora:budget=8", "adalora", "attach method 'lora'"),
        ("sensitivity_lora:budget=8,probe=4", "lora", "after training ends"),
    ],
)
def test_bad_input_is_a_clear_error_before_the_first_step(tmp_path, spec, method, match):
    model = four_modules(method)
    assert_refused_before_first_step(SensitivityLoraAllocator, model, spec, match, tmp_path)


@pytest.mark.parametrize(
    "spec, match",
    [
        ("sensitivity_lora:budget=8,probe=0", "integer >= 1"),
        ("sensitivity_lora:budget=8,samples=0", "integer >= 1"),
        ("sensitivity_lora:budget=8,topk=1.5", r"in \[0, 1\]"),
        ("sensitivity_lora:budget=8,topk=0", r"in \(0, 1\]"),
        ("sensitivity_lora:budget=8,mix=-0.1", r"in \[0, 1\]"),
        ("sensitivity_lora:budget=8,rank=2", "it takes"),
    ],
)
def test_bad_options_are_errors_when_the_config_is_built(spec, match):
    assert_option_refused(spec, match)
