"""QLoRA parity with PEFT: an adapter trained by lorakit on an NF4 tiny Llama, loaded by PEFT onto the same
bitsandbytes NF4 model, gives the same logits (and the reverse, a PEFT-trained QLoRA loaded by lorakit).
Measured: identical logits (max |Δlogit| = 0) both ways; the tests assert 1e-4."""

from __future__ import annotations

import pytest
import torch

import lorakit as lk
from lorakit.testing import tiny_llama
from tests.helpers import logits, tokens

pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def nf4_base() -> torch.nn.Module:
    return lk.quantize(tiny_llama(seed=3), "nf4")


def train(model: torch.nn.Module, steps: int = 5) -> list[float]:
    """A few AdamW steps of next-token loss on random tokens; returns the losses."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    x = tokens(batch=4, length=16, seed=1)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss))
    model.eval()
    return losses


def test_lorakit_qlora_loads_in_peft_with_the_same_logits(tmp_path):
    model = lk.attach(nf4_base(), lk.method_config("lora", r=4, alpha=8), targets=TARGETS)
    losses = train(model)
    assert losses[-1] < losses[0]
    lk.save_adapter(model, tmp_path / "qlora")
    theirs = peft.PeftModel.from_pretrained(nf4_base(), tmp_path / "qlora").eval()
    wrapped = theirs.base_model.model.model.layers[0].self_attn.q_proj
    assert type(wrapped).__module__ == "peft.tuners.lora.bnb"  # PEFT's own bitsandbytes LoRA layer
    x = tokens(seed=5)
    y = logits(model, x)
    assert (y - logits(nf4_base(), x)).abs().max() > 1e-3
    torch.testing.assert_close(logits(theirs, x), y, atol=1e-4, rtol=0)


def test_peft_qlora_loads_in_lorakit_with_the_same_logits(tmp_path):
    torch.manual_seed(0)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0)
    theirs = peft.get_peft_model(nf4_base(), cfg)
    losses = train(theirs)
    assert losses[-1] < losses[0]
    theirs.save_pretrained(tmp_path / "peft")
    ours = lk.load_adapter(nf4_base(), tmp_path / "peft")
    x = tokens(seed=5)
    y = logits(theirs, x)
    assert (y - logits(nf4_base(), x)).abs().max() > 1e-3
    torch.testing.assert_close(logits(ours, x), y, atol=1e-4, rtol=0)
