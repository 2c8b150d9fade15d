"""Bad input gives one clear lorakit error that names the file, key or module, and changes nothing.

Every failing load is followed by a check that the model is exactly as before (no wrappers, no
adapter names, base outputs). Saves are atomic: a crash or a refused path never loses data.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import safetensors.torch
import torch

import lorakit as lk
from lorakit.methods import REGISTRY
from lorakit.testing import tiny_llama
from tests.helpers import LLAMA_TARGETS, adapt, has_wrappers, logits, tokens

X = tokens()
CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """A valid LoRA adapter (r=4) for tiny_llama(seed=0), saved once; tests copy it before editing."""
    path = tmp_path_factory.mktemp("saved") / "adapter"
    lk.save_adapter(adapt(tiny_llama(0), "lora"), path)
    return path


@pytest.fixture
def adapter_dir(saved, tmp_path) -> Path:
    path = tmp_path / "adapter"
    path.mkdir()
    for f in saved.iterdir():
        (path / f.name).write_bytes(f.read_bytes())
    return path


@pytest.fixture
def base():
    """A fresh tiny_llama and its logits, to check a failing call leaves it as it was."""
    model = tiny_llama(0)
    return model, logits(model, X), set(model.state_dict())


def assert_untouched(base) -> None:
    model, y0, keys = base
    assert lk.adapter_names(model) == [] and not has_wrappers(model)
    assert set(model.state_dict()) == keys
    assert torch.equal(logits(model, X), y0)


def edit_config(path: Path, **changes) -> None:
    config = json.loads((path / CONFIG).read_text())
    config.update(changes)
    (path / CONFIG).write_text(json.dumps(config))


def edit_weights(path: Path, edit) -> None:
    tensors = safetensors.torch.load_file(str(path / WEIGHTS))
    edit(tensors)
    safetensors.torch.save_file(tensors, str(path / WEIGHTS))


def some_key(tensors: dict, suffix: str = "lora_A.weight") -> str:
    return min(k for k in tensors if k.endswith(suffix))


def truncate(path: Path) -> None:
    data = (path / WEIGHTS).read_bytes()
    (path / WEIGHTS).write_bytes(data[: len(data) // 2])


def set_nan(tensors: dict) -> None:
    tensors[some_key(tensors)][0, 0] = float("nan")


def add_key(tensors: dict) -> None:
    tensors["base_model.model.model.layers.0.mlp.nonexistent.lora_A.weight"] = torch.zeros(4, 64)


def drop_key(tensors: dict) -> None:
    del tensors[some_key(tensors, "lora_B.weight")]


def grow_rank(path: Path) -> None:
    edit_config(path, r=8)


def foreign_rank(path: Path) -> None:
    """Weights of an r=2 adapter under a config that says r=4."""
    lk.save_adapter(adapt(tiny_llama(0), "lora", r=2), path.parent / "r2")
    (path / WEIGHTS).write_bytes((path.parent / "r2" / WEIGHTS).read_bytes())


def retarget(path: Path) -> None:
    """A PEFT-style dir (no lorakit metadata, which would list the modules) whose targets match nothing."""
    edit_weights(path, lambda tensors: None)  # re-saving drops the safetensors metadata
    edit_config(path, target_modules=["nonexistent"])


# (name, how to break the dir, error type, words the message must contain)
BROKEN = [
    ("truncated", truncate, lk.AdapterFormatError, [WEIGHTS, "truncated"]),
    (
        "lorakit-method",
        lambda p: edit_config(p, lorakit={"method": "nope", "config": {}}),
        lk.AdapterFormatError,
        [CONFIG, "'nope'"],
    ),
    ("peft-type", lambda p: edit_config(p, peft_type="FOO"), lk.AdapterFormatError, [CONFIG, "'FOO'"]),
    ("config-rank", grow_rank, lk.AdapterFormatError, [WEIGHTS, "lora_", "shape", "rank 8"]),
    ("weights-rank", foreign_rank, lk.AdapterFormatError, [WEIGHTS, "lora_", "shape"]),
    ("nan", lambda p: edit_weights(p, set_nan), lk.AdapterFormatError, [WEIGHTS, "lora_A.weight", "NaN"]),
    ("unknown-key", lambda p: edit_weights(p, add_key), lk.AdapterFormatError, [WEIGHTS, "nonexistent.lora_A"]),
    ("missing-key", lambda p: edit_weights(p, drop_key), lk.AdapterFormatError, [WEIGHTS, "lora_B.weight"]),
    ("no-config", lambda p: (p / CONFIG).unlink(), lk.AdapterFormatError, [CONFIG]),
    ("no-weights", lambda p: (p / WEIGHTS).unlink(), lk.AdapterFormatError, [WEIGHTS]),
    ("bad-json", lambda p: (p / CONFIG).write_text("{'r': 4,"), lk.AdapterFormatError, [CONFIG, "JSON"]),
    ("json-list", lambda p: (p / CONFIG).write_text("[1, 2]"), lk.AdapterFormatError, [CONFIG, "object"]),
    (
        "pissa",
        lambda p: edit_config(p, init_lora_weights="pissa_niter_4"),
        lk.AdapterFormatError,
        [CONFIG, "pissa", "path_initial_model_for_weight_conversion"],
    ),
    ("bad-r", lambda p: edit_config(p, r=0), lk.AdapterFormatError, [CONFIG, "r must be"]),
    (
        "layers-to-transform",
        lambda p: edit_config(p, layers_to_transform=[0]),
        lk.AdapterFormatError,
        [CONFIG, "layers_to_transform"],
    ),
    ("targets-miss", retarget, lk.AdapterFormatError, [CONFIG, "nonexistent", "do not fit"]),
]


@pytest.mark.parametrize("break_it, error, words", [pytest.param(*b[1:], id=b[0]) for b in BROKEN])
def test_broken_adapter_dir(adapter_dir, base, break_it, error, words):
    break_it(adapter_dir)
    with pytest.raises(error) as info:
        lk.load_adapter(base[0], adapter_dir)
    for word in words:
        assert word in str(info.value)
    assert_untouched(base)


def test_missing_directory(tmp_path, base):
    with pytest.raises(lk.AdapterFormatError, match="does not exist"):
        lk.load_adapter(base[0], tmp_path / "nowhere")
    assert_untouched(base)


def test_adapter_for_a_different_base(adapter_dir):
    other = tiny_llama(seed=1)
    y0 = logits(other, X)
    with pytest.raises(lk.AdapterFormatError, match="different base model") as info:
        lk.load_adapter(other, adapter_dir)
    assert str(adapter_dir) in str(info.value) and "check_base=False" in str(info.value)
    assert_untouched((other, y0, set(other.state_dict())))
    lk.load_adapter(other, adapter_dir, check_base=False)
    assert lk.adapter_names(other) == ["default"] and (logits(other, X) - y0).abs().max() > 1e-3


def test_loading_under_a_taken_name_keeps_the_first(adapter_dir):
    model = lk.load_adapter(tiny_llama(0), adapter_dir, name="a")
    y = logits(model, X)
    with pytest.raises(lk.ConfigError, match="'a'"):
        lk.load_adapter(model, adapter_dir, name="a")
    assert lk.adapter_names(model) == ["a"] and torch.equal(logits(model, X), y)


def test_failed_load_keeps_other_adapters_active(adapter_dir, tmp_path):
    model = lk.load_adapter(tiny_llama(0), adapter_dir, name="a")
    y = logits(model, X)
    edit_weights(adapter_dir, set_nan)
    with pytest.raises(lk.AdapterFormatError):
        lk.load_adapter(model, adapter_dir, name="b")
    assert lk.adapter_names(model) == ["a"] and lk.active_adapter(model) == "a"
    assert torch.equal(logits(model, X), y)


@pytest.mark.parametrize(
    "targets, words",
    [
        (["nonexistent"], ["nonexistent", "matched no module", "q_proj"]),
        ("model\\.nothing\\..*", ["model\\\\.nothing", "matched no module"]),
        (["mlp"], ["model.layers.0.mlp", "LlamaMLP", "exclude"]),
        (["input_layernorm"], ["input_layernorm", "LlamaRMSNorm"]),
        ("[unclosed", ["[unclosed", "regular expression"]),
    ],
    ids=["suffix", "regex", "mlp-block", "norm", "bad-regex"],
)
def test_bad_targets(base, targets, words):
    with pytest.raises(lk.TargetError) as info:
        lk.attach(base[0], lk.method_config("lora"), targets=targets)
    for word in words:
        assert word in str(info.value)
    assert_untouched(base)
    assert all(p.requires_grad for p in base[0].parameters())  # attach froze nothing


def test_exclude_everything_is_an_error(base):
    with pytest.raises(lk.TargetError, match="exclude"):
        lk.attach(base[0], lk.method_config("lora"), targets=LLAMA_TARGETS, exclude=LLAMA_TARGETS)
    assert_untouched(base)


def test_unknown_method_and_option():
    with pytest.raises(lk.ConfigError, match="'lorra'.*Did you mean 'lora'"):
        lk.method_config("lorra")
    with pytest.raises(lk.ConfigError, match="rank_size") as info:
        lk.method_config("lora", rank_size=4)
    assert "alpha" in str(info.value)  # lists the valid options


INVALID = [("r", 0), ("r", -2), ("r", 2.5), ("alpha", 0), ("dropout", 1.5), ("dropout", -0.1), ("init", "x")]


@pytest.mark.parametrize("method", sorted(REGISTRY))
@pytest.mark.parametrize("field, value", INVALID, ids=[f"{f}={v}" for f, v in INVALID])
def test_invalid_config_values(method, field, value):
    if field not in REGISTRY[method].config.__dataclass_fields__:
        pytest.skip(f"{method} has no {field}")
    with pytest.raises(lk.ConfigError, match=field):
        lk.method_config(method, **{field: value})


def test_config_is_frozen():
    cfg = lk.method_config("lora")
    with pytest.raises(AttributeError):
        cfg.r = 16


# ---- atomic writes -------------------------------------------------------------------------------


def listing(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def test_save_replaces_an_existing_adapter(tmp_path):
    path = tmp_path / "adapter"
    lk.save_adapter(adapt(tiny_llama(0), "lora", seed=1), path)
    (path / "README.md").write_text("notes")
    second = adapt(tiny_llama(0), "lora", seed=2)
    lk.save_adapter(second, path)
    loaded = lk.load_adapter(tiny_llama(0), path)
    torch.testing.assert_close(logits(loaded, X), logits(second, X), atol=1e-6, rtol=0)
    assert (path / "README.md").read_text() == "notes"  # files the save does not write are kept
    assert os.listdir(tmp_path) == ["adapter"]


def test_save_refuses_a_foreign_folder(tmp_path):
    path = tmp_path / "project"
    path.mkdir()
    (path / "train.py").write_text("print('mine')")
    before = listing(path)
    with pytest.raises(lk.AdapterFormatError, match="refusing") as info:
        lk.save_adapter(adapt(tiny_llama(0), "lora"), path)
    assert str(path) in str(info.value)
    assert listing(path) == before and os.listdir(tmp_path) == ["project"]


def test_save_refuses_a_file_path(tmp_path):
    (tmp_path / "adapter").write_text("x")
    with pytest.raises(lk.AdapterFormatError, match="is a file"):
        lk.save_adapter(adapt(tiny_llama(0), "lora"), tmp_path / "adapter")
    assert (tmp_path / "adapter").read_text() == "x"


def test_crash_during_save_keeps_the_previous_adapter(saved, tmp_path, monkeypatch):
    path = tmp_path / "adapter"
    path.mkdir()
    for f in saved.iterdir():
        (path / f.name).write_bytes(f.read_bytes())
    before = listing(path)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        lk.save_adapter(adapt(tiny_llama(0), "lora", seed=3), path)
    assert listing(path) == before
    assert os.listdir(tmp_path) == ["adapter"]  # no temp dir left beside it
    monkeypatch.undo()
    assert lk.adapter_names(lk.load_adapter(tiny_llama(0), path)) == ["default"]


def test_crash_during_first_save_leaves_nothing(tmp_path, monkeypatch):
    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        lk.save_adapter(adapt(tiny_llama(0), "lora"), tmp_path / "adapter")
    assert os.listdir(tmp_path) == []


def test_save_unknown_adapter_name(tmp_path):
    with pytest.raises(lk.ConfigError, match="'missing'"):
        lk.save_adapter(adapt(tiny_llama(0), "lora"), tmp_path / "out", name="missing")
    assert os.listdir(tmp_path) == []
