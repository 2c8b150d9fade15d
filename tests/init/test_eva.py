"""EVA: A = top right-singular vectors of each layer's centred inputs, B = 0; ranks redistributed by explained
variance under the budget r·#layers; matches PEFT's EVA (same A up to sign, same ranks) on the same batches."""

from __future__ import annotations

import json

import pytest
import torch
from transformers.pytorch_utils import Conv1D

import lorakit as lk
from lorakit import layers as L
from lorakit.init._calib import input_activations
from lorakit.inject import wrappers
from lorakit.testing import randomize_adapters, tiny_gpt2, tiny_llama
from tests.helpers import logits, tokens

peft = pytest.importorskip("peft")
LLAMA = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def batches(n: int = 2, t: int = 16, seed: int = 3) -> list[dict[str, torch.Tensor]]:
    ids = tokens(n, t, seed=seed)
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0  # padding
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :2] = -100  # a "prompt": skipped with use_label_mask
    return [{"input_ids": ids, "attention_mask": mask, "labels": labels}]


def skewed_llama() -> torch.nn.Module:
    """tiny_llama with decaying norm gains, so layer inputs have distinct, well-separated spectra."""
    model = tiny_llama()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.input_layernorm.weight.copy_(0.8 ** torch.arange(64.0))
            layer.post_attention_layernorm.weight.copy_(0.8 ** torch.arange(64.0))
    return model


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_a_is_the_principal_directions_and_ranks_follow_explained_variance(make):
    r, rho, data, x = 4, 2.0, batches(4) if make is tiny_llama else batches(4, seed=8), tokens()
    original, model = make(), make()
    names = [n for n, m in original.named_modules() if isinstance(m, torch.nn.Linear | Conv1D) and "head" not in n]
    lk.attach(
        model,
        lk.method_config("lora", r=r, alpha=8, init="eva", init_options={"rho": rho}),
        targets=names,
        calibration=data,
    )
    torch.testing.assert_close(logits(model, x), logits(original, x), atol=0, rtol=0)  # B = 0
    rows = input_activations(original, names, data, label_mask=True)  # the reference: plain SVD of the inputs
    k = round(r * rho)
    spectra = {}
    for n in names:
        _, S, Vh = torch.linalg.svd((rows[n] - rows[n].mean(0)).double(), full_matrices=False)
        spectra[n] = (Vh[:k], (S**2 / (S**2).sum())[:k])
    pool = sorted(((float(v), i, n) for i, n in enumerate(names) for v in spectra[n][1]), key=lambda t: (-t[0], t[1]))
    expected = {n: sum(1 for _, _, m in pool[: r * len(names)] if m == n) for n in names}
    adapted = {n: w.adapters["default"] for n, w in wrappers(model)}
    assert {n: a.config.r for n, a in adapted.items()} == {n: c for n, c in expected.items() if c}
    assert sum(expected.values()) == r * len(names) and max(expected.values()) <= k
    for n, a in adapted.items():
        rank = a.config.r
        overlap = a.A.double() @ spectra[n][0][:rank].T  # (rank, rank): ± identity
        torch.testing.assert_close(overlap.abs(), torch.eye(rank, dtype=torch.double), atol=1e-4, rtol=0)
        assert not a.B.any() and a.scale == pytest.approx(2.0)  # alpha scaled with the rank: s stays alpha/r
        assert sum(p.numel() for p in a.parameters() if p.requires_grad) == rank * sum(L.dims(wrappers_of(model, n)))


def wrappers_of(model, name):
    return dict(wrappers(model))[name].base_layer


def test_matches_peft_eva_on_the_same_batches(tmp_path):
    """PEFT's incremental, sketched PCA is exact here (64 rows, decaying spectra): same ranks and A up to sign."""
    ids = tokens(4, 16, seed=3)
    data = [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}]
    ours = skewed_llama()
    lk.attach(ours, lk.method_config("lora", r=4, alpha=8, init="eva"), targets=LLAMA, calibration=data)
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=LLAMA, init_lora_weights="eva", eva_config=peft.EvaConfig()
    )
    theirs = peft.get_peft_model(skewed_llama(), config)
    peft.initialize_lora_eva_weights(theirs, dataloader=data, show_progress_bar=False)
    layers = {n: m for n, m in theirs.base_model.model.named_modules() if hasattr(m, "lora_A")}
    mine = {n: w.adapters["default"] for n, w in wrappers(ours)}
    assert {n: a.config.r for n, a in mine.items()} == {n: m.r["default"] for n, m in layers.items()}
    assert len(set(a.config.r for a in mine.values())) > 1  # the ranks were really redistributed
    for n, a in mine.items():
        A = layers[n].lora_A["default"].weight.detach()
        sign = torch.sign((A * a.A).sum(1))
        torch.testing.assert_close(a.A, A * sign[:, None], atol=1e-5, rtol=0)
        assert layers[n].scaling["default"] == pytest.approx(a.scale)
    randomize_adapters(ours, std=0.05)
    x = tokens()
    lk.save_adapter(ours, tmp_path / "ours")
    fields = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert fields["init_lora_weights"] == "eva" and fields["rank_pattern"]
    loaded = peft.PeftModel.from_pretrained(skewed_llama(), tmp_path / "ours").eval()
    torch.testing.assert_close(logits(loaded, x), logits(ours, x), atol=1e-5, rtol=0)
    theirs.save_pretrained(tmp_path / "theirs")  # PEFT's EVA dir loads in lorakit with PEFT's outputs
    y_theirs = logits(peft.PeftModel.from_pretrained(skewed_llama(), tmp_path / "theirs").eval(), x)
    torch.testing.assert_close(
        logits(lk.load_adapter(skewed_llama(), tmp_path / "theirs"), x), y_theirs, atol=1e-5, rtol=0
    )


def test_a_layer_with_no_explained_variance_is_left_unadapted(tmp_path):
    def make():
        model = tiny_llama()
        with torch.no_grad():
            model.model.layers[1].post_attention_layernorm.weight.zero_()  # gate/up of layer 1 see only zeros
        return model

    model, x = make(), tokens()
    lk.attach(model, lk.method_config("lora", r=4, init="eva"), targets=LLAMA, calibration=batches(4))
    adapted = {n: w.adapters["default"].config.r for n, w in wrappers(model)}
    assert "model.layers.1.mlp.gate_proj" not in adapted and "model.layers.1.mlp.up_proj" not in adapted
    assert sum(adapted.values()) == 4 * 14  # the budget went to the other layers
    randomize_adapters(model)
    lk.save_adapter(model, tmp_path / "a")
    loaded = lk.load_adapter(make(), tmp_path / "a")
    assert {n: w.adapters["default"].config.r for n, w in wrappers(loaded)} == adapted
    torch.testing.assert_close(logits(loaded, x), logits(model, x), atol=1e-6, rtol=0)


def test_bad_calibration_and_options_are_clear_errors():
    with pytest.raises(lk.ConfigError, match="eva.*initialises from data"):
        lk.attach(tiny_llama(), lk.method_config("lora", init="eva"))
    with pytest.raises(lk.ConfigError, match="hold 8 token rows but at least 16"):
        lk.attach(tiny_llama(), lk.method_config("lora", r=8, init="eva"), calibration=[{"input_ids": tokens(1, 8)}])
    with pytest.raises(lk.ConfigError, match="saw 13 token rows .* at least 16"):  # 20 - 3 padding - 2·2 prompt
        lk.attach(tiny_llama(), lk.method_config("lora", r=8, init="eva"), calibration=batches(2, 10))
    with pytest.raises(lk.ConfigError, match="rho must be >= 1"):
        lk.method_config("lora", init="eva", init_options={"rho": 0.5})
    with pytest.raises(lk.TargetError, match="cannot wrap model.embed_tokens"):
        lk.attach(tiny_llama(), lk.method_config("lora", init="eva"), targets=["embed_tokens"], calibration=batches())
