"""The serving engine on an NF4 base: a mixed batch equals each adapter applied alone to the same quantized base."""

from __future__ import annotations

import pytest

import lorakit as lk
from lorakit.testing import tiny_llama
from tests.helpers import assert_mixed_batch_equals_alone

pytest.importorskip("bitsandbytes")


def test_mixed_batch_on_a_quantized_base_equals_each_adapter_alone(tmp_path):
    base = lk.quantize(tiny_llama(seed=3), "nf4")
    configs = {name: lk.method_config("lora", r=r, alpha=2.0 * r) for name, r in (("a", 2), ("b", 8))}
    assert_mixed_batch_equals_alone(base, configs, tmp_path)
