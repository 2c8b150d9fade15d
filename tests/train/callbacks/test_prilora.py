"""The prilora callback (PRILoRA): ranks grow linearly with the layer index and are set by surgery with outputs
unchanged (1e-6), their total checked against the budget; the input norms come from forward hooks; each pruning
step zeroes the lowest |A|·‖x‖ entries of every row of A, the count of zero entries following the schedule at each
pruning step and the pruned entries staying zero; the saved adapter loads in PEFT with the same logits; bad input
is a clear error before the first step."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import lorakit as lk
from lorakit.errors import ConfigError
from lorakit.inject import wrappers
from lorakit.testing import randomize_adapters, tiny_llama
from lorakit.train.callbacks.prilora import PriLoraAllocator, block_index, linear_ranks
from lorakit.train.loop import TrainConfig
from tests.helpers import logits, tokens
from tests.train.callbacks._allocators import (
    TARGETS,
    X,
    assert_option_refused,
    assert_peft_loads_same,
    assert_refused_before_first_step,
    ranks,
    train_capturing,
)

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::RuntimeWarning")]


def test_ranks_grow_linearly_with_the_block_index():
    assert block_index("model.layers.3.mlp.up_proj") == 3 and block_index("model.embed_tokens") is None
    names = {f"model.layers.{i}.self_attn.q_proj": i for i in range(4)}
    assert list(linear_ranks(names, 2, 8).values()) == [2, 4, 6, 8]  # steps of (8 − 2)/3
    uneven = list(linear_ranks({f"b.{i}.x": i for i in range(5)}, 1, 4).values())
    assert uneven[0] == 1 and uneven[-1] == 4 and uneven == sorted(uneven)
    assert all(abs(r - (1 + 3 * i / 4)) <= 0.5 for i, r in enumerate(uneven))  # the nearest integer of the line


def attached(seed: int = 2, r: int = 4) -> torch.nn.Module:
    return lk.attach(tiny_llama(seed, layers=3), lk.method_config("lora", r=r, alpha=8.0), targets=TARGETS)


def test_setting_the_linear_ranks_leaves_the_output_unchanged():
    model = attached()
    randomize_adapters(model, seed=2)
    callback = PriLoraAllocator(budget=36, r_min=2, r_max=6, every=2)  # blocks 0, 1, 2: ranks 2, 4, 6 (× 3 modules)
    with torch.no_grad():
        for name, w in wrappers(model):
            if block_index(name) == 0:
                w.adapters["default"].B[:, 2:] = 0.0  # what the surgery drops contributes nothing
    callback.check(model, steps=10)
    before = logits(model.eval(), X)
    callback.set_ranks(callback.layers(model), None)
    torch.testing.assert_close(logits(model, X), before, atol=1e-6, rtol=0)
    assert ranks(model) == {n: 2 * (block_index(n) + 1) for n, _ in wrappers(model)}
    callback.on_end(None)  # type: ignore[arg-type]


def test_the_hooks_keep_the_input_norms_and_a_pruning_step_zeroes_the_lowest_scores_of_each_row():
    model = attached(3, r=2).eval()  # every block grows (2, 4, 6): nothing to drop
    randomize_adapters(model, seed=3)
    callback = PriLoraAllocator(budget=36, r_min=2, r_max=6, every=2, fraction=0.3, beta=0.5)
    callback.check(model, steps=10)
    callback.set_ranks(callback.layers(model), None)
    seen: dict[str, list[torch.Tensor]] = {}
    handles = [
        w.register_forward_hook(lambda m, args, out, n=n: seen.setdefault(n, []).append(args[0]))
        for n, w in wrappers(model)
    ]
    logits(model, X)
    logits(model, tokens(batch=3, length=7, seed=9))
    for h in handles:
        h.remove()
    callback.on_end(None)  # type: ignore[arg-type]
    olds = {n: w.adapters["default"].A.detach().clone() for n, w in wrappers(model)}
    callback.prune_entries(callback.layers(model), step=2)
    for name, w in wrappers(model):
        n1, n2 = (x.reshape(-1, x.shape[-1]).norm(dim=0) for x in seen[name])
        norms = 0.5 * n1 + 0.5 * n2
        torch.testing.assert_close(callback.norms[name], norms)
        A, old = w.adapters["default"].A, olds[name]
        z = math.floor(0.3 * A.shape[1])
        lowest = (old.abs() * norms).argsort(dim=1)[:, :z]  # (r, z)
        assert (A == 0).sum(dim=1).tolist() == [z] * A.shape[0]
        assert bool((A.gather(1, lowest) == 0).all())
        kept = A != 0
        torch.testing.assert_close(A[kept], old[kept])


STEPS, EVERY, FRACTION = 13, 3, 0.25


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    base = tiny_llama(0, layers=3)
    torch.manual_seed(0)
    model = lk.attach(copy.deepcopy(base), lk.method_config("lora", r=4, alpha=8.0), targets=TARGETS)
    spec = f"prilora:budget=36,r_min=2,r_max=6,every={EVERY},fraction={FRACTION}"
    cfg = TrainConfig(steps=STEPS, batch_size=4, lr=0.01, schedule="constant", seed=3, callbacks=(spec,))
    callback = train_capturing(PriLoraAllocator, model, cfg, tmp_path_factory.mktemp("run"))
    return base, model.eval(), callback


def test_a_run_sets_linear_ranks_within_the_budget(run):
    base, model, _ = run
    final = ranks(model)
    assert final == {n: 2 * (block_index(n) + 1) for n in final} and sum(final.values()) == 36
    assert not any(m._forward_hooks for _, m in wrappers(model))
    assert (logits(model, X) - logits(base, X)).abs().max() > 1e-3  # training moved the model


def test_the_zero_entries_of_a_follow_the_pruning_schedule_and_stay_zero(run):
    _, model, callback = run
    assert [step for step, _ in callback.history] == list(range(EVERY, STEPS + 1, EVERY))
    features = 64  # the tiny model's hidden size: every target's input
    zeros = 0
    for _, counts in callback.history:
        zeros += math.floor(FRACTION * (features - zeros))  # this pruning step's share of what is left
        assert counts == {n: 2 * (block_index(n) + 1) * zeros for n in counts}
    for name, w in wrappers(model):  # one optimizer step after the last pruning: still zero
        A = w.adapters["default"].A
        assert not A[callback.masks[name]].any() and int(callback.masks[name].sum()) == A.shape[0] * zeros


def test_the_saved_adapter_loads_in_peft_with_the_same_logits(run, tmp_path):
    base, model, _ = run
    assert_peft_loads_same(base, model, tmp_path / "prilora", X)


@pytest.mark.parametrize(
    "spec, method, targets, randomize, match",
    [
        ("prilora:budget=10,r_min=2,r_max=4,every=2", "lora", ["q_proj"], False, "set budget=9"),
        ("prilora:budget=9,r_min=2,r_max=4,every=2", "adalora", ["q_proj"], False, "attach method 'lora'"),
        ("prilora:budget=9,r_min=2,r_max=4,every=4", "lora", ["q_proj"], False, "after the end of the 4-step run"),
        ("prilora:budget=9,r_min=2,r_max=4,every=2", "lora", ["q_proj", "embed_tokens"], False, "numbered"),
        ("prilora:budget=9,r_min=2,r_max=4,every=2", "lora", ["q_proj"], True, "already contribute"),
    ],
)
def test_bad_input_is_a_clear_error_before_the_first_step(tmp_path, spec, method, targets, randomize, match):
    model = lk.attach(tiny_llama(0, layers=3), lk.method_config(method, r=3), targets=targets)  # ranks 2, 3, 4
    if randomize:
        randomize_adapters(model, seed=0)
    assert_refused_before_first_step(PriLoraAllocator, model, spec, match, tmp_path)


@pytest.mark.parametrize(
    "spec, match",
    [
        ("prilora:budget=0", "must be an integer >= 1"),
        ("prilora:budget=8,every=0", "must be an integer >= 1"),
        ("prilora:budget=8,r_min=0", "must be an integer >= 1"),
        ("prilora:budget=8,r_min=5,r_max=3", "r_max=3 is below r_min=5"),
        ("prilora:budget=8,fraction=1.5", "must be a number in"),
        ("prilora:budget=8,fraction=0", "never prune"),
        ("prilora:budget=8,beta=-0.1", "must be a number in"),
    ],
)
def test_bad_options_are_errors_when_the_config_is_built(spec, match):
    assert_option_refused(spec, match)


def test_a_resumed_run_is_refused_before_any_surgery():
    from types import SimpleNamespace

    model = attached(r=2)
    state = SimpleNamespace(model=model, step=2, optimizer=None, config=SimpleNamespace(steps=10))
    with pytest.raises(ConfigError, match="without --resume"):
        PriLoraAllocator(budget=36, r_min=2, r_max=6, every=2).on_step_begin(state)  # type: ignore[arg-type]
    assert set(ranks(model).values()) == {2}
