"""PHLoRA extraction on tiny checkpoint pairs where the optimal answer is known."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import GPT2LMHeadModel

import lorakit as lk
from lorakit.errors import CheckpointError
from lorakit.extract import extract
from lorakit.io.factors import read_factors
from lorakit.testing import save_tuned_pair, tiny_gpt2, tiny_llama
from tests.helpers import logits, tokens

PLANTED = 3


def planted_pair(tmp_path, make=tiny_llama, noise: float = 1e-3, seed: int = 1, ranks=(PLANTED,)):
    """base, and tuned = base + a low-rank delta (ranks cycle through ``ranks``) + small noise on every Linear."""
    base = make(0)
    base.save_pretrained(tmp_path / "base")
    tuned = make(0)
    g = torch.Generator().manual_seed(seed)
    deltas = {}
    with torch.no_grad():
        linears = [(n, m) for n, m in tuned.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
        for i, (name, module) in enumerate(linears):
            out_f, in_f = module.weight.shape
            r = ranks[i % len(ranks)]
            low = torch.randn(out_f, r, generator=g) @ torch.randn(r, in_f, generator=g) / 10
            module.weight.add_(low + noise * torch.randn(out_f, in_f, generator=g))
            deltas[name] = (module.weight - base.get_submodule(name).weight).detach().clone()
    tuned.save_pretrained(tmp_path / "tuned")
    return base, tuned, deltas


def energy_rank(delta: torch.Tensor, energy: float) -> int:
    s2 = torch.linalg.svdvals(delta.double()).square()
    return int(torch.nonzero(torch.cumsum(s2, 0) / s2.sum() >= energy)[0]) + 1


@pytest.mark.parametrize("svd", ["auto", "exact", "randomized"])
def test_rank_r_error_matches_the_optimal_svd_error(tmp_path, svd):
    _, _, deltas = planted_pair(tmp_path)
    result = extract(tmp_path / "base", tmp_path / "tuned", tmp_path / "out", rank=PLANTED, svd=svd, progress=False)
    factors = read_factors(tmp_path / "out")
    assert set(factors.factors) == set(deltas)
    for module, delta in deltas.items():
        s2 = torch.linalg.svdvals(delta.double()).square()
        optimal = float((s2[PLANTED:].sum() / s2.sum()).sqrt())
        got = float((factors.delta(module).double() - delta.double()).norm() / delta.double().norm())
        assert got <= 1.01 * optimal, module
        info = result.modules[module]
        assert info["rank"] == PLANTED
        assert info["energy"] == pytest.approx(float(s2[:PLANTED].sum() / s2.sum()), abs=1e-5)  # PHLoRA's energy
        assert info["rel_error"] == pytest.approx(got, rel=1e-3)


@pytest.mark.parametrize("svd", ["auto", "exact"])
def test_energy_picks_the_minimal_rank_in_every_module(tmp_path, svd):
    _, _, deltas = planted_pair(tmp_path, noise=2e-2, ranks=(1, 3, 6, 10))
    result = extract(tmp_path / "base", tmp_path / "tuned", tmp_path / "out", energy=0.95, svd=svd, progress=False)
    ranks = read_factors(tmp_path / "out").ranks()
    for module, delta in deltas.items():
        assert ranks[module] == energy_rank(delta, 0.95) == result.modules[module]["rank"], module
        assert result.modules[module]["energy"] >= 0.95
    assert len(set(ranks.values())) > 1  # per-module ranks really differ, via rank_pattern
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["rank_pattern"]


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
@pytest.mark.parametrize("embeddings", ["full", "lora"])
def test_full_rank_reproduces_the_fine_tune(tmp_path, make, embeddings):
    base = make(0)
    base.save_pretrained(tmp_path / "base")
    tuned = make(0)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in tuned.parameters():  # everything changes: linears, norms, biases, embeddings (tied head on GPT-2)
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    tuned.save_pretrained(tmp_path / "tuned")
    result = extract(
        tmp_path / "base", tmp_path / "tuned", tmp_path / "out", ratio=1.0, embeddings=embeddings, progress=False
    )
    assert result.saved  # norms (and biases, embeddings) are saved whole, and reported
    x = tokens()
    adapted = lk.load_adapter(make(0), tmp_path / "out")
    torch.testing.assert_close(logits(adapted, x), logits(tuned, x), atol=1e-4, rtol=1e-4)
    merged = lk.merge(adapted)
    for name, p in tuned.state_dict().items():
        torch.testing.assert_close(merged.state_dict()[name], p, atol=1e-5, rtol=1e-5)
    report = json.loads((tmp_path / "out" / "extract_report.json").read_text())
    assert report["summary"]["max_rel_error"] < 1e-5
    assert (tmp_path / "out" / "extract_energy.png").stat().st_size > 1000


def test_peft_loads_the_extracted_adapter(tmp_path):
    peft = pytest.importorskip("peft")
    planted_pair(tmp_path)
    tuned = tiny_llama(0)
    with torch.no_grad():
        tuned.model.norm.weight.mul_(1.5)  # a changed norm: saved as modules_to_save
    tuned.load_state_dict(tiny_llama(0).state_dict() | {"model.norm.weight": tuned.model.norm.weight})
    extract(tmp_path / "base", tmp_path / "tuned", tmp_path / "out", rank=PLANTED, progress=False)
    x = tokens()
    ours = lk.load_adapter(tiny_llama(0), tmp_path / "out")
    theirs = peft.PeftModel.from_pretrained(tiny_llama(0), tmp_path / "out").eval()
    torch.testing.assert_close(logits(theirs, x), logits(ours, x), atol=1e-5, rtol=1e-5)


def test_unchanged_tensors_are_skipped(tmp_path):
    base = tiny_llama(0)
    base.save_pretrained(tmp_path / "base")
    tuned = tiny_llama(0)
    with torch.no_grad():
        tuned.model.layers[1].self_attn.q_proj.weight.add_(0.1)
    tuned.save_pretrained(tmp_path / "tuned")
    result = extract(tmp_path / "base", tmp_path / "tuned", tmp_path / "out", rank=2, progress=False)
    assert list(result.modules) == ["model.layers.1.self_attn.q_proj"] and not result.saved
    assert result.unchanged == len(tiny_llama(0).state_dict()) - 1


def test_lore_adapt_moves_an_instruct_delta_to_another_fine_tune(tmp_path):
    """RE-Adapt: the (instruct − base) adapter re-added to the base gives instruct; on another fine-tune it adds."""
    base, instruct, _ = planted_pair(tmp_path)
    other = tiny_llama(0)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(7)))
    other_state = {k: v.clone() for k, v in other.state_dict().items()}
    extract(tmp_path / "base", tmp_path / "tuned", tmp_path / "readapt", ratio=1.0, progress=False)
    on_base = lk.merge(lk.load_adapter(tiny_llama(0), tmp_path / "readapt"))
    for name, p in instruct.state_dict().items():
        torch.testing.assert_close(on_base.state_dict()[name], p, atol=1e-5, rtol=1e-5)
    moved = lk.merge(lk.load_adapter(other, tmp_path / "readapt", check_base=False))
    expected = {k: other_state[k] + instruct.state_dict()[k] - base.state_dict()[k] for k in base.state_dict()}
    for name, p in expected.items():
        torch.testing.assert_close(moved.state_dict()[name], p, atol=1e-5, rtol=1e-5)


def test_bad_pairs_get_clear_errors(tmp_path):
    tiny_llama(0).save_pretrained(tmp_path / "llama")
    tiny_gpt2(0).save_pretrained(tmp_path / "gpt2")
    tiny_llama(0, vocab=300).save_pretrained(tmp_path / "bigvocab")
    with pytest.raises(CheckpointError, match="mismatched architectures"):
        extract(tmp_path / "llama", tmp_path / "gpt2", tmp_path / "o1", progress=False)
    with pytest.raises(CheckpointError, match=r"has shape \(256, 64\) in the base but \(300, 64\)"):
        extract(tmp_path / "llama", tmp_path / "bigvocab", tmp_path / "o2", progress=False)
    with pytest.raises(CheckpointError, match="does not exist"):
        extract(tmp_path / "llama", tmp_path / "nowhere", tmp_path / "o3", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        extract(tmp_path / "llama", tmp_path / "empty", tmp_path / "o4", progress=False)
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 5))


def test_missing_tensors_non_finite_weights_and_existing_output(tmp_path):
    from safetensors.torch import load_file, save_file

    planted_pair(tmp_path)
    weights = tmp_path / "tuned" / "model.safetensors"
    state = load_file(weights)
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / "config.json").write_text((tmp_path / "tuned" / "config.json").read_text())
    save_file(
        {k: v for k, v in state.items() if "layers.1.mlp.up_proj" not in k}, tmp_path / "cut" / "model.safetensors"
    )
    with pytest.raises(
        CheckpointError, match=r"lacks 1 tensor\(s\) of the base, e\.g\. 'model\.layers\.1\.mlp\.up_proj"
    ):
        extract(tmp_path / "base", tmp_path / "cut", tmp_path / "o", progress=False)
    state["model.layers.0.self_attn.k_proj.weight"][0, 0] = float("nan")
    save_file(state, weights, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"k_proj\.weight has NaN or infinite values"):
        extract(tmp_path / "base", tmp_path / "tuned", tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o.tmp-*"))  # nothing partial is left
    (tmp_path / "o").mkdir()
    with pytest.raises(CheckpointError, match="already exists"):
        extract(tmp_path / "base", tmp_path / "base", tmp_path / "o", progress=False)


def test_an_interrupted_extraction_leaves_no_adapter_dir(tmp_path, monkeypatch):
    import lorakit.extract.phlora as phlora

    planted_pair(tmp_path)
    calls = {"n": 0}
    real = phlora.decompose

    def dies_midway(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(phlora, "decompose", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        extract(tmp_path / "base", tmp_path / "tuned", tmp_path / "out", rank=2, progress=False)
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "tuned"]


def test_peft_loads_a_gpt2_extraction_with_bias_changes_and_a_tied_head(tmp_path):
    peft = pytest.importorskip("peft")
    _, tuned_dir = save_tuned_pair(tmp_path, tiny_gpt2, seed=5, std=0.02)
    tuned = GPT2LMHeadModel.from_pretrained(tuned_dir)
    result = extract(tmp_path / "base", tmp_path / "tuned", tmp_path / "out", ratio=1.0, progress=False)
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["lora_bias"] is True
    assert result.saved["lm_head"] == "tied to transformer.wte, which changed"
    x = tokens()
    theirs = peft.PeftModel.from_pretrained(tiny_gpt2(0), tmp_path / "out").eval()
    torch.testing.assert_close(logits(theirs, x), logits(tuned, x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_the_fast_layout_equals_the_model_skeletons(tmp_path, make):
    """Known architectures are planned from the checkpoint alone; the result is the meta-device model's."""
    from lorakit.extract.checkpoint import Checkpoint
    from lorakit.extract.plan import fast_layout, select, skeleton_layout

    make(0).save_pretrained(tmp_path / "m")
    ck = Checkpoint(tmp_path / "m")
    fast, slow = fast_layout(ck), skeleton_layout(ck)
    assert fast is not None
    assert fast.tied_head == slow.tied_head and fast.head == slow.head and fast.causal == slow.causal
    modules = sorted({k.rpartition(".")[0] for k in ck})
    assert {m: fast.kinds.get(m) for m in modules} == {m: slow.kinds.get(m) for m in modules}
    for targets in ("all-linear", ["q_proj", "c_attn", "up_proj"], r".*\.(mlp|attn)\..*"):
        try:
            want = select(slow, modules, targets, None)
        except CheckpointError:
            with pytest.raises(CheckpointError):
                select(fast, modules, targets, None)
            continue
        assert select(fast, modules, targets, None) == want
