"""`lorakit export --format vllm`: exported dirs give the original outputs, pass vLLM's loader rules, refuse clearly."""

from __future__ import annotations

import json
import shutil

import pytest
import safetensors.torch
import torch
from typer.testing import CliRunner

import lorakit as lk
from lorakit.cli import app
from lorakit.compose.compress import compress
from lorakit.errors import AdapterFormatError, BaseModelError, ConfigError
from lorakit.io.collection import Collection
from lorakit.io.export import export_vllm, vllm_problems
from lorakit.io.factors import read_factors
from lorakit.testing import randomize_adapters, tiny_llama
from tests.helpers import logits, tokens

X = tokens()


def adapted(method: str, seed: int, targets="all-linear", **opts):
    model = tiny_llama(0)
    torch.manual_seed(seed)
    lk.attach(model, lk.method_config(method, **opts), targets=targets)
    randomize_adapters(model, seed=seed, std=0.1)
    return model


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """name -> (adapter dir, logits of the adapted model) for lora (rsLoRA, per-module ranks), dora, vera."""
    root = tmp_path_factory.mktemp("adapters")
    out = {}
    lora = tiny_llama(0)
    torch.manual_seed(1)
    lk.attach(
        lora, lk.method_config("lora", r=4, alpha=6, rslora=True), targets="all-linear", rank_pattern={"q_proj": 2}
    )
    randomize_adapters(lora, seed=1, std=0.1)
    for name, model in (
        ("lora", lora),
        ("dora", adapted("dora", 2, r=2, alpha=4)),
        ("vera", adapted("vera", 3, r=8, d_initial=0.5)),
    ):
        out[name] = (lk.save_adapter(model, root / name), logits(model, X))
    return out


def loaded_logits(path) -> torch.Tensor:
    return logits(lk.load_adapter(tiny_llama(0), path), X)


def test_lora_and_vera_round_trip_exactly(made, tmp_path):
    report = export_vllm([made["lora"][0], made["vera"][0]], tmp_path / "out", base=tiny_llama(0))
    assert report.adapters == {"lora": tmp_path / "out" / "lora", "vera": tmp_path / "out" / "vera"}
    assert report.methods == {"lora": "lora", "vera": "vera"} and report.max_rank == 8 and report.max_lora_rank == 8
    base = logits(tiny_llama(0), X)
    for name in ("lora", "vera"):
        folder = tmp_path / "out" / name
        assert (made[name][1] - base).abs().max() > 1e-2  # the adapters change the outputs
        assert vllm_problems(folder) == []
        torch.testing.assert_close(loaded_logits(folder), made[name][1], atol=1e-5, rtol=1e-5)
    cfg = json.loads((tmp_path / "out" / "lora" / "adapter_config.json").read_text())
    assert cfg["target_modules"] == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert cfg["r"] == cfg["lora_alpha"] == 4 and not cfg["use_rslora"] and not cfg["use_dora"]
    assert set(cfg["rank_pattern"].values()) == {2} and cfg["alpha_pattern"] == cfg["rank_pattern"]
    manifest = json.loads((tmp_path / "out" / "lorakit-export.json").read_text())
    assert manifest["max_lora_rank"] == 8 and "--lora-modules lora=" in manifest["command"]


def test_peft_loads_the_exported_dir_with_the_same_outputs(made, tmp_path):
    import peft

    export_vllm([made["lora"][0]], tmp_path / "out")
    theirs = peft.PeftModel.from_pretrained(tiny_llama(0), tmp_path / "out" / "lora")
    torch.testing.assert_close(logits(theirs.eval(), X), made["lora"][1], atol=1e-5, rtol=1e-5)


def test_dora_export_is_the_best_plain_lora_of_its_delta(made, tmp_path):
    """DoRA's delta (g−1)⊙W₀ + g⊙sBA is full rank, so its to_lora is the Eckart–Young best rank-2r LoRA of the exact
    merged delta: the export's error is exactly the tail Σ_{k>2r} σ_k², and at full rank the outputs are the same."""
    path, want = made["dora"]
    model = lk.load_adapter(tiny_llama(0), path)
    export_vllm([path], tmp_path / "r4", base=tiny_llama(0))
    got = read_factors(tmp_path / "r4" / "dora")
    assert set(got.ranks().values()) == {4}
    for module, wrapper in lk.inject.wrappers(model):
        exact = wrapper.adapters["default"].delta_weight(wrapper.base_layer).detach().double()  # (out, in)
        s = torch.linalg.svdvals(exact)
        err = (exact - got.delta(module).double()).square().sum()
        assert float(err) == pytest.approx(float(s[4:].square().sum()), rel=1e-3, abs=1e-9)
        assert s[4:].square().sum() > 1e-6 * s.square().sum()  # not exact at 2r: the delta is full rank
    assert vllm_problems(tmp_path / "r4" / "dora") == []
    export_vllm([path], tmp_path / "full", base=tiny_llama(0), rank=64)  # 64 = min(d_in, d_out) of every module
    torch.testing.assert_close(loaded_logits(tmp_path / "full" / "dora"), want, atol=1e-5, rtol=1e-5)


def test_a_collection_exports_to_its_rematerialised_adapters(tmp_path):
    dirs = [lk.save_adapter(adapted("lora", s, r=3, alpha=5), tmp_path / f"a{s}") for s in range(3)]
    coll = Collection.load(compress(dirs, tmp_path / "coll", rank=5).path)
    report = export_vllm([tmp_path / "coll"], tmp_path / "out")
    assert list(report.adapters) == ["a0", "a1", "a2"] and set(report.methods.values()) == {"collection"}
    for name in coll.names:
        want, got = coll.factors(name), read_factors(tmp_path / "out" / name)
        assert vllm_problems(tmp_path / "out" / name) == []
        for m, f in want.factors.items():
            assert (
                torch.equal(got.factors[m].A, f.A) and torch.equal(got.factors[m].B, f.B) and got.factors[m].scale == 1
            )


def test_modules_to_save_are_refused_unless_dropped(tmp_path):
    model = tiny_llama(0)
    lk.attach(model, lk.method_config("lora", r=2), targets=["q_proj", "v_proj"], modules_to_save=["lm_head"])
    randomize_adapters(model, seed=4)
    path = lk.save_adapter(model, tmp_path / "head")
    with pytest.raises(AdapterFormatError, match="modules_to_save: lm_head.*--drop-saved"):
        export_vllm([path], tmp_path / "out")
    assert not (tmp_path / "out").exists()
    report = export_vllm([path], tmp_path / "out", drop_saved=True)
    assert len(report.warnings) == 1 and "dropped modules_to_save lm_head" in report.warnings[0]
    assert vllm_problems(tmp_path / "out" / "head") == [] and not read_factors(tmp_path / "out" / "head").saved


def edit(folder, **fields):
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg.update(fields)
    (folder / "adapter_config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize(
    "change,problem",
    [
        (dict(use_dora=True), "does not support DoRA"),
        (dict(modules_to_save=["lm_head"]), "modules_to_save"),
        (dict(bias="all"), "adapter biases"),
        (dict(peft_type="VERA"), "loads only LORA"),
        (dict(init_lora_weights="pissa"), "rewrites the base weights"),
        (dict(r=2, lora_alpha=2), "rank 4 in the weights but 2 in the config"),
        (dict(alpha_pattern={"k_proj": 9}), "differs from the global lora_alpha/r"),
        (dict(target_modules=["q_proj"]), "not in target_modules"),
        (dict(layer_replication=[[0, 1]]), "layer_replication is set"),
    ],
)
def test_vllm_checks_catch_what_its_loader_refuses(made, tmp_path, change, problem):
    export_vllm([made["lora"][0]], tmp_path / "out")
    folder = tmp_path / "out" / "lora"
    edit(folder, **change)
    assert any(problem in p for p in vllm_problems(folder)), vllm_problems(folder)


def test_vllm_checks_on_raw_files(made, tmp_path):
    problems = vllm_problems(made["dora"][0])  # a DoRA dir as lorakit/PEFT save it
    assert any("DoRA" in p for p in problems) and any("lora_magnitude_vector" in p for p in problems)
    export_vllm([made["lora"][0]], tmp_path / "out")
    folder = tmp_path / "out" / "lora"
    tensors = safetensors.torch.load_file(folder / "adapter_model.safetensors")
    key = next(k for k in tensors if k.endswith("lora_B.weight"))
    del tensors[key]
    safetensors.torch.save_file(tensors, folder / "adapter_model.safetensors")
    assert any("do not pair up" in p for p in vllm_problems(folder))


def test_base_is_needed_for_non_lora_methods_and_names_must_differ(made, tmp_path):
    with pytest.raises(BaseModelError, match="dora.*converted to LoRA on its base.*--base"):
        export_vllm([made["dora"][0]], tmp_path / "out")  # its base_model_name_or_path is not loadable here
    other = shutil.copytree(made["lora"][0], tmp_path / "x" / "lora")
    with pytest.raises(ConfigError, match="same name 'lora'"):
        export_vllm([made["lora"][0], other], tmp_path / "out")
    with pytest.raises(ConfigError, match="at least one adapter"):
        export_vllm([], tmp_path / "out")
    biased = lk.save_adapter(adapted("lora", 5, targets=["q_proj"], r=2, lora_bias=True), tmp_path / "biased")
    with pytest.raises(AdapterFormatError, match="lora_bias .* vLLM does not support"):
        export_vllm([biased], tmp_path / "out")


def test_cli(made, tmp_path, tiny_checkpoint):
    args = ["export", "--format", "vllm", str(made["lora"][0]), str(made["dora"][0])]
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "out"), "--base", str(tiny_checkpoint)])
    assert result.exit_code == 0, result.output
    assert "dora (dora) ->" in result.stdout and "--enable-lora --lora-modules lora=" in result.stdout
    assert "--max-lora-rank 8" in result.stdout  # largest rank 4 (DoRA's 2r): vLLM's smallest allowed value is 8
    torch.testing.assert_close(loaded_logits(tmp_path / "out" / "lora"), made["lora"][1], atol=1e-5, rtol=1e-5)
    bad = CliRunner().invoke(app, ["export", "--format", "onnx", str(made["lora"][0]), "--out", str(tmp_path / "o")])
    assert bad.exit_code == 2 and "unknown export format 'onnx'; supported: vllm" in bad.output
