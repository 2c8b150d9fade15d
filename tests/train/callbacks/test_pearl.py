"""The pearl callback: the SVD rotation leaves outputs unchanged (1e-6) and the cut keeps the best rank-r
approximation with the measured change; distances follow the paper's formula against a reference dir; a run
sets ranks that grow with the distance, sum to the budget exactly and save an adapter PEFT loads with the same
logits; bad input is a clear error before the first step."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch

import lorakit as lk
from lorakit.errors import ConfigError
from lorakit.inject import wrappers
from lorakit.testing import randomize_adapters, tiny_llama
from lorakit.train.callbacks.pearl import PearlAllocator, proportional, truncate_to
from lorakit.train.loop import TrainConfig, train
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


def deltas(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {
        n: w.adapters["default"].scale * (w.adapters["default"].B @ w.adapters["default"].A) for n, w in wrappers(model)
    }


def test_the_svd_rotation_leaves_the_output_unchanged_and_the_cut_is_the_best_rank_r_approximation():
    model = lk.attach(tiny_llama(1), lk.method_config("lora", r=4, alpha=8.0), targets=TARGETS)
    randomize_adapters(model, seed=1)
    allocator = PearlAllocator(budget=12)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model(X).logits.sum().backward()
    opt.step()
    before, old = logits(model, X), deltas(model)
    for name, wrapper, a in allocator.layers(model):  # rotation only: rank kept
        assert truncate_to(allocator, wrapper, name, a, 4, opt) == 0.0  # nothing dropped
    torch.testing.assert_close(logits(model, X), before, atol=1e-6, rtol=0)
    for name, wrapper, a in allocator.layers(model):
        r = 1 + len(name) % 3  # 1..3, differing between modules
        change = truncate_to(allocator, wrapper, name, a, r, opt)
        U, S, Vh = torch.linalg.svd(old[name], full_matrices=False)
        best = U[:, :r] @ torch.diag(S[:r]) @ Vh[:r]
        new = deltas(model)[name]
        assert new.shape == old[name].shape and wrapper.adapters["default"].config.r == r
        torch.testing.assert_close(new, best, atol=1e-5, rtol=1e-4)
        measured = float((old[name] - new).norm() / old[name].norm())
        assert change == pytest.approx(measured, rel=1e-3, abs=1e-6)
        assert not any(a.B is p for g in opt.param_groups for p in g["params"])  # swapped for the cut one
    model(X).logits.sum().backward()
    opt.step()  # the optimizer steps the cut parameters


def test_proportional_sums_exactly_and_grows_with_the_weight():
    weights = [0.3, 1.2, 0.05, 0.9, 0.9, 2.0]
    for total in range(6, 25):
        out = proportional(weights, total, 1, [4] * 6)
        assert sum(out) == total and all(1 <= x <= 4 for x in out)
        for i, j in itertools.permutations(range(6), 2):
            if weights[i] > weights[j]:
                assert out[i] >= out[j]


def test_distances_against_a_reference_dir_follow_the_formula(tmp_path):
    base = tiny_llama(0)
    ref = lk.attach(copy.deepcopy(base), lk.method_config("lora", r=2, alpha=4.0), targets=TARGETS)
    randomize_adapters(ref, seed=3)
    path = lk.save_adapter(ref, tmp_path / "ref")
    ref_deltas = deltas(ref)
    model = lk.attach(copy.deepcopy(base), lk.method_config("lora", r=4), targets=TARGETS)
    randomize_adapters(model, seed=4)
    mine = deltas(model)
    allocator = PearlAllocator(budget=14, probe=2, reference=str(path))
    allocator.check(model, steps=5)
    got = allocator.allocate(allocator.layers(model))
    for name in mine:
        want = float((mine[name] - ref_deltas[name]).norm() / ref_deltas[name].norm())
        assert allocator.distances[name] == pytest.approx(want, rel=1e-4)
    assert sum(got.values()) == 14 and ranks(model) == got
    no_ref = PearlAllocator(budget=14)
    fresh = lk.attach(copy.deepcopy(base), lk.method_config("lora", r=4), targets=TARGETS)
    randomize_adapters(fresh, seed=4)
    mine = deltas(fresh)
    no_ref.allocate(no_ref.layers(fresh))
    for name, w in wrappers(fresh):
        want = float(mine[name].norm() / w.base_layer.weight.norm())
        assert no_ref.distances[name] == pytest.approx(want, rel=1e-4)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    base = tiny_llama(0)
    torch.manual_seed(0)
    model = lk.attach(copy.deepcopy(base), lk.method_config("lora", r=4, alpha=8.0), targets=TARGETS)
    budget = 2 * len(ranks(model))  # half the attached capacity
    cfg = TrainConfig(
        steps=10, batch_size=4, lr=0.01, schedule="constant", seed=3, callbacks=(f"pearl:budget={budget},probe=4",)
    )
    callback = train_capturing(PearlAllocator, model, cfg, tmp_path_factory.mktemp("run"))
    return base, model.eval(), budget, callback


def test_a_run_sets_ranks_that_grow_with_the_distance_within_the_budget_exactly(run):
    base, model, budget, callback = run
    final = ranks(model)
    assert sum(final.values()) == budget and final == callback.ranks
    d = callback.distances
    assert set(d) == set(final) and all(v > 0 for v in d.values())
    for a, b in itertools.permutations(final, 2):
        if d[a] > d[b]:
            assert final[a] >= final[b]
    assert len(set(final.values())) > 1  # the distances differ, so do the ranks
    assert all(0 <= c < 1 for c in callback.truncation.values())
    assert (logits(model, X) - logits(base, X)).abs().max() > 1e-3  # training moved the model


def test_the_saved_adapter_loads_in_peft_with_the_same_logits(run, tmp_path):
    base, model, _, _ = run
    assert_peft_loads_same(base, model, tmp_path / "pearl", X)


@pytest.mark.parametrize(
    "spec, method, match",
    [
        ("pearl:budget=20,probe=2", "lora", "exceeds the attached capacity"),
        ("pearl:budget=7,probe=2,r_min=2", "lora", "below r_min=2"),
        ("pearl:budget=8,probe=4", "lora", "probe=4 is at or after the end"),
        ("pearl:budget=8,probe=2,reference=/nonexistent/adapter", "lora", "is not an adapter dir"),
        ("pearl:budget=8,probe=2", "adalora", "attach method 'lora'"),
    ],
)
def test_bad_input_is_a_clear_error_before_the_first_step(tmp_path, spec, method, match):
    model = four_modules(method, r=4)
    assert_refused_before_first_step(PearlAllocator, model, spec, match, tmp_path)


def test_a_reference_on_other_modules_is_refused(tmp_path):
    ref = lk.attach(tiny_llama(0), lk.method_config("lora", r=2), targets=["q_proj"])
    path = lk.save_adapter(ref, tmp_path / "ref")
    model = lk.attach(tiny_llama(0), lk.method_config("lora", r=2), targets=["q_proj", "v_proj"])
    cfg = TrainConfig(steps=4, batch_size=2, callbacks=(f"pearl:budget=4,probe=2,reference={path}",))
    with pytest.raises(ConfigError, match="has no adapter on"):
        train(model, records(), cfg, out_dir=tmp_path / "run", pad_id=0)


@pytest.mark.parametrize(
    "spec", ["pearl:budget=8,probe=0", "pearl:budget=0", "pearl:budget=8,r_min=0", "pearl:budget=8,probe=-1"]
)
def test_bad_options_are_errors_when_the_config_is_built(spec):
    assert_option_refused(spec, "must be an integer >= 1")
