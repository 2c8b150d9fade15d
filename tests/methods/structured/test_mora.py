"""MoRA: one square r̂×r̂ M with parameter-free compress/decompress, r̂² ≈ r(d_in+d_out), merged = unmerged.

The authors' operators (peft-mora's ``_apply_mora`` and ``get_delta_weight``, types 1 and 6) are
transcribed below as plain loops and compared with lorakit's vectorised forward and folded ΔW.
"""

import math

import pytest
import torch
from torch import nn

import lorakit as lk
from lorakit import layers as L
from lorakit.inject import wrappers
from lorakit.methods.structured.mora import Mora
from lorakit.testing import randomize_adapters, tiny_gpt2, tiny_llama
from tests.helpers import logits, tokens

TYPE = {"sharing": 1, "rope": 6}


def rope_tables(r, chunks):
    inv_freq = 1.0 / (10000 ** (torch.arange(0, r, 2).float() / r))
    emb = torch.outer(torch.arange(chunks).float(), inv_freq)
    emb = torch.cat((emb, emb), dim=-1)
    return emb.cos().unsqueeze(0), emb.sin().unsqueeze(0)  # (1, chunks, r)


def reference_forward(x, M, in_f, out_f, kind):
    """peft-mora ``_apply_mora`` for mora_type 1 and 6."""
    r = M.shape[0]
    chunks = in_f // r
    if in_f % r != 0:
        x = torch.cat([x, x[..., : r - in_f % r]], dim=-1)
        chunks += 1
    in_x = x.view(*x.shape[:-1], chunks, r)
    if kind == 1:
        out_x = in_x.sum(dim=-2) @ M.T
        return torch.cat([out_x] * (out_f // r + (out_f % r != 0)), dim=-1)[..., :out_f]
    cos, sin = rope_tables(r, chunks)
    rotated = torch.cat((-in_x[..., r // 2 :], in_x[..., : r // 2]), dim=-1)
    out_x = ((in_x * cos + rotated * sin) @ M.T).reshape(*x.shape[:-1], -1)[..., :out_f]
    if out_x.shape[-1] < out_f:
        times = out_f // out_x.shape[-1] + (out_f % out_x.shape[-1] != 0)
        out_x = torch.cat([out_x] * times, dim=-1)[..., :out_f]
    return out_x


def reference_delta(M, in_f, out_f, kind):
    """peft-mora ``get_delta_weight`` for mora_type 1 and 6 (a Linear's (out, in) ΔW)."""
    r = M.shape[0]
    pad = r - in_f % r if in_f % r else 0
    repeat = out_f // r + (out_f % r != 0)
    if kind == 1:
        w = torch.zeros(r, in_f)
        for i in range(in_f + pad):
            w[:, i % in_f] += M[:, i % r]
        return torch.cat([w] * repeat, dim=0)[:out_f]
    w = torch.zeros(in_f + pad, in_f)
    chunks = -(-in_f // r)
    cos, sin = rope_tables(r, chunks)
    M2 = torch.cat((M[:, r // 2 :], -M[:, : r // 2]), dim=-1)
    for i in range(chunks):
        block = M2 * sin[:, i] + M * cos[:, i]
        if i < chunks - 1:
            w[i * r : (i + 1) * r, i * r : (i + 1) * r] = block
        else:
            w[i * r :, i * r :] = block[:, : r - pad]
            if pad > 0:
                w[i * r :, :pad] = block[:, r - pad :]
    return torch.cat([w] * repeat, dim=0)[:out_f] if in_f < out_f else w[:out_f]


# (d_in, d_out, r): padding with tiling (r̂ = 14, 3 chunks, 56 > 42 outputs), and padding with a cut (r̂ = 18)
SHAPES = [(40, 56, 2), (56, 24, 4)]


@pytest.mark.parametrize("variant", ["sharing", "rope"])
@pytest.mark.parametrize("d_in, d_out, r", SHAPES)
def test_forward_and_delta_equal_the_authors_operators(variant, d_in, d_out, r):
    base = nn.Linear(d_in, d_out)
    adapter = Mora.from_base(base, lk.method_config("mora", r=r, variant=variant))
    assert adapter.n == int(math.sqrt((d_in + d_out) * r) + 0.5)  # their r̂ (even here, so rope runs in theirs)
    randomize_adapters(adapter, std=0.5)
    M = adapter.M.detach()
    x = torch.randn(2, 3, d_in)
    with torch.no_grad():
        torch.testing.assert_close(
            adapter(x, base, base(x)) - base(x), reference_forward(x, M, d_in, d_out, TYPE[variant])
        )
        torch.testing.assert_close(adapter.delta_weight(base), reference_delta(M, d_in, d_out, TYPE[variant]))


@pytest.mark.parametrize("variant", ["sharing", "rope"])
def test_square_size_matches_the_lora_budget_and_only_m_trains(variant):
    model = tiny_llama()
    lk.attach(model, lk.method_config("mora", r=8, variant=variant), targets="all-linear")
    total = 0
    for _, w in wrappers(model):
        d_in, d_out = L.dims(w.base_layer)
        n, budget = w.adapters["default"].n, 8 * (d_in + d_out)
        assert abs(n - math.sqrt(budget)) <= (0.5 if variant == "sharing" else 1.0)  # r̂² ≈ r·(d_in + d_out)
        total += n * n
    assert {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad} == {"M"}
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == total


def test_rope_update_is_high_rank_while_sharing_is_at_most_r_hat():
    base = nn.Linear(64, 64)
    for variant, expected in (("rope", 64), ("sharing", None)):
        adapter = Mora.from_base(base, lk.method_config("mora", r=2, variant=variant))  # r̂ = 16 (LoRA rank 2 budget)
        randomize_adapters(adapter, std=1.0)
        rank = int(torch.linalg.matrix_rank(adapter.delta_weight(base).detach()))
        assert rank == (expected or adapter.n), variant


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
@pytest.mark.parametrize("variant", ["sharing", "rope"])
def test_zero_m_is_the_base_and_merged_equals_unmerged(make, variant):
    model, x = make(), tokens()
    y0 = logits(model, x)
    lk.attach(model, lk.method_config("mora", r=4, variant=variant), targets="all-linear")
    torch.testing.assert_close(logits(model, x), y0, atol=0, rtol=0)
    randomize_adapters(model, std=0.05)
    y = logits(model, x)
    assert (y - y0).abs().max() > 1e-2
    torch.testing.assert_close(logits(lk.merge(model), x), y, atol=1e-5, rtol=1e-5)


def test_bad_variant_and_embeddings_are_clear_errors():
    with pytest.raises(lk.ConfigError, match="variant must be one of"):
        lk.method_config("mora", variant="cosine")
    with pytest.raises(lk.TargetError, match="mora"):
        lk.attach(tiny_llama(), lk.method_config("mora"), targets=["embed_tokens"])
