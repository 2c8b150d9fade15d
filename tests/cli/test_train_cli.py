"""`lorakit train` / `lorakit eval` end to end on a tiny local checkpoint (flags, YAML, resume, errors)."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

import lorakit as lk
from lorakit.cli import app
from lorakit.train.callbacks import CALLBACKS
from lorakit.train.evaluate import exact_match
from lorakit.train.optimizers import OPTIMIZERS
from lorakit.train.tasks import task_examples

runner = CliRunner()
QUICK = ["--task", "reverse", "--train-examples", "16", "--eval-examples", "4", "--batch-size", "4", "--max-len", "96"]


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_train_writes_an_adapter_with_logs_and_report(tiny_checkpoint, tmp_path):
    out = tmp_path / "adapter"
    result = invoke(
        "train",
        "--base",
        tiny_checkpoint,
        "--method",
        "dora",
        "--r",
        2,
        "--opt",
        "rslora=true",
        "--steps",
        3,
        "--lr",
        1e-2,
        "--out",
        out,
        *QUICK,
    )
    assert result.exit_code == 0, result.output
    for name in (
        "adapter_config.json",
        "adapter_model.safetensors",
        "metrics.jsonl",
        "loss_curve.png",
        "train_report.json",
    ):
        assert (out / name).is_file(), name
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["use_dora"] is True and config["use_rslora"] is True and config["r"] == 2
    report = json.loads((out / "train_report.json").read_text())
    assert len(report["losses"]) == 3 and set(report["before"]) == {"loss", "perplexity", "exact_match"}
    # the saved adapter is the trained one: reloading gives the reported held-out exact match
    model, tok = lk.load_base(str(tiny_checkpoint))
    lk.load_adapter(model, out)
    em = exact_match(model, tok, task_examples("reverse", "heldout", 4), chat=True)
    assert em.accuracy == report["after"]["exact_match"]


def test_yaml_config_and_flags_override(tiny_checkpoint, tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "base": str(tiny_checkpoint),
                "method": "lora",
                "r": 2,
                "steps": 5,
                "batch-size": 4,
                "task": "date",
                "train_examples": 16,
                "eval_examples": 2,
                "lr": 0.01,
                "opt": {"init": "gaussian"},
            }
        )
    )
    out = tmp_path / "a"
    result = invoke("train", "--config", cfg, "--steps", 2, "--out", out)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "train_report.json").read_text())
    assert report["train"]["steps"] == 2 and report["train"]["batch_size"] == 4  # flag wins, YAML fills the rest
    assert report["spec"]["task"] == "date" and report["spec"]["method_options"] == {"init": "gaussian", "r": 2}


def test_resume_continues_to_the_same_adapter(tiny_checkpoint, tmp_path, monkeypatch):
    args = ["--base", tiny_checkpoint, "--r", 2, "--steps", 6, "--lr", 1e-2, "--save-every", 2, *QUICK]
    assert invoke("train", "--out", tmp_path / "full", *args).exit_code == 0

    import lorakit.train.loop as loop

    real = loop.train

    def killed_at_5(*a, **kw):
        def on_step(step, loss):
            if step == 5:
                raise KeyboardInterrupt

        return real(*a, **{**kw, "on_step": on_step})

    monkeypatch.setattr("lorakit.train.run.train", killed_at_5)
    assert invoke("train", "--out", tmp_path / "run", *args).exit_code != 0
    assert (tmp_path / "run" / "checkpoint.pt").exists()
    monkeypatch.setattr("lorakit.train.run.train", real)
    assert invoke("train", "--out", tmp_path / "run", "--resume", *args).exit_code == 0
    a = load_file(tmp_path / "full" / "adapter_model.safetensors")
    b = load_file(tmp_path / "run" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_eval_reports_exact_match_and_loss(tiny_checkpoint, tmp_path):
    result = invoke("eval", "--base", tiny_checkpoint, "--task", "sort", "--n", 3)
    assert result.exit_code == 0, result.output
    assert "exact match" in result.output and "perplexity" in result.output


def test_train_on_a_jsonl_file(tiny_checkpoint, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"say {i}", "completion": str(i)}) for i in range(12)))
    out = tmp_path / "a"
    result = invoke("train", "--base", tiny_checkpoint, "--data", data, "--steps", 2, "--batch-size", 4, "--out", out)
    assert result.exit_code == 0, result.output
    assert json.loads((out / "train_report.json").read_text())["after"]["loss"] > 0


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--task", "date"], "--out is required"),
        (["--out", "X", "--task", "date", "--data", "d.jsonl"], "exactly one of --task"),
        (["--out", "X", "--task", "date", "--method", "lorra"], "unknown method 'lorra'"),
        (["--out", "X", "--task", "date", "--opt", "r"], "--opt expects NAME=VALUE"),
        (["--out", "X", "--task", "date", "--opt", "rank=3"], "has no option(s) rank"),
        (["--out", "X", "--task", "nope"], "unknown task 'nope'"),
        (["--out", "X", "--task", "date", "--schedule", "step"], "schedule must be"),
    ],
)
def test_bad_flags_give_one_clear_error(tiny_checkpoint, tmp_path, args, fragment):
    args = [str(tmp_path / "X") if a == "X" else a for a in args]
    result = invoke("train", "--base", tiny_checkpoint, *args)
    assert result.exit_code == 2, result.output
    assert fragment in result.output and "Traceback" not in result.output


def test_yaml_with_unknown_keys_is_rejected(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("steps: 2\nlearning_rate: 0.1\n")
    result = invoke("train", "--config", cfg, "--out", tmp_path / "o")
    assert result.exit_code == 2 and "unknown option(s) learning_rate" in result.output


def test_optimizer_and_callback_flags_come_from_the_registries(tiny_checkpoint, tmp_path):
    text = " ".join(invoke("train", "--help").stdout.replace("│", " ").split())
    assert all(name in text for name in (*OPTIMIZERS, *CALLBACKS)), text
    out = tmp_path / "a"
    args = ["--base", tiny_checkpoint, "--steps", 2, "--optimizer", "loraplus", "--callback", "adapter_steps", *QUICK]
    result = invoke("train", *args, "--out", out)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "train_report.json").read_text())
    assert report["train"]["optimizer"] == "loraplus" and report["train"]["callbacks"] == ["adapter_steps"]
    for flag, name, fragment in (
        ("--optimizer", "lorapls", "unknown optimizer 'lorapls'. Did you mean 'loraplus'"),
        ("--callback", "nope", "unknown callback 'nope'."),
    ):
        bad = invoke("train", "--base", tiny_checkpoint, "--task", "date", flag, name, "--out", tmp_path / "x")
        assert bad.exit_code == 2 and fragment in " ".join(bad.output.split()), bad.output
