"""Tensors shared across layers belong to the attach that built them: two attaches (two models, or two names
on one model) share nothing, and a config object reused across them changes nothing."""

from __future__ import annotations

import pytest
import torch

import lorakit as lk
from lorakit.inject import wrappers
from lorakit.testing import randomize_adapters, tiny_llama
from tests.helpers import logits, tokens

SHARED = {"vera": {"r": 4}, "randlora": {"r": 4}, "vblora": {"r": 2, "vector_length": 16}, "lotr": {"r": 2}}


def shared_of(model: torch.nn.Module, name: str) -> set[int]:
    return {id(w.adapters[name].shared) for _, w in wrappers(model) if name in w.adapters}


@pytest.mark.parametrize("method", sorted(SHARED))
def test_two_models_and_two_names_share_nothing(method):
    cfg = lk.method_config(method, **SHARED[method])  # one config object for every attach
    first, second, x = tiny_llama(), tiny_llama(), tokens()
    lk.attach(first, cfg, targets=["q_proj", "v_proj"])
    randomize_adapters(first, std=0.1)
    y = logits(first, x)
    lk.attach(second, cfg, targets=["q_proj", "v_proj"])
    lk.attach(second, cfg, targets=["q_proj", "v_proj"], name="other")
    groups = [shared_of(first, "default"), shared_of(second, "default"), shared_of(second, "other")]
    assert all(groups) and not (groups[0] & groups[1]) and not (groups[1] & groups[2]) and not (groups[0] & groups[2])
    with torch.no_grad():  # training the second model's shared tensors leaves the first model's outputs alone
        for _, w in wrappers(second):
            for p in w.adapters["default"].shared.parameters():
                p.add_(1.0)
    randomize_adapters(second, std=0.3, seed=5)
    torch.testing.assert_close(logits(first, x), y, atol=0, rtol=0)
