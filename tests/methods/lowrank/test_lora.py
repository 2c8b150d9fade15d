"""LoRA / rsLoRA: the paper's defining properties (scaling, init, low rank, exact delta)."""

import math

import pytest
import torch
from torch import nn

import lorakit as lk
from lorakit.methods.lowrank.lora import Lora
from lorakit.testing import randomize_adapters, tiny_llama


@pytest.mark.parametrize("r, alpha, rslora, expected", [(8, 16, False, 2.0), (16, 32, False, 2.0), (16, 32, True, 8.0)])
def test_scale_is_alpha_over_r_or_sqrt_r(r, alpha, rslora, expected):
    cfg = lk.method_config("lora", r=r, alpha=alpha, rslora=rslora)
    assert cfg.scale == pytest.approx(alpha / (math.sqrt(r) if rslora else r))
    assert cfg.scale == pytest.approx(expected)


def test_default_init_is_kaiming_uniform_A_and_zero_B():
    base = nn.Linear(400, 300)
    adapter = Lora.from_base(base, lk.method_config("lora", r=32))
    bound = 1 / math.sqrt(400)  # kaiming_uniform_(a=sqrt(5)) bound = sqrt(6 / ((1 + 5) * fan_in))
    assert adapter.A.shape == (32, 400) and adapter.B.shape == (300, 32)
    assert adapter.A.abs().max() <= bound
    assert adapter.A.abs().max() > 0.9 * bound  # really spread over the interval
    assert torch.count_nonzero(adapter.B) == 0


def test_gaussian_init_std_is_one_over_r():
    base = nn.Linear(512, 64)
    adapter = Lora.from_base(base, lk.method_config("lora", r=4, init="gaussian"))
    assert adapter.A.std().item() == pytest.approx(1 / 4, rel=0.05)
    assert torch.count_nonzero(adapter.B) == 0


def test_embedding_init_zero_A_normal_B():
    base = nn.Embedding(100, 32)
    adapter = Lora.from_base(base, lk.method_config("lora", r=4))
    assert torch.count_nonzero(adapter.A) == 0
    assert adapter.B.std().item() == pytest.approx(1.0, rel=0.2)


def test_update_has_rank_at_most_r_and_matches_formula():
    base = nn.Linear(48, 40)
    adapter = Lora.from_base(base, lk.method_config("lora", r=3, alpha=6))
    randomize_adapters(adapter)
    delta = adapter.delta_weight(base)
    assert torch.linalg.matrix_rank(delta).item() == 3
    x = torch.randn(5, 48)
    y = adapter(x, base, base(x))
    expected = x @ (base.weight + 2.0 * adapter.B @ adapter.A).T + base.bias
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)


def test_inference_and_autograd_paths_agree():
    model = tiny_llama()
    lk.attach(model, lk.method_config("lora", r=4), targets="all-linear")
    randomize_adapters(model)
    x = torch.randint(0, 256, (2, 7))
    with torch.no_grad():
        fast = model(x).logits
    slow = model(x).logits
    torch.testing.assert_close(fast, slow.detach(), atol=1e-5, rtol=1e-5)


def test_to_lora_truncation_is_best_low_rank_approximation():
    base = nn.Linear(30, 20)
    adapter = Lora.from_base(base, lk.method_config("lora", r=6))
    randomize_adapters(adapter, std=0.3)
    full = adapter.delta_weight(base)
    S = torch.linalg.svdvals(full)
    for k in (1, 3, 5):
        f = adapter.to_lora(base, rank=k)
        err = torch.linalg.norm(full - f.scale * f.B @ f.A)
        assert err.item() == pytest.approx(S[k:].square().sum().sqrt().item(), rel=1e-4, abs=1e-6)


def test_train_only_B_freezes_a_row_orthonormal_A(tmp_path):
    """Asymmetry in LoRA: A is random, row-orthonormal and never trains; only B (r·d_out per layer) does."""
    from lorakit.train.data import IGNORE, Record
    from lorakit.train.loop import TrainConfig, train

    model = tiny_llama()
    x = torch.randint(0, 256, (2, 6))
    y0 = model(x).logits
    lk.attach(model, lk.method_config("lora", r=4, train_only="B"), targets=["q_proj", "down_proj", "lm_head"])
    torch.testing.assert_close(model(x).logits, y0)  # B = 0: identity at init
    adapters = [m for m in model.modules() if isinstance(m, Lora)]
    for a in adapters:
        torch.testing.assert_close(a.A @ a.A.T, torch.eye(4), atol=1e-5, rtol=0)
        assert not a.A.requires_grad and a.B.requires_grad
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == sum(4 * a.B.shape[0] for a in adapters)
    A_before = [a.A.detach().clone() for a in adapters]
    records = [Record([5, 6, 7, 42, 42, 42], [IGNORE] * 3 + [42] * 3)] * 8
    lk.set_active(model, "default")  # re-activating must not unfreeze A
    result = train(model, records, TrainConfig(steps=5, batch_size=4, lr=1e-2), out_dir=tmp_path, pad_id=0,
                   progress=False)  # fmt: skip
    assert result.losses[-1] < result.losses[0]
    assert all(torch.equal(a.A, before) for a, before in zip(adapters, A_before, strict=True))
    assert any(torch.count_nonzero(a.B) > 0 for a in adapters)


def test_lora_bias_shifts_the_output_merges_and_matches_peft(tmp_path):
    """PEFT's lora_bias: the update is s·(B·A·x + b); merged into the base bias; same outputs as PEFT."""
    peft = pytest.importorskip("peft")
    from lorakit.testing import tiny_gpt2
    from tests.helpers import logits, tokens

    x = tokens()
    for make, targets in ((tiny_llama, ["q_proj", "down_proj"]), (tiny_gpt2, ["c_attn", "c_fc"])):
        model = lk.attach(make(), lk.method_config("lora", r=4, alpha=8, lora_bias=True), targets=targets)
        randomize_adapters(model)
        adapter = next(m for m in model.modules() if isinstance(m, Lora))
        assert adapter.b is not None and adapter.b.requires_grad and adapter.b.abs().sum() > 0
        y = logits(model, x)
        torch.testing.assert_close(logits(lk.merge(model), x), y, atol=1e-5, rtol=1e-5)
        lk.save_adapter(model, tmp_path / make.__name__)
        theirs = peft.PeftModel.from_pretrained(make(), tmp_path / make.__name__).eval()
        torch.testing.assert_close(logits(theirs, x), y, atol=1e-5, rtol=1e-5)
        back = lk.load_adapter(make(), tmp_path / make.__name__)
        torch.testing.assert_close(logits(back, x), y, atol=1e-6, rtol=0)
    with pytest.raises(lk.ConfigError, match="lora_bias does not apply to embeddings"):
        lk.attach(tiny_llama(), lk.method_config("lora", lora_bias=True), targets=["embed_tokens"])
    with pytest.raises(lk.ConfigError, match="DoRA does not support lora_bias"):
        lk.method_config("dora", lora_bias=True)
