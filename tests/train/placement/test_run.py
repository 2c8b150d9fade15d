"""`--targets auto:NAME` end to end on the tiny local checkpoint: run_training resolves the placement on the first
training batches before attaching, attaches exactly the chosen targets, records them in the report and
train_report.json; the CLI keeps a placement's comma-separated options whole and refuses a bad one early."""

from __future__ import annotations

import json

from typer.testing import CliRunner

import lorakit as lk
from lorakit.cli import app
from lorakit.train.data import pad_id
from lorakit.train.loop import TrainConfig
from lorakit.train.placement import place
from lorakit.train.run import DEFAULT_INIT_BATCHES, RunSpec, _data, _first_batches, run_training

QUICK = dict(task="reverse", train_examples=16, eval_examples=2, max_len=96)


def test_run_training_attaches_what_plop_chose(tiny_checkpoint, tmp_path):
    spec = RunSpec(base=str(tiny_checkpoint), targets="auto:plop:k=2", method_options={"r": 2}, **QUICK)
    cfg = TrainConfig(steps=2, batch_size=4, seed=0)
    report = run_training(spec, cfg, tmp_path / "out", progress=False)
    # the same choice, made by hand on the run's first 8 training batches
    model, tok = lk.load_base(str(tiny_checkpoint))
    records, _, _ = _data(spec, tok, True, cfg.seed)
    expected = place(model, _first_batches(records, cfg, pad_id(tok), DEFAULT_INIT_BATCHES), "auto:plop:k=2")
    assert report.targets == expected and len(expected) == 2
    saved = json.loads((tmp_path / "out" / "train_report.json").read_text())
    assert saved["targets"] == expected and saved["spec"]["targets"] == "auto:plop:k=2"
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == sorted(expected)


def test_cli_diffora_options_and_errors(tiny_checkpoint, tmp_path):
    runner = CliRunner()
    args = ["train", "--base", str(tiny_checkpoint), "--steps", "1", "--batch-size", "4", "--init-batches", "2"]
    args += ["--task", "reverse", "--train-examples", "16", "--eval-examples", "2", "--max-len", "96", "--r", "2"]
    result = runner.invoke(app, [*args, "--targets", "auto:diffora:k=3,steps=2", "--out", str(tmp_path / "a")])
    assert result.exit_code == 0, result.output
    chosen = json.loads((tmp_path / "a" / "train_report.json").read_text())["targets"]
    assert f"placement auto:diffora:k=3,steps=2: targets = {chosen}" in result.output
    assert len(chosen) == 3 and all(name.startswith("model.layers.") for name in chosen)
    bad = runner.invoke(app, [*args, "--base", "/no/such/dir", "--targets", "auto:diffora:per=row", "--out", "x"])
    assert bad.exit_code != 0 and "per must be 'module' or 'type'" in bad.output
    assert "auto:plop" in runner.invoke(app, ["train", "--help"]).output


def test_classification_run_places_on_the_encoder_not_the_head(tmp_path):
    from tests.train.test_seqcls import save_tiny_bert, toy_rows, write_jsonl

    base = save_tiny_bert(tmp_path / "bert")
    data = write_jsonl(tmp_path / "reviews.jsonl", toy_rows(40))
    spec = RunSpec(base=str(base), data=str(data), targets="auto:plop:k=2", init_batches=2, eval_examples=4)
    report = run_training(spec, TrainConfig(steps=1, batch_size=8), tmp_path / "out", progress=False)
    assert len(report.targets) == 2 and "classifier" not in report.targets
    assert set(report.targets) <= {"query", "key", "value", "dense"}  # BERT's Linear types (3 kinds end in dense)
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == sorted(report.targets) and config["modules_to_save"] == ["classifier"]
