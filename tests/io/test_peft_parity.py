"""Same weights in lorakit and PEFT give the same outputs, in both directions and when merged.

Covers LoRA, rsLoRA and DoRA on Linear (Llama), Conv1D (GPT-2) and Embedding targets, plus
per-module rank/alpha patterns, and checks the saved files use PEFT's field and key names.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

import lorakit as lk
from lorakit.inject import AdaptedLayer
from lorakit.testing import randomize_adapters
from tests.helpers import MODELS, logits, tokens

peft = pytest.importorskip("peft")

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::FutureWarning")]

TARGETS = {"llama": ["q_proj", "v_proj", "down_proj", "embed_tokens"], "gpt2": ["c_attn", "c_proj", "wte"]}
# lorakit (method, options) and the PEFT LoraConfig fields of the same variant
VARIANTS = {
    "lora": ("lora", {}, {}),
    "rslora": ("lora", {"rslora": True}, {"use_rslora": True}),
    "dora": ("dora", {}, {"use_dora": True}),
}
PATTERNS = {  # kind -> (rank_pattern, alpha_pattern), as suffixes both libraries read alike
    "llama": ({"v_proj": 2}, {"down_proj": 4.0}),
    "gpt2": ({"c_attn": 2}, {"c_proj": 3.0}),
}
CASES = [pytest.param(v, k, id=f"{v}-{k}") for v in VARIANTS for k in MODELS]
X = tokens()


def fresh(kind: str):
    return MODELS[kind][0](0)


def lorakit_adapter(kind: str, variant: str, patterns: bool = False):
    method, opts, _ = VARIANTS[variant]
    model = fresh(kind)
    rank_pattern, alpha_pattern = PATTERNS[kind] if patterns else (None, None)
    torch.manual_seed(0)
    lk.attach(
        model,
        lk.method_config(method, r=4, alpha=8, **opts),
        targets=TARGETS[kind],
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
    )
    randomize_adapters(model, seed=1)
    return model


def peft_adapter(kind: str, variant: str, patterns: bool = False, targets: list[str] | None = None):
    """A PEFT model with random (non-identity) A, B and, for DoRA, a perturbed magnitude."""
    rank_pattern, alpha_pattern = PATTERNS[kind] if patterns else ({}, {})
    config = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=targets or TARGETS[kind],
        init_lora_weights=False,
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        **VARIANTS[variant][2],
    )
    model = peft.get_peft_model(fresh(kind), config).eval()
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.2 * torch.rand(p.shape, generator=g))
    return model


def saved_keys(path) -> dict[str, tuple[int, ...]]:
    with safe_open(str(path / "adapter_model.safetensors"), framework="pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)


@pytest.mark.parametrize("patterns", [False, True], ids=["plain", "patterns"])
@pytest.mark.parametrize("variant, kind", CASES)
def test_lorakit_to_peft(variant, kind, patterns, tmp_path):
    model = lorakit_adapter(kind, variant, patterns)
    y = logits(model, X)
    lk.save_adapter(model, tmp_path / "a")
    theirs = peft.PeftModel.from_pretrained(fresh(kind), tmp_path / "a").eval()
    torch.testing.assert_close(logits(theirs, X), y, atol=1e-5, rtol=1e-5)
    assert_same_layers(model, theirs, patterns)


@pytest.mark.parametrize("patterns", [False, True], ids=["plain", "patterns"])
@pytest.mark.parametrize("variant, kind", CASES)
def test_peft_to_lorakit(variant, kind, patterns, tmp_path):
    theirs = peft_adapter(kind, variant, patterns)
    y = logits(theirs, X)
    theirs.save_pretrained(tmp_path / "p")
    ours = lk.load_adapter(fresh(kind), tmp_path / "p")
    torch.testing.assert_close(logits(ours, X), y, atol=1e-5, rtol=1e-5)
    assert_same_layers(ours, theirs, patterns)


def assert_same_layers(ours, theirs, patterns: bool) -> None:
    """Both models adapt the same modules with the same per-module rank and scale."""
    peft_layers = {
        n.removeprefix("base_model.model."): m
        for n, m in theirs.named_modules()
        if isinstance(m, peft.tuners.lora.LoraLayer)
    }
    wrappers = {n: m for n, m in ours.named_modules() if isinstance(m, AdaptedLayer)}
    assert wrappers.keys() == peft_layers.keys()
    for name, wrapper in wrappers.items():
        adapter = wrapper.adapters["default"]
        assert adapter.config.r == peft_layers[name].r["default"], name
        assert adapter.scale == pytest.approx(peft_layers[name].scaling["default"]), name
    ranks = {w.adapters["default"].config.r for w in wrappers.values()}
    scales = {w.adapters["default"].scale for w in wrappers.values()}
    assert (len(ranks) > 1 and len(scales) > 2) == patterns  # the patterns took effect (or none exist)


@pytest.mark.parametrize("variant, kind", CASES)
def test_saved_files_use_peft_names(variant, kind, tmp_path):
    lk.save_adapter(lorakit_adapter(kind, variant, patterns=True), tmp_path / "a")
    peft_adapter(kind, variant, patterns=True).save_pretrained(tmp_path / "p")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    rank_pattern, alpha_pattern = PATTERNS[kind]
    assert config["peft_type"] == "LORA"
    assert (config["r"], config["lora_alpha"]) == (4, 8)
    assert config["use_rslora"] == (variant == "rslora") and config["use_dora"] == (variant == "dora")
    assert sorted(config["target_modules"]) == sorted(TARGETS[kind])
    for field, pattern in (("rank_pattern", rank_pattern), ("alpha_pattern", alpha_pattern)):
        ((suffix, value),) = pattern.items()
        assert config[field] and all(k.endswith(suffix) and v == value for k, v in config[field].items()), field
    peft_config = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    assert set(config) - set(peft_config) <= {"lorakit"}, "fields PEFT does not know"
    # the same tensors under the same names and shapes (PEFT also saves whole embedding matrices)
    ours, theirs = saved_keys(tmp_path / "a"), saved_keys(tmp_path / "p")
    theirs = {k: s for k, s in theirs.items() if not k.endswith(".base_layer.weight")}
    assert ours == theirs
    embed = "model.embed_tokens" if kind == "llama" else "transformer.wte"
    linear = "model.layers.0.self_attn.q_proj" if kind == "llama" else "transformer.h.0.attn.c_attn"
    expected = [
        f"base_model.model.{linear}.lora_A.weight",
        f"base_model.model.{linear}.lora_B.weight",
        f"base_model.model.{embed}.lora_embedding_A",
        f"base_model.model.{embed}.lora_embedding_B",
    ]
    if variant == "dora":
        expected.append(f"base_model.model.{linear}.lora_magnitude_vector")
    assert set(expected) <= set(ours)


@pytest.mark.parametrize("variant, kind", CASES)
def test_merge_matches_peft_merge_and_unload(variant, kind, tmp_path):
    targets = [t for t in TARGETS[kind] if t != "wte"]  # GPT-2 ties wte to lm_head; PEFT merges into both
    theirs = peft_adapter(kind, variant, targets=targets)
    theirs.save_pretrained(tmp_path / "p")
    ours = lk.merge(lk.load_adapter(fresh(kind), tmp_path / "p"))
    theirs_merged = theirs.merge_and_unload()
    ours_sd, theirs_sd = ours.state_dict(), theirs_merged.state_dict()
    assert ours_sd.keys() == theirs_sd.keys()
    base_sd = fresh(kind).state_dict()
    changed = [k for k in ours_sd if not torch.equal(ours_sd[k], base_sd[k])]
    assert changed, "the merge changed no weight"
    for key in ours_sd:
        torch.testing.assert_close(ours_sd[key], theirs_sd[key], atol=1e-5, rtol=1e-5, msg=key)
    torch.testing.assert_close(logits(ours, X), logits(theirs_merged, X), atol=1e-5, rtol=1e-5)
