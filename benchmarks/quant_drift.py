"""Merging a trained adapter onto a quantized SmolLM2: the drift report of each way to merge.

Workload: the real SmolLM2-135M-Instruct; adapters trained by `lorakit train --task date --steps 30
--r 8 --alpha 16` (one on an NF4 base, a LoRA; one on an int4g base, a QA-LoRA with group 32; their
dirs are the arguments). Each row loads the base quantized, loads the adapter, and merges it with
``lk.merge(..., calibration=ids)`` on 4 held-out prompts of the task (the unmerged adapter is the
reference). Rows: NF4 LoRA re-quantized (the default), NF4 LoRA dequantized (merged layers kept
dense), and int4g QA-LoRA with the default mode, which takes the absorb path (the zero points take the
group-constant delta, the codes stay). Also the held-out exact match (chat prompts, greedy) of the
unmerged and the merged model on 32 prompts. Prints one JSON object.

    .venv/bin/python benchmarks/quant_drift.py --nf4-adapter DIR --qalora-adapter DIR [--json-out PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

import torch

import lorakit as lk
from lorakit.quant import merge_drift
from lorakit.train import exact_match, task_examples

TASK, HELDOUT = "date", 32


def row(kind: str, adapter: Path, mode: str, ids: torch.Tensor, held: list[Any]) -> dict[str, Any]:
    model, tok = lk.load_base("smollm2-135m", quantize=kind)
    lk.load_adapter(model, adapter)
    before = exact_match(model, tok, held).accuracy
    merged = lk.merge(model, quantized=mode, calibration=ids, inplace=True)
    report = merge_drift(merged)
    assert report is not None
    rel = list(report.relative.values())
    return {
        "base": kind,
        "adapter": str(adapter),
        "mode": mode,
        "layers": len(rel),
        "relative_drift_median": statistics.median(rel),
        "relative_drift_max": max(rel),
        "layers_over_threshold": len(report.over()),
        "max_abs_logit": report.max_abs_logit,
        "kl": report.kl,
        "exact_match_unmerged": before,
        "exact_match_merged": exact_match(merged, tok, held).accuracy,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nf4-adapter", type=Path, required=True)
    ap.add_argument("--qalora-adapter", type=Path, required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json-out", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    held = task_examples(TASK, "heldout", HELDOUT, seed=0)
    _, tok = lk.load_base("smollm2-135m")
    texts = [e.prompt + " " + e.answer for e in held[:4]]
    ids = tok(texts, return_tensors="pt", padding=True)["input_ids"]
    rows = [
        row("nf4", args.nf4_adapter, "requantize", ids, held),
        row("nf4", args.nf4_adapter, "dequantize", ids, held),
        row("int4g", args.qalora_adapter, "requantize", ids, held),
    ]
    result = {"benchmark": "quant_drift", "workload": f"SmolLM2-135M, task {TASK}, {HELDOUT} held out", "rows": rows}
    print(json.dumps(result, indent=1))
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
