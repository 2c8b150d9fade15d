"""Every registered method's declared parameter formula equals its real trainable-parameter count."""

import dataclasses

import pytest

import lorakit as lk
from lorakit.inject import wrappers
from lorakit.methods import _layers as L
from lorakit.testing import tiny_gpt2, tiny_llama
from tests.helpers import targets_for


@pytest.mark.parametrize("method", sorted(lk.REGISTRY))
@pytest.mark.parametrize("make, targets", [(tiny_llama, "all-linear"), (tiny_gpt2, ["c_attn", "c_fc", "wte"])])
def test_trainable_params_match_formula(method, make, targets):
    model = make()
    spec = lk.REGISTRY[method]
    if isinstance(targets, list):
        targets = targets_for(method, targets)
    has_r = "r" in {f.name for f in dataclasses.fields(spec.config)}  # rank_pattern needs an r option
    pattern = {"down_proj": 2, "c_fc": 2} if has_r else None
    lk.attach(model, lk.method_config(method), targets=targets, rank_pattern=pattern)
    checked = 0
    for _, wrapper in wrappers(model):
        adapter = wrapper.adapters["default"]
        d_in, d_out = L.dims(wrapper.base_layer)
        real = sum(p.numel() for p in adapter.parameters() if p.requires_grad)
        assert real == spec.param_count(d_in, d_out, adapter.config), (method, d_in, d_out)
        checked += 1
    assert checked > 0
    total = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert total == sum(
        spec.param_count(*L.dims(w.base_layer), w.adapters["default"].config) for _, w in wrappers(model)
    )
