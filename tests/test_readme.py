"""The README is executable: its methods table is current, its commands and Python snippets run."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import lorakit as lk
from lorakit.cli import app
from lorakit.cli.readme import END, START, main, methods_table, render
from lorakit.train.callbacks import CALLBACKS

README = Path(__file__).resolve().parents[1] / "README.md"
TEXT = README.read_text()


def blocks(lang: str, text: str = TEXT) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S)


def cli_commands(text: str = TEXT) -> list[list[str]]:
    """Every `lorakit ...` line of the README's bash blocks, split into arguments (comments dropped)."""
    lines = [line.strip() for block in blocks("bash", text) for line in block.splitlines()]
    return [shlex.split(line, comments=True)[1:] for line in lines if line.startswith("lorakit ")]


def test_methods_table_is_generated_from_the_registry(tmp_path):
    table = TEXT.split(START)[1].split(END)[0].strip()
    assert table == methods_table(), "README methods table is stale: run `python -m lorakit.cli.readme`"
    assert render(TEXT) == TEXT
    for name, spec in lk.REGISTRY.items():
        assert f"| `{name}` | [{spec.paper}]({spec.url}) | {spec.family}" in table
        assert f"`{spec.params}`" in table
    stale = tmp_path / "README.md"
    stale.write_text(f"intro\n{START}\n| old |\n{END}\noutro\n")
    assert main(["--check", str(stale)]) == 1
    assert main([str(stale)]) == 0 and main(["--check", str(stale)]) == 0
    assert stale.read_text() == f"intro\n{START}\n{methods_table()}\n{END}\noutro\n"


@pytest.fixture(scope="module")
def smollm2_adapter(tmp_path_factory):
    """A zero-init LoRA saved from SmolLM2: stands in for the trained adapters/date."""
    model, _ = lk.load_base("smollm2-135m")
    lk.attach(model, lk.method_config("lora", r=8, alpha=16), targets="all-linear")
    return lk.save_adapter(model, tmp_path_factory.mktemp("readme") / "facts")


def tiny_fine_tune(base, folder):
    """A 'full fine-tune' of the tiny checkpoint: every weight nudged, saved as its own checkpoint."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    model.save_pretrained(folder)
    return folder


def tiny_adapter(base, folder, seed):
    """A randomized LoRA on the tiny checkpoint (what `lorakit merge` combines in the README)."""
    from transformers import AutoModelForCausalLM

    from lorakit.testing import randomize_adapters

    model = lk.attach(AutoModelForCausalLM.from_pretrained(base), lk.method_config("lora", r=4), targets="all-linear")
    randomize_adapters(model, seed=seed)
    return lk.save_adapter(model, folder)


def tiny_qlora(base, folder):
    """A randomized LoRA on the tiny checkpoint quantized to NF4 (the demo's adapters/date-qlora)."""
    from lorakit.testing import randomize_adapters

    model = lk.attach(lk.load_base(str(base), quantize="nf4")[0], lk.method_config("lora", r=4), targets="all-linear")
    randomize_adapters(model, seed=3, std=0.05)
    return lk.save_adapter(model, folder)


def test_every_cli_example_runs(smollm2_adapter, tiny_checkpoint, tmp_path):
    commands = cli_commands()
    assert {c[0] for c in commands} == {c.name or c.callback.__name__ for c in app.registered_commands}, (
        "the README should show every verb"
    )
    tuned = tiny_fine_tune(tiny_checkpoint, tmp_path / "fine-tune")
    swap = {
        "adapters/date": str(smollm2_adapter),
        "path/to/hf-checkpoint": str(tiny_checkpoint),
        "path/to/fine-tune": str(tuned),
        "adapters/extracted": str(tmp_path / "extracted"),
        "adapters/extracted-r8": str(tmp_path / "extracted-r8"),
        "runs/demo": str(tmp_path / "demo"),
        "adapters/a": str(tiny_adapter(tiny_checkpoint, tmp_path / "a", seed=1)),
        "adapters/b": str(tiny_adapter(tiny_checkpoint, tmp_path / "b", seed=2)),
        "adapters/ab": str(tmp_path / "ab"),
        "models/ab": str(tmp_path / "models-ab"),
        "runs/analysis": str(tmp_path / "analysis"),
        "adapters/collection": str(tmp_path / "collection"),
        "exported/vllm": str(tmp_path / "vllm"),
        "runs/demo/adapters/date-qlora": str(tiny_qlora(tiny_checkpoint, tmp_path / "date-qlora")),
        "models/date-nf4": str(tmp_path / "date-nf4"),
        "models/date-dense": str(tmp_path / "date-dense"),
        "adapters/date-ada": str(tmp_path / "date-ada"),  # the README's adalora run, then inspected
        "adapters/date-dylora": str(tmp_path / "date-dylora"),  # the README's dylora run, then cut to rank 2
        "adapters/date-dylora-r2": str(tmp_path / "date-dylora-r2"),
    }
    for args in commands:
        args = [swap.get(a, a) for a in args]
        if args[0] == "extract":  # the README extracts from SmolLM2; here from the tiny checkpoint and its fine-tune
            args += ["--base", str(tiny_checkpoint)]
        if args[0] == "merge" and "--quantize" in args:  # the README merges the demo's SmolLM2 QLoRA
            args[args.index("--base") + 1] = str(tiny_checkpoint)
        if args[0] == "demo":  # `make demo` runs it on SmolLM2; here the same code runs on the tiny checkpoint
            args += ["--base", str(tiny_checkpoint), "--steps", "3"]
        if args[0] == "train":  # the same command on the tiny checkpoint, a few steps (a repeated flag: last wins)
            target = args[args.index("--out") + 1]  # the adalora and dylora runs are kept: inspect / resize read them
            kept = (swap["adapters/date-ada"], swap["adapters/date-dylora"])
            out = Path(target) if target in kept else tmp_path / "train" / target.replace("/", "_")
            args += ["--base", str(tiny_checkpoint), "--steps", "2", "--train-examples", "8", "--eval-examples", "2"]
            args += ["--out", str(out)]
            # the tiny checkpoint has 4 q/v modules (SmolLM2: 60) and 2 steps: a budget and schedule that fit it
            args = [a if not a.startswith("adalora:") else "adalora:budget=16" for a in args]
            if "--data" in args:
                data = tmp_path / "my.jsonl"
                data.write_text('{"prompt": "a", "completion": "b"}\n' * 12)
                args[args.index("--data") + 1] = str(data)
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, (args, result.output)
        assert result.stdout.strip(), args
    assert (tmp_path / "demo" / "summary.json").is_file()
    assert json.loads((tmp_path / "date-dylora-r2" / "adapter_config.json").read_text())["r"] == 2
    for merged in ("date-nf4", "date-dense"):  # the quantized merges: a checkpoint and its drift report
        assert (tmp_path / merged / "config.json").is_file() and (tmp_path / merged / "drift.json").is_file()


def test_python_snippets_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the snippets write out/adapter relative to the working dir
    snippets = [b for b in blocks("python") if "@register(" not in b]  # the method outline is a template
    assert len(snippets) == 10
    namespace: dict = {}
    try:
        for code in snippets:  # one namespace: later snippets continue the first one, as a reader would
            exec(compile(code, str(README), "exec"), namespace)
    finally:
        CALLBACKS.pop("print_loss", None)  # the training-callback example registers one
    model, merged, peft_model = namespace["model"], namespace["merged"], namespace["peft_model"]
    assert lk.adapter_names(model) == ["default"] and lk.active_adapter(model) == "default"
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").is_file()
    assert len((tmp_path / "out" / "run" / "metrics.jsonl").read_text().splitlines()) == 2  # the callback example
    for b in (1, 2, 4, 8):  # DyLoRA: each truncation is a rank-b LoRA dir
        assert json.loads((tmp_path / "out" / "dylora" / f"rank{b}" / "adapter_config.json").read_text())["r"] == b
    assert lk.adapter_names(namespace["model2"]) == ["x"]
    assert "lora" in namespace["lk"].methods()
    assert namespace["merge_drift"](namespace["qmerged"]).max_abs_logit == 0  # Quantized bases: W_q re-quantized
    assert namespace["merge_drift"](namespace["gmerged"]).max_abs_logit < 1e-5  # QA-LoRA: zero points absorb ΔW
    assert namespace["rilq_result"].after < namespace["rilq_result"].before  # RILQ: the discrepancy falls
    ids = namespace["ids"]
    with lk.disabled(model):
        expected = model(ids).logits
    assert (namespace["base_logits"] == expected).all()
    # LoRE-Adapt: the sibling fine-tune plus the extracted instruct delta, weight for weight
    ns = namespace
    base, instruct, result = ns["base"].state_dict(), ns["instruct"].state_dict(), ns["other_instruct"].state_dict()
    saved = tuple(f"{m}." for m in ns["report"].saved)
    assert "lm_head." in saved and "model.norm." in saved
    for key, before in ns["other_before"].items():
        want = instruct[key] if key.startswith(saved) else before + instruct[key] - base[key]
        torch.testing.assert_close(result[key], want, atol=1e-5, rtol=1e-5)
    analysis = json.loads(ns["analysis"].to_json())
    assert len(analysis["modules"]) == len(ns["report"].modules)  # every factored module, analysed
    # the fresh adapter is zero-initialised, so the merged model and PEFT both reproduce the base
    assert (merged(ids).logits - expected).abs().max() < 1e-4
    assert (peft_model(ids).logits - expected).abs().max() < 1e-4
