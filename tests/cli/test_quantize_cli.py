"""`--quantize KIND` on train, eval, generate and serve: QLoRA from the command line on a tiny local checkpoint."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

import lorakit as lk
from lorakit.cli import app
from lorakit.cli._common import QUANTIZE_HELP
from lorakit.quant import QUANTS, quantized_kinds
from lorakit.train.evaluate import exact_match
from lorakit.train.tasks import task_examples

pytest.importorskip("bitsandbytes")
runner = CliRunner()
QUICK = ["--task", "reverse", "--train-examples", "16", "--eval-examples", "4", "--batch-size", "4", "--max-len", "96"]


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_train_quantize_nf4_trains_a_qlora_that_reloads(tiny_checkpoint, tmp_path):
    out = tmp_path / "qlora"
    args = ["--base", tiny_checkpoint, "--quantize", "nf4", "--r", 2, "--steps", 2, "--lr", 1e-2, *QUICK]
    result = invoke("train", *args, "--out", out)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "train_report.json").read_text())
    assert report["spec"]["quantize"] == "nf4" and len(report["losses"]) == 2
    model, tok = lk.load_base(str(tiny_checkpoint), quantize="nf4")
    lk.load_adapter(model, out)
    assert quantized_kinds(model) == {"bnb4bit"}
    em = exact_match(model, tok, task_examples("reverse", "heldout", 4), chat=True)
    assert em.accuracy == report["after"]["exact_match"]
    result = invoke(
        "eval", "--base", tiny_checkpoint, "--quantize", "nf4", "--adapter", out, "--task", "sort", "--n", 2
    )
    assert result.exit_code == 0 and "perplexity" in result.output, result.output
    result = invoke(
        "generate", "--base", tiny_checkpoint, "--quantize", "nf4", "--adapter", out, "--max-new-tokens", 4, "hi"
    )
    assert result.exit_code == 0, result.output


def test_an_unknown_kind_is_one_clear_error(tiny_checkpoint, tmp_path):
    result = invoke(
        "train", "--base", tiny_checkpoint, "--quantize", "nf5", "--steps", 1, *QUICK, "--out", tmp_path / "x"
    )
    assert result.exit_code == 2 and "unknown quantization kind 'nf5'. Did you mean 'nf4'" in result.output
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("command", ["train", "eval", "generate", "serve"])
def test_help_documents_quantize(command):
    text = " ".join(invoke(command, "--help").stdout.replace("│", " ").split())
    assert "--quantize" in text and "nf4" in text and "lorakit[quant]" in text


def test_the_help_names_every_registered_kind():
    assert all(name in QUANTIZE_HELP for name in QUANTS)
