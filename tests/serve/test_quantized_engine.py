"""The serving engine on an NF4 base: a mixed batch equals each adapter applied alone to the same quantized base."""

from __future__ import annotations

import copy

import pytest
import torch

import lorakit as lk
from lorakit.serve.engine import Engine
from lorakit.testing import randomize_adapters, tiny_llama

pytest.importorskip("bitsandbytes")


def test_mixed_batch_on_a_quantized_base_equals_each_adapter_alone(tmp_path):
    base = lk.quantize(tiny_llama(seed=3), "nf4")
    dirs = {}
    for i, (name, r) in enumerate((("a", 2), ("b", 8))):
        model = lk.attach(copy.deepcopy(base), lk.method_config("lora", r=r, alpha=2.0 * r))
        randomize_adapters(model, seed=10 + i, std=0.3)
        dirs[name] = lk.save_adapter(model, tmp_path / name)
    engine = Engine(copy.deepcopy(base))
    for name, path in dirs.items():
        engine.add_adapter(name, path)
    names = ["a", None, "b", "a"]
    ids = torch.randint(0, 256, (len(names), 7), generator=torch.Generator().manual_seed(1))
    got = engine.forward(ids, names)
    for b, name in enumerate(names):
        alone = copy.deepcopy(base) if name is None else lk.load_adapter(copy.deepcopy(base), dirs[name])
        with torch.no_grad():
            want = alone(ids[b : b + 1]).logits[0]
        torch.testing.assert_close(got[b], want, rtol=1e-4, atol=1e-4)
