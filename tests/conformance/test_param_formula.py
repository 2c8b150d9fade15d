"""Every registered method's declared parameter formula equals its real trainable-parameter count.

Per wrapped layer: ``spec.params``. A method whose layers share trainable tensors (LoTR's U, V per
shape group) keeps them under ``adapter.shared`` and declares ``shared_params``, counted once per group.
"""

import dataclasses

import pytest
import torch

import lorakit as lk
from lorakit import layers as L
from lorakit.inject import wrappers
from lorakit.testing import tiny_gpt2, tiny_llama
from tests.helpers import targets_for, tokens


def shared_count(spec, d_in, d_out, cfg) -> int:
    names = {"d_in": d_in, "d_out": d_out, **{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}}
    return int(eval(spec.adapter.shared_params, {"__builtins__": {}}, names))


@pytest.mark.parametrize("method", sorted(lk.REGISTRY))
@pytest.mark.parametrize("make, targets", [(tiny_llama, "all-linear"), (tiny_gpt2, ["c_attn", "c_fc", "wte"])])
def test_trainable_params_match_formula(method, make, targets):
    model = make()
    spec = lk.REGISTRY[method]
    if isinstance(targets, list):
        targets = targets_for(method, targets)
    has_r = "r" in {f.name for f in dataclasses.fields(spec.config)}
    pattern = {"down_proj": 2, "c_fc": 2} if has_r else None
    ids = tokens(batch=4, length=8, seed=7)  # calibration for inits that read data (ignored by the others)
    batches = [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}]
    lk.attach(model, lk.method_config(method), targets=targets, rank_pattern=pattern, calibration=batches)
    sharing = getattr(spec.adapter, "shared_params", None) is not None
    groups, per_layer = {}, 0
    for _, wrapper in wrappers(model):
        adapter = wrapper.adapters["default"]
        d_in, d_out = L.dims(wrapper.base_layer)
        shared = {id(p) for p in adapter.shared.parameters()} if sharing else set()
        real = sum(p.numel() for p in adapter.parameters() if p.requires_grad and id(p) not in shared)
        assert real == spec.param_count(d_in, d_out, adapter.config), (method, d_in, d_out)
        per_layer += real
        if sharing:
            groups[id(adapter.shared)] = shared_count(spec, d_in, d_out, adapter.config)
    total = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert total == per_layer + sum(groups.values())
