"""train/callbacks/_masking: choosing the lowest components (never a module's last, never a protected one),
keeping exactly a budget of them, and the surgery steps — removing masked components and growing modules leave
the outputs unchanged (1e-6), so moving rank changes the model only by the masking."""

from __future__ import annotations

import pytest
import torch

import lorakit as lk
from lorakit.inject import wrappers
from lorakit.testing import randomize_adapters, tiny_llama
from lorakit.train.callbacks._masking import (
    active_total,
    all_active,
    apply_masks,
    keep_top,
    lowest,
    move,
    remove_masked,
)
from lorakit.train.callbacks.elalora import ElaLoraAllocator
from lorakit.train.optimizers.adamw import adamw
from tests.helpers import logits, tokens

X = tokens(batch=2, length=10, seed=5)


def scores(seed: int, ranks: list[int]) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"m{i}": torch.rand(r, generator=g) for i, r in enumerate(ranks)}


@pytest.mark.parametrize("seed", range(5))
def test_lowest_masks_the_k_lowest_allowed_components(seed):
    s = scores(seed, [1, 3, 2, 4])
    protected = {"m3": 1}  # m3's last component was just grown
    masks = lowest(s, 4, protected)
    pruned = [(n, i) for n, m in masks.items() for i in (~m).nonzero().view(-1).tolist()]
    assert len(pruned) == 4 and all(m.any() for m in masks.values())  # every module keeps one
    assert masks["m0"].all() and masks["m3"][-1]  # a lone component and a protected one stay
    eligible = [
        float(s[n][i])
        for n, m in masks.items()
        for i in m.nonzero().view(-1).tolist()
        if int(m.sum()) > 1 and i < len(m) - protected.get(n, 0)
    ]
    assert max(float(s[n][i]) for n, i in pruned) <= min(eligible, default=float("inf"))


def test_lowest_stops_when_no_component_may_go():
    masks = lowest(scores(0, [1, 2]), 3)
    assert active_total(masks) == 2 and masks["m1"].sum() == 1


@pytest.mark.parametrize("budget", [3, 5, 7])
def test_keep_top_keeps_exactly_the_budget_one_per_module_and_never_revives(budget):
    s = scores(1, [3, 3, 2])
    masks = {n: torch.ones(v.numel(), dtype=torch.bool) for n, v in s.items()}
    masks["m0"][0] = False  # masked earlier: stays masked
    kept = keep_top(s, masks, budget)
    assert active_total(kept) == budget and all(m.any() for m in kept.values())
    assert not kept["m0"][0]
    best = {n: int(torch.where(masks[n], v, -1.0).argmax()) for n, v in s.items()}
    assert all(kept[n][i] for n, i in best.items())
    others_in = [float(s[n][i]) for n, m in kept.items() for i in m.nonzero().view(-1).tolist() if i != best[n]]
    others_out = [float(s[n][i]) for n, m in kept.items() for i in (~m & masks[n]).nonzero().view(-1).tolist()]
    assert min(others_in, default=2.0) >= max(others_out, default=-1.0)


def model_and_allocator(r: int = 2) -> tuple[torch.nn.Module, ElaLoraAllocator, list]:
    model = lk.attach(tiny_llama(1), lk.method_config("lora", r=r, alpha=4.0), targets=["q_proj", "v_proj"])
    randomize_adapters(model, seed=1)  # nonzero B: every component contributes
    allocator = ElaLoraAllocator(budget=4 * r)
    allocator.check(model, steps=10)
    return model, allocator, allocator.layers(model)


def test_removing_masked_components_leaves_the_output_unchanged():
    model, allocator, layers = model_and_allocator(r=3)
    masks = all_active(layers)
    for m, i in zip(masks.values(), [0, 2, 1, 0], strict=True):
        m[i] = False
    full = logits(model.eval(), X)
    apply_masks(layers, masks)
    before = logits(model.eval(), X)
    assert (before - full).abs().max() > 1e-4  # masking changes the model; removing it then does not
    remove_masked(allocator, layers, masks, None)
    torch.testing.assert_close(logits(model, X), before, atol=1e-6, rtol=0)
    assert [w.adapters["default"].config.r for _, w in wrappers(model)] == [2, 2, 2, 2]
    assert all(m.all() and m.numel() == 2 for m in masks.values())


def test_moving_rank_changes_the_model_only_by_the_masking_and_keeps_the_total():
    model, allocator, layers = model_and_allocator(r=2)
    opt = adamw([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.0)
    model.train()(X).logits.sum().backward()
    opt.step()
    s = scores(3, [2, 2, 2, 2])
    s = dict(zip([n for n, _, _ in layers], s.values(), strict=True))
    saved = [a.B.detach().clone() for _, _, a in layers]
    unmasked = logits(model.eval(), X)
    apply_masks(layers, lowest(s, 2))
    expected = logits(model.eval(), X)
    assert (expected - unmasked).abs().max() > 1e-4  # the masked components contributed
    with torch.no_grad():  # undo the masking: move must do it itself
        for (_, _, a), B in zip(layers, saved, strict=True):
            a.B.copy_(B)
    pruned, grown = move(allocator, allocator.layers(model), s, 2, opt)
    torch.testing.assert_close(logits(model, X), expected, atol=1e-6, rtol=0)  # removal + growth add nothing
    assert sum(len(v) for v in pruned.values()) == len(grown) == 2
    after = {n: w.adapters["default"] for n, w in wrappers(model)}
    assert sum(a.config.r for a in after.values()) == 8
    for n in grown:
        assert not after[n].B[:, -1].any()  # the new component: zero B column
    model.train()(X).logits.sum().backward()
    opt.step()  # the optimizer steps the new tensors
