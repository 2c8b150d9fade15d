"""Fold one adapter into its base and write a plain Hugging Face checkpoint (W' = W + ΔW per module).

On a quantized base (``quantize="nf4"``, ...: the base is loaded as ``lk.load_base(base, quantize=...)`` loads it)
the merge is ``lk.merge``'s: W_q + ΔW re-quantized (``quantized="requantize"``) or kept dense (``"dequantize"``),
and ``drift.json`` beside the weights holds its drift report. The checkpoint holds float weights either way: the
merged layers' dequantized values (requantize: those of W_merged_q, which a reload with the same kind maps onto
the same quantized weights, see ``MergeDrift.reload_change``; dequantize: W_q + ΔW).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lorakit.errors import ConfigError
from lorakit.io.atomic import atomic_dir

DRIFT_NAME = "drift.json"
CALIBRATION_TOKENS = 256  # the most calibration tokens read from a text
CALIBRATION_TEXT = (  # the default calibration batch: plain prose, a question and a list
    "The committee met on Tuesday to review the budget. After a long discussion, they agreed to fund the new "
    "library and to postpone the road repairs until spring.\n"
    "Q: What is the capital of France? A: Paris.\n"
    "1. Preheat the oven. 2. Mix the flour and the eggs. 3. Bake for twenty minutes."
)


def calibration_ids(tok: Any, text: str = CALIBRATION_TEXT) -> torch.Tensor:
    """(1, T) token ids of ``text`` (its first CALIBRATION_TOKENS tokens): the batch the drift report reads."""
    ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"][:, :CALIBRATION_TOKENS]
    if ids.numel() == 0:
        raise ConfigError("the calibration text is empty; give a text file with some sentences in it.")
    return ids


def _check_quantization(adapter: str | Path, model: Any) -> None:
    """An adapter trained on a quantized base (QLoRA) is merged onto a base quantized the same way."""
    from lorakit.io.dirs import read_tensors
    from lorakit.io.peft_format import WEIGHTS_NAME
    from lorakit.quant import quantized_kinds

    trained_on = set(read_tensors(Path(adapter) / WEIGHTS_NAME)[1].get("base_quantization") or [])
    here = quantized_kinds(model)
    if trained_on and trained_on != here:
        raise ConfigError(
            f"{adapter} was trained on a base quantized as {', '.join(sorted(trained_on))}, but --quantize gives "
            f"{', '.join(sorted(here))} layers: pass the kind it trained with (bnb4bit: nf4 or fp4, bnb8bit: int8, "
            "intgroup: int4g, ...), or --no-check-base to merge it anyway."
        )


def merge_into_base(
    base: str | Path,
    adapter: str | Path,
    out: str | Path,
    *,
    max_shard_size: str | int = "2GB",
    check_base: bool = True,
    quantize: str | None = None,
    quantized: str = "requantize",
    calibration: str | None = None,
    drift_threshold: float = 0.5,
) -> Path:
    """Load ``base`` (bundled name or checkpoint dir), attach ``adapter``, merge it and save to ``out``.

    ``out`` gets safetensors shards (``save_pretrained(max_shard_size=...)``) plus the tokenizer,
    written atomically; ``AutoModelForCausalLM.from_pretrained(out)`` gives the adapted model's logits.
    ``check_base=False`` applies an adapter made for another base on purpose (e.g. an instruct delta
    onto a sibling fine-tune of the same base, RE-Adapt).

    ``quantize`` (a kind, 'nf4', ...) merges onto the base quantized as it loads, ``quantized`` says how
    (module docstring), and ``out`` also gets ``drift.json``: the drift report, whose max |Δlogit| and KL are
    taken on ``calibration`` text (default CALIBRATION_TEXT); layers over ``drift_threshold`` warn.
    """
    from lorakit.inject import merge
    from lorakit.io import load_adapter
    from lorakit.models import load_base
    from lorakit.quant import MergeDrift, dequantize, merge_drift
    from lorakit.quant._merge import MODES, reload_change

    if quantize is None and (quantized != "requantize" or calibration is not None):
        raise ConfigError("quantized= and calibration= apply to a quantized base: give quantize= (e.g. 'nf4').")
    if quantized not in MODES:
        raise ConfigError(f"quantized must be one of {', '.join(MODES)}, got {quantized!r}.")
    model, tok = load_base(str(base), quantize=quantize)
    if quantize is not None and check_base:
        _check_quantization(adapter, model)
    load_adapter(model, adapter, check_base=check_base)
    ids = None if quantize is None else calibration_ids(tok, CALIBRATION_TEXT if calibration is None else calibration)
    merged: Any = merge(model, inplace=True, quantized=quantized, calibration=ids, drift_threshold=drift_threshold)
    report: MergeDrift | None = merge_drift(merged)
    if report is not None:
        report.reload_change = reload_change(merged) if quantized == "requantize" else None
        dequantize(merged)  # the float values of the merged layers: what save_pretrained can write
    with atomic_dir(out, marker="config.json") as tmp:
        merged.save_pretrained(tmp, max_shard_size=max_shard_size)
        if tok is not None:
            tok.save_pretrained(tmp)
        if report is not None:
            report.save(tmp / DRIFT_NAME)
    if report is None:  # atomic_dir keeps the files of an earlier write: not a report of another merge
        (Path(out) / DRIFT_NAME).unlink(missing_ok=True)
    return Path(out)
