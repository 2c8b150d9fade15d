"""The `lorakit` command line, driven through typer's CliRunner on tiny models."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import lorakit as lk
from lorakit.cli import app
from lorakit.cli.generate import greedy
from lorakit.inject import wrappers
from lorakit.methods import REGISTRY
from lorakit.models import BUNDLED, cache_dir
from lorakit.testing import randomize_adapters, tiny_llama

runner = CliRunner()


def invoke(*args: str, **kwargs):
    return runner.invoke(app, [str(a) for a in args], **kwargs)


def _trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.fixture(scope="module", params=["lora", "dora"])
def saved(request, tmp_path_factory):
    """(adapter dir, model it was saved from) for a tiny Llama with mixed ranks."""
    model = tiny_llama()
    lk.attach(model, lk.method_config(request.param, r=4, alpha=8), targets="all-linear", rank_pattern={"down_proj": 2})
    randomize_adapters(model)
    path = lk.save_adapter(model, tmp_path_factory.mktemp("adapter") / request.param)
    return path, model, request.param


def test_info_lists_methods_models_and_cache():
    result = invoke("info")
    assert result.exit_code == 0, result.output
    for name in ("lora", "dora", *BUNDLED):
        assert name in result.stdout
    data = json.loads(invoke("info", "--json").stdout)
    assert [m["name"] for m in data["methods"]] == sorted(REGISTRY)
    assert {m["name"]: m["url"] for m in data["methods"]} == {n: s.url for n, s in REGISTRY.items()}
    assert [m["name"] for m in data["models"]] == list(BUNDLED)
    assert all(m["package_installed"] for m in data["models"])
    assert data["cache_dir"] == str(cache_dir()) and data["version"] == lk.__version__


def test_info_lists_the_optimizers_and_training_callbacks_with_their_help():
    from lorakit.train.callbacks import CALLBACKS
    from lorakit.train.optimizers import OPTIMIZERS
    from lorakit.train.placement import PLACEMENTS

    text = " ".join(invoke("info").stdout.replace("│", " ").split())
    for spec in (*OPTIMIZERS.values(), *CALLBACKS.values()):
        assert spec.name in text and spec.help in text, spec.name
    data = json.loads(invoke("info", "--json").stdout)
    assert [o["name"] for o in data["optimizers"]] == sorted(OPTIMIZERS)
    assert {o["name"]: o["url"] for o in data["optimizers"]} == {n: s.url for n, s in OPTIMIZERS.items()}
    assert {c["name"]: c["help"] for c in data["callbacks"]} == {n: s.help for n, s in CALLBACKS.items()}
    assert {c["name"]: c["help"] for c in data["placements"]} == {n: s.help for n, s in PLACEMENTS.items()}


def test_inspect_counts_match_the_model(saved):
    path, model, method = saved
    ranks = Counter(w.adapters["default"].config.r for _, w in wrappers(model))
    assert ranks == {4: 12, 2: 2}  # 2 layers x (q, k, v, o, gate, up) at r=4, down_proj at r=2
    data = json.loads(invoke("inspect", path, "--json").stdout)
    assert data["method"] == method
    assert data["base_model"] == "lorakit/tiny-llama"
    assert data["target_modules"] == sum(ranks.values())
    assert data["ranks"] == {str(r): n for r, n in sorted(ranks.items())}
    assert data["trainable_params"] == _trainable(model)
    assert data["dtypes"] == ["F32"]
    assert data["file_bytes"] == sum(f.stat().st_size for f in path.iterdir())
    assert {m["module"]: m["rank"] for m in data["modules"]} == {
        n: w.adapters["default"].config.r for n, w in wrappers(model)
    }

    result = invoke("inspect", path)
    assert result.exit_code == 0, result.output
    text = result.stdout
    assert method in text and "lorakit/tiny-llama" in text and f"{_trainable(model):,}" in text
    assert "r=4: 12" in text and "r=2: 2" in text
    assert "model.layers.1.mlp.down_proj" not in text  # the per-module table only with --all
    assert "model.layers.1.mlp.down_proj" in invoke("inspect", path, "--all").stdout


def test_inspect_reads_a_peft_saved_adapter(tmp_path):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=3, lora_alpha=6, target_modules=["q_proj", "v_proj"]))
    model.save_pretrained(tmp_path)
    data = json.loads(invoke("inspect", tmp_path, "--json").stdout)
    assert data["method"] == "lora"
    assert data["ranks"] == {"3": 4}
    assert data["trainable_params"] == _trainable(model)


def test_inspect_missing_dir_is_one_clear_error(tmp_path):
    result = invoke("inspect", tmp_path / "nope")
    assert result.exit_code == 2
    assert "error: adapter directory" in result.stderr and "does not exist" in result.stderr
    assert "Traceback" not in result.output


def test_inspect_corrupt_weights_is_one_clear_error(saved, tmp_path, monkeypatch):
    path, _, _ = saved
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text((path / "adapter_config.json").read_text())
    (bad / "adapter_model.safetensors").write_bytes((path / "adapter_model.safetensors").read_bytes()[:100])
    result = invoke("inspect", bad)
    assert result.exit_code == 2 and "not a readable safetensors file" in result.stderr
    monkeypatch.setenv("LORAKIT_DEBUG", "1")  # debug mode: the exception comes through
    result = invoke("inspect", bad)
    assert isinstance(result.exception, lk.AdapterFormatError)


def test_every_verb_has_help():
    names = [c.name or c.callback.__name__ for c in app.registered_commands]
    assert {"info", "inspect", "generate", "demo"} <= set(names)
    for command, name in zip(app.registered_commands, names, strict=True):
        result = invoke(name, "--help")
        assert result.exit_code == 0, result.output
        first_words = " ".join(command.callback.__doc__.split()[:3])
        assert first_words in " ".join(result.stdout.split()), (name, result.stdout)
    top = invoke("--help")
    assert top.exit_code == 0 and all(name in top.stdout for name in names)
    for verb, shown in (("train", ("--steps <int>", "--lr <float>", "--out <path>", "(default 100)", "(default 2e-4)")),
                        ("demo", ("--steps <int range>", "[default: 30]"))):  # fmt: skip
        text = " ".join(invoke(verb, "--help").stdout.replace("│", " ").split())
        for typed in shown:
            assert typed in text, (verb, typed)  # typed options and their defaults are shown


def test_generate_base_and_adapter_on_a_local_checkpoint(tiny_checkpoint, tmp_path):
    model, tok = lk.load_base(str(tiny_checkpoint))
    for flag, chat in (("--no-chat", False), ("--chat", True)):
        result = invoke("generate", "--base", tiny_checkpoint, "--max-new-tokens", 8, flag, "hello")
        assert result.exit_code == 0, result.output
        assert result.stdout.strip() == greedy(model, tok, "hello", chat=chat, max_new_tokens=8)

    adapted = tiny_llama(seed=0)  # same weights as the checkpoint
    lk.attach(adapted, lk.method_config("lora", r=4), targets="all-linear")
    randomize_adapters(adapted, std=0.5)
    adapter = lk.save_adapter(adapted, tmp_path / "adapter")
    result = invoke("generate", "--base", tiny_checkpoint, "--adapter", adapter, "--max-new-tokens", 8, "hello")
    assert result.exit_code == 0, result.output
    lk.load_adapter(model, adapter)
    expected = greedy(model, tok, "hello", chat=True, max_new_tokens=8)
    assert result.stdout.strip() == expected
    with lk.disabled(model):
        assert expected != greedy(model, tok, "hello", chat=True, max_new_tokens=8)  # the adapter matters


def test_generate_unknown_base_is_one_clear_error():
    result = invoke("generate", "--base", "no-such-model", "hi")
    assert result.exit_code == 2
    assert "error: unknown base model 'no-such-model'" in result.stderr and "Traceback" not in result.output


def test_demo_lifecycle_on_a_tiny_checkpoint(tiny_checkpoint, tmp_path):
    out = tmp_path / "demo"
    result = invoke("demo", "--out", out, "--base", tiny_checkpoint, "--steps", 25, "--lr", 1e-2)
    assert result.exit_code == 0, result.output
    s = json.loads((out / "summary.json").read_text())
    assert s["ok"] and "all passed" in result.stdout
    assert s["loss_after"] < s["loss_before"] - 0.25  # a random tiny model learns slowly, but it learns
    assert len(s["losses"]) == 25
    assert 0.0 <= s["accuracy_before"] <= 1.0 and 0.0 <= s["accuracy_after"] <= 1.0
    assert s["reload_max_abs_diff"] <= 1e-5 and s["merge_max_abs_diff"] <= 1e-3
    assert s["adapter_effect_max_abs"] > 1e-3  # the trained adapter changed the logits
    assert Path(s["plot"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    inspected = json.loads(invoke("inspect", s["adapter_dir"], "--json").stdout)
    assert inspected["trainable_params"] == s["trainable_params"]
    assert inspected["target_modules"] == s["adapted_modules"] == 14  # all-linear on 2 layers
    assert torch.isfinite(torch.tensor(s["losses"])).all()
    # the short QLoRA step: the same LoRA on the NF4-quantized base, scored on the same questions, saved
    assert s["qlora_on_quantized"] and s["qlora_loss_after"] < s["qlora_loss_before"]
    assert 0.0 <= s["qlora_accuracy"] <= 1.0 and "QLoRA (nf4 base, 3 steps)" in result.stdout
    qlora = json.loads(invoke("inspect", s["qlora_dir"], "--json").stdout)
    assert Path(s["qlora_dir"]).name == "date-qlora" and qlora["target_modules"] == 14
