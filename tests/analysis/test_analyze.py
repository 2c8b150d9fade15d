"""lk.analyze end to end on tiny saved bases: weight layouts, base-relative numbers, full-FT intruders, outputs."""

from __future__ import annotations

import json

import pytest
import torch

import lorakit as lk
from lorakit.analysis.run import NO_BASE_NOTE
from lorakit.analysis.weights import module_weight
from lorakit.errors import AdapterFormatError, ConfigError
from lorakit.extract.checkpoint import Checkpoint
from lorakit.io.factors import read_factors
from lorakit.layers import weight_out_in
from lorakit.testing import randomize_adapters, tiny_gpt2, tiny_llama
from tests.helpers import GPT2_TARGETS

BUILDERS = {"llama": (tiny_llama, "all-linear"), "gpt2": (tiny_gpt2, GPT2_TARGETS)}


@pytest.fixture(scope="module", params=list(BUILDERS))
def saved(request, tmp_path_factory):
    """(adapter dir, base checkpoint dir, base builder) with random non-zero deltas."""
    build, targets = BUILDERS[request.param]
    root = tmp_path_factory.mktemp(request.param)
    build(seed=0).save_pretrained(root / "base")
    model = lk.attach(build(seed=0), lk.method_config("lora", r=4, alpha=8), targets=targets)
    randomize_adapters(model, std=0.2)
    lk.save_adapter(model, root / "adapter")
    return root / "adapter", root / "base", build


def test_base_weights_are_read_in_out_in_layout_for_every_layer_kind(saved):
    adapter_dir, base_dir, build = saved
    adapter, ckpt, reference = read_factors(adapter_dir), Checkpoint(base_dir), build(seed=0)
    kinds = set()
    for name, f in adapter.factors.items():
        kind = adapter.kinds[name]
        kinds.add(kind)
        W0 = module_weight(ckpt, name, kind, (f.B.shape[0], f.A.shape[1]))
        torch.testing.assert_close(W0, weight_out_in(reference.get_submodule(name)).detach(), rtol=0, atol=0)
    assert kinds in ({"linear"}, {"conv1d", "embedding"})


def test_report_numbers_match_the_model(saved):
    adapter_dir, base_dir, build = saved
    report = lk.analyze(adapter_dir, base=base_dir)
    adapter, base = read_factors(adapter_dir), build(seed=0)
    assert sorted(m.module for m in report.modules) == sorted(adapter.factors)
    assert report.params == sum(f.A.numel() + f.B.numel() for f in adapter.factors.values())
    for m in report.modules:
        W0 = weight_out_in(base.get_submodule(m.module)).detach()
        assert m.delta_rel == pytest.approx(float(adapter.delta(m.module).norm() / W0.norm()), rel=1e-5)
        assert m.intruders is not None and m.intruders.top_k == 10 and len(m.intruders.max_cos) == 10
    assert report.intruder_total() == sum(m.intruders.count for m in report.modules)
    assert report.notes == []


def test_without_a_base_intruders_are_skipped_with_a_note(saved):
    report = lk.analyze(saved[0])
    assert all(m.intruders is None and m.delta_rel is None for m in report.modules)
    assert report.notes == [NO_BASE_NOTE] and NO_BASE_NOTE in report.summary()
    assert report.to_dict()["totals"]["intruders"] is None


def test_a_full_fine_tune_equal_to_the_merged_adapter_has_the_same_intruders(saved, tmp_path):
    adapter_dir, base_dir, build = saved
    merged = lk.merge(lk.load_adapter(build(seed=0), adapter_dir))  # W0 + ΔW folded in: a "full fine-tune"
    merged.save_pretrained(tmp_path / "tuned")
    report = lk.analyze(adapter_dir, base=base_dir, tuned=tmp_path / "tuned", top_k=6, threshold=0.6)
    for m in report.modules:
        assert m.intruders_tuned is not None and m.intruders is not None
        assert m.intruders_tuned.indices == m.intruders.indices
    assert report.intruder_total(tuned=True) == report.intruder_total() > 0


def test_a_different_base_is_refused(saved, tmp_path):
    adapter_dir, _, build = saved
    build(seed=1).save_pretrained(tmp_path / "other")
    with pytest.raises(AdapterFormatError, match="different base"):
        lk.analyze(adapter_dir, base=tmp_path / "other")


def test_bad_options_are_config_errors(saved):
    with pytest.raises(ConfigError, match="--tuned needs --base"):
        lk.analyze(saved[0], tuned=saved[1])
    with pytest.raises(ConfigError, match="threshold"):
        lk.analyze(saved[0], threshold=0.0)


def test_save_writes_json_and_plots(saved, tmp_path):
    adapter_dir, base_dir, _ = saved
    report = lk.analyze(adapter_dir, base=base_dir, compare=[adapter_dir])
    out = report.save(tmp_path / "analysis")
    data = json.loads((out / "analysis.json").read_text())
    assert data == json.loads(report.to_json())
    assert data["totals"]["modules"] == len(report.modules) and data["intruder_settings"] == {
        "top_k": 10,
        "threshold": 0.5,
    }
    assert data["compare"][0]["mean_overlap"] == pytest.approx(1.0)
    pngs = {p.name for p in out.glob("*.png")}
    assert pngs == {"spectra.png", "energy.png", "effective_rank.png", "intruders.png", "overlap.png"}
    assert all((out / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)


def test_weight_keys_tolerate_prefixes_and_tied_heads(tmp_path):
    from lorakit.analysis.weights import weight_key

    tiny_gpt2(seed=0).save_pretrained(tmp_path / "gpt2")  # lm_head is tied to wte: not stored
    ckpt = Checkpoint(tmp_path / "gpt2")
    assert "lm_head.weight" not in ckpt
    assert weight_key(ckpt, "transformer.h.0.attn.c_attn") == "transformer.h.0.attn.c_attn.weight"
    assert weight_key(ckpt, "h.0.attn.c_attn") == "transformer.h.0.attn.c_attn.weight"  # a base-model prefix dropped
    assert weight_key(ckpt, "model.transformer.h.0.mlp.c_fc") == "transformer.h.0.mlp.c_fc.weight"  # one added
    assert weight_key(ckpt, "lm_head") == "transformer.wte.weight"
    assert weight_key(ckpt, "transformer.h.0.attn.nothing") is None
