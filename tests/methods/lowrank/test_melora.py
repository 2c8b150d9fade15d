"""MELoRA: ΔW is block-diagonal over n mini-LoRAs, r·(d_in+d_out) parameters buy rank n·r, merged = unmerged."""

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import lorakit as lk
from lorakit import layers as L
from lorakit.inject import wrappers
from lorakit.methods.lowrank.melora import Melora
from lorakit.testing import randomize_adapters, tiny_gpt2, tiny_llama
from tests.helpers import logits, tokens


def _bases():
    torch.manual_seed(0)
    conv = Conv1D(48, 32)  # (out=48, in=32)
    nn.init.normal_(conv.weight)
    return [nn.Linear(32, 48), conv, nn.Embedding(64, 48)]


def _random(base, **opts):
    adapter = Melora.from_base(base, lk.method_config("melora", **opts))
    randomize_adapters(adapter, std=0.3)
    return adapter


def test_delta_is_block_diagonal_with_rank_n_times_r():
    for base in _bases():
        adapter = _random(base, r=2, n=4)
        delta = L.to_base_layout(base, adapter.delta_weight(base)).detach()  # (out, in)
        d_out, d_in = delta.shape
        bo, bi = d_out // 4, d_in // 4
        for i in range(4):
            for j in range(4):
                block = delta[i * bo : (i + 1) * bo, j * bi : (j + 1) * bi]
                if i != j:
                    assert torch.equal(block, torch.zeros_like(block)), (type(base), i, j)
                else:  # mini-LoRA i is a plain rank-r LoRA on its own block
                    expected = adapter.scale * adapter.B[i] @ adapter.A[i]
                    torch.testing.assert_close(block, expected.detach())
        assert torch.linalg.matrix_rank(delta) == 4 * 2


def test_params_equal_one_rank_r_lora_while_rank_is_n_times_higher():
    model = tiny_llama()
    lk.attach(model, lk.method_config("melora", r=2, n=8), targets="all-linear")
    lora = lk.attach(tiny_llama(), lk.method_config("lora", r=2), targets="all-linear")
    count = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert count == sum(p.numel() for p in lora.parameters() if p.requires_grad)
    assert count == sum(2 * sum(L.dims(w.base_layer)) for _, w in wrappers(model))
    randomize_adapters(model)
    for _, w in wrappers(model):
        delta = w.adapters["default"].delta_weight(w.base_layer).detach()
        assert torch.linalg.matrix_rank(delta) == 16  # n·r, vs r = 2 for the LoRA of the same size


def test_forward_equals_the_authors_chunked_loop():
    """Their layer: concat_i( B_i(A_i(x[..., i·in/n:(i+1)·in/n])) · alpha/r ) added to the base output."""
    base = nn.Linear(32, 48)
    adapter = _random(base, r=2, n=4, alpha=6.0)
    x = torch.randn(2, 3, 32)
    chunks = [x[..., i * 8 : (i + 1) * 8] @ adapter.A[i].T @ adapter.B[i].T * 3.0 for i in range(4)]
    with torch.no_grad():
        torch.testing.assert_close(adapter(x, base, base(x)), base(x) + torch.cat(chunks, dim=-1))


def test_embedding_lookup_uses_only_its_own_block():
    base = nn.Embedding(64, 48)
    adapter = _random(base, r=2, n=4)
    ids = torch.tensor([0, 17, 40, 63])
    with torch.no_grad():
        out = adapter(ids, base, base(ids)) - base(ids)  # (4, 48)
    for row, t in zip(out, ids.tolist(), strict=True):
        blk = t // 16  # token t lies in input slice t // (64/4) and only touches output slice blk
        expected = torch.zeros(48)
        expected[blk * 12 : (blk + 1) * 12] = adapter.scale * adapter.B[blk] @ adapter.A[blk][:, t % 16]
        torch.testing.assert_close(row, expected.detach())


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_identity_at_init_then_merged_equals_unmerged(make):
    model, x = make(), tokens()
    y0 = logits(model, x)
    lk.attach(model, lk.method_config("melora", n=4), targets="all-linear")
    torch.testing.assert_close(logits(model, x), y0, atol=0, rtol=0)
    randomize_adapters(model, std=0.1)
    y = logits(model, x)
    assert (y - y0).abs().max() > 1e-2
    torch.testing.assert_close(logits(lk.merge(model), x), y, atol=1e-5, rtol=1e-5)


def test_block_count_must_divide_the_layer_dims():
    with pytest.raises(lk.ConfigError, match=r"melora n=3 .*d_in=64, d_out=64"):
        lk.attach(tiny_llama(), lk.method_config("melora", n=3), targets=["q_proj"])
    with pytest.raises(lk.ConfigError, match="n must be a positive integer"):
        lk.method_config("melora", n=0)
