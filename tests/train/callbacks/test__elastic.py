"""The elastic super-adapter helpers lonas and shears share: the rank-set option, and extraction of an embedding
and an rsLoRA super-adapter (scale α/√c_m), each equal to the super-adapter at its config and loaded by PEFT."""

from __future__ import annotations

import peft
import pytest
import torch

import lorakit as lk
from lorakit.errors import ConfigError
from lorakit.inject import wrappers
from lorakit.testing import randomize_adapters, tiny_llama
from lorakit.train.callbacks._elastic import elastic_adapters, extract, parse_ranks, use_config
from tests.helpers import tokens

X = tokens(batch=2, length=9, seed=5)


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(X).logits  # float64


@pytest.mark.parametrize(("value", "want"), [("2|4|8", (2, 4, 8)), ("8|2", (2, 8)), (4, (4,)), ([4, 1], (1, 4))])
def test_the_rank_set_reads_the_cli_and_python_forms(value, want):
    assert parse_ranks("x", value) == want


@pytest.mark.parametrize("value", ["", "2|", "a|4", "0|4", "-1", True, 2.5, None])
def test_a_bad_rank_set_is_a_clear_error(value):
    with pytest.raises(ConfigError, match="ranks must be positive integers"):
        parse_ranks("x", value)


@pytest.mark.parametrize("rslora", [False, True])
def test_embedding_and_rslora_sub_adapters_extract_exactly(tmp_path, rslora):
    """(float64: random factors this large put float32 rounding near 1e-6 in the logits.)"""
    cfg = lk.method_config("lora", r=4, alpha=3.0, rslora=rslora)
    model = lk.attach(tiny_llama(0).double(), cfg, targets=["embed_tokens", "v_proj", "down_proj"])
    randomize_adapters(model, seed=4, std=0.3)
    config = {n: (1, 3, 4)[i % 3] for i, n in enumerate(elastic_adapters(model))}
    with use_config(model, config):
        want = logits(model)
    out = extract(model, config, tmp_path / "sub")
    loaded = lk.load_adapter(tiny_llama(0).double(), out)
    assert {n: w.adapters["default"].A.shape[0] for n, w in wrappers(loaded)} == config
    torch.testing.assert_close(logits(loaded), want, atol=1e-6, rtol=1e-6)
    peft_model = peft.PeftModel.from_pretrained(tiny_llama(0).double(), str(out)).eval()
    torch.testing.assert_close(logits(peft_model), want, atol=1e-5, rtol=1e-5)
