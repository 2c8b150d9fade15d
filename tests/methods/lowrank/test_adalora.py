"""AdaLoRA: ΔW = s·P·diag(Λ)·Q with s = α/(r₀+1e-5); PEFT's AdaLoRA loads lorakit's dir and lorakit loads PEFT's
(with a rank_pattern: smaller tensors, boolean masks), giving the same logits; the orthogonality regulariser is
PEFT's loss term."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import lorakit as lk
from lorakit.inject import wrappers
from lorakit.methods.lowrank.adalora import AdaLora
from lorakit.testing import randomize_adapters, tiny_llama
from lorakit.train.loss import regularization
from tests.helpers import logits, tokens

peft = pytest.importorskip("peft")
pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::RuntimeWarning")]
TARGETS = ["q_proj", "v_proj", "down_proj"]
X = tokens()


def peft_adalora(base: nn.Module, **kw) -> nn.Module:
    cfg = peft.AdaLoraConfig(init_r=4, lora_alpha=6, target_modules=TARGETS, total_step=10, task_type="CAUSAL_LM", **kw)
    return peft.get_peft_model(copy.deepcopy(base), cfg)


def test_forward_is_the_formula_and_conv1d_equals_linear():
    lin = nn.Linear(16, 24)
    conv = Conv1D(24, 16)
    with torch.no_grad():
        conv.weight.copy_(lin.weight.T)
        conv.bias.copy_(lin.bias)
    a = AdaLora.from_base(lin, lk.method_config("adalora", r=5, alpha=3.0))
    randomize_adapters(a, std=0.5)
    b = AdaLora.from_base(conv, lk.method_config("adalora", r=5, alpha=3.0))
    b.load_state_dict(a.state_dict())
    x = torch.randn(3, 16)
    delta = 3.0 / (5 + 1e-5) * a.P @ torch.diag(a.E.view(-1)) @ a.Q
    expected = x @ (lin.weight + delta).T + lin.bias
    torch.testing.assert_close(a(x, lin, lin(x)), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(b(x, conv, conv(x)), expected, atol=1e-5, rtol=1e-5)
    f = a.to_lora(lin)
    torch.testing.assert_close(f.scale * f.B @ f.A, delta, atol=1e-6, rtol=1e-5)


def test_lorakit_loads_peft_adalora_dir_with_a_rank_pattern(tmp_path):
    """PEFT saves pruned triplets sliced away (rank_pattern: a mask per module); lorakit loads the smaller
    tensors at each module's rank, keeping the scale α/(init_r + 1e-5), and gives PEFT's logits."""
    base = tiny_llama(0)
    theirs = peft_adalora(base)
    gen = torch.Generator().manual_seed(1)
    pattern = {}
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
            if "lora_E" in n:
                keep = torch.rand(p.shape[0], generator=gen) > 0.5
                p.masked_fill_(~keep.view(-1, 1), 0.0)
                pattern[n.removeprefix("base_model.model.")] = keep.tolist()
    theirs.peft_config["default"].rank_pattern = pattern
    theirs.save_pretrained(tmp_path / "peft")
    ours = lk.load_adapter(copy.deepcopy(base), tmp_path / "peft")
    ranks = {k.removesuffix(".lora_E.default"): sum(v) for k, v in pattern.items()}
    assert {n: w.adapters["default"].config.r for n, w in wrappers(ours)} == ranks
    assert len(set(ranks.values())) > 1
    y = logits(theirs.eval(), X)
    assert (y - logits(base, X)).abs().max() > 1e-3
    torch.testing.assert_close(logits(ours, X), y, atol=1e-5, rtol=1e-5)


def test_peft_loads_lorakit_adalora_dir(tmp_path):
    base = tiny_llama(0)
    ours = lk.attach(copy.deepcopy(base), lk.method_config("adalora", r=4, alpha=6.0), targets=TARGETS)
    randomize_adapters(ours, std=0.3)
    path = lk.save_adapter(ours, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), path).eval()
    torch.testing.assert_close(logits(theirs, X), logits(ours, X), atol=1e-5, rtol=1e-5)


def test_regularizer_is_peft_orthogonality_term():
    """PEFT's AdaLoraModel.forward adds w·mean over every P and Q of ‖PᵀP − I‖_F, ‖QQᵀ − I‖_F to the loss."""
    base = tiny_llama(0)
    theirs = peft_adalora(base, orth_reg_weight=0.7)
    ours = lk.attach(copy.deepcopy(base), lk.method_config("adalora", r=4, alpha=6.0, orth_reg_weight=0.7), TARGETS)
    params = dict(theirs.named_parameters())
    with torch.no_grad():
        for n, w in wrappers(ours):
            a = w.adapters["default"]
            for p, key in ((a.Q, "lora_A"), (a.P, "lora_B"), (a.E, "lora_E")):
                p.copy_(params[f"base_model.model.{n}.{key}.default"].normal_(std=0.3))
    with torch.no_grad():
        plain = theirs.get_base_model()(X, labels=X).loss
        regularized = theirs(input_ids=X, labels=X).loss
        term = regularization([w.adapters["default"] for _, w in wrappers(ours)])
    assert float(term) > 0.1
    torch.testing.assert_close(regularized - plain, term, atol=1e-5, rtol=1e-5)
