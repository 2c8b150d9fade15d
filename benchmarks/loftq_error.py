"""LoftQ against plain quantization on the real SmolLM2: does Q + s·B·A land closer to W than Q(W)?

Workload: every projection (nn.Linear but the head) of SmolLM2-135M-Instruct, 210 layers. For each
``--bits`` (default 4 and 2) and each layer, QLoRA's error ‖W − Q(W)‖_F (Q: the reference quantizer's
normal-float grid, blocks of 64; NF4 at 4 bits, bit-identical to bitsandbytes) against LoftQ's
‖W − Q − s·B·A‖_F after ``--iterations`` alternations at rank ``--r`` (`lorakit.init.loftq.loftq`, the
function `init="loftq"` runs). Prints one JSON object: per bits, how many layers LoftQ improves, and the
median / worst ratio LoftQ ÷ QLoRA (below 1 is better). Not a timing benchmark.

    .venv/bin/python benchmarks/loftq_error.py [--r 16] [--iterations 1] [--bits 4,2] [--json-out PATH]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

import lorakit as lk
from _common import emit
from lorakit.init.loftq import loftq
from lorakit.quant._reference import fake_quantize


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--r", type=int, default=16, help="LoftQ's rank (default 16)")
    ap.add_argument("--iterations", type=int, default=1, help="LoftQ's alternations (default 1, PEFT's)")
    ap.add_argument("--bits", default="4,2", help="comma-separated bit widths (default 4,2)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json-out", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    model, _ = lk.load_base("smollm2-135m")
    layers = [(n, m.weight.detach()) for n, m in model.named_modules() if type(m) is torch.nn.Linear]
    layers = [(n, W) for n, W in layers if not n.endswith("lm_head")]
    per_bits = {}
    for bits in (int(b) for b in args.bits.split(",")):
        ratios, worst_name, worst = [], "", 0.0
        for name, W in layers:
            qlora = float(torch.linalg.norm(W - fake_quantize(W, bits)))
            Q, Lf, Rf = loftq(W, args.r, bits, args.iterations)
            ratio = float(torch.linalg.norm(W - Q - Lf @ Rf)) / qlora
            ratios.append(ratio)
            if ratio > worst:
                worst_name, worst = name, ratio
        per_bits[str(bits)] = {
            "layers": len(ratios),
            "loftq_better": sum(r < 1 for r in ratios),
            "ratio_median": round(statistics.median(ratios), 4),
            "ratio_best": round(min(ratios), 4),
            "ratio_worst": round(worst, 4),
            "worst_layer": worst_name,
        }
    emit(
        {
            "benchmark": "loftq_error",
            "workload": {"model": "SmolLM2-135M-Instruct", "r": args.r, "iterations": args.iterations},
            "loftq_over_qlora_frobenius": per_bits,
            "seconds": round(time.perf_counter() - start, 1),
        },
        args.json_out,
    )


if __name__ == "__main__":
    main()
