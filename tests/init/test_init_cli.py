"""`lorakit train --method pissa|lora_ga|eva [--init-batches N]`: the init reads the first training batches, and the
written adapter reloads onto the ORIGINAL base with the reported held-out exact match."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

import lorakit as lk
from lorakit.cli import app
from lorakit.train.data import pad_id
from lorakit.train.evaluate import exact_match, mean_loss
from lorakit.train.run import RunSpec, _data
from lorakit.train.tasks import task_examples

QUICK = ["--task", "reverse", "--train-examples", "16", "--eval-examples", "4", "--batch-size", "4", "--max-len", "96"]


def train(*args):
    return CliRunner().invoke(app, ["train", *map(str, args), *QUICK])


@pytest.mark.parametrize(
    "method, extra, rank", [("pissa", [], 4), ("lora_ga", ["--init-batches", 2], 4), ("eva", [], None)]
)
def test_train_with_an_init_reloads_onto_the_original_base(tiny_checkpoint, tmp_path, method, extra, rank):
    out = tmp_path / method
    result = train(
        "--base",
        tiny_checkpoint,
        "--method",
        "lora",
        "--opt",
        f"init={method}",
        "--r",
        2,
        "--steps",
        2,
        "--lr",
        1e-2,
        "--out",
        out,
        *extra,
    )
    assert result.exit_code == 0, result.output
    config = json.loads((out / "adapter_config.json").read_text())
    if rank is not None:  # base-rewriting inits are saved as plain LoRA of rank 2r on the original base
        assert config["r"] == rank and config["init_lora_weights"] is True
    else:  # EVA (8 default calibration batches): per-layer ranks summing to the budget 2 · #layers
        assert config["init_lora_weights"] == "eva"
    report = json.loads((out / "train_report.json").read_text())
    model, tok = lk.load_base(str(tiny_checkpoint))
    lk.load_adapter(model, out)
    em = exact_match(model, tok, task_examples("reverse", "heldout", 4), chat=True)
    assert em.accuracy == report["after"]["exact_match"]
    held = _data(RunSpec(task="reverse", train_examples=16, eval_examples=4, max_len=96), tok, True, 0)[1]
    loss = mean_loss(model, held, pad_id(tok))[0]
    assert loss == pytest.approx(report["after"]["loss"], rel=1e-4) and loss != report["before"]["loss"]


def test_init_batches_must_be_positive(tiny_checkpoint, tmp_path):
    result = train(
        "--base", tiny_checkpoint, "--method", "lora", "--opt", "init=eva", "--init-batches", 0, "--out", tmp_path / "x"
    )
    assert result.exit_code != 0 and "--init-batches must be a positive integer" in result.output
