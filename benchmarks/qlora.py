"""QLoRA training speed and memory: fp32 LoRA vs lorakit NF4 QLoRA vs PEFT NF4 QLoRA.

Workload `smollm2-shape` (random weights), B=4 × T=128 tokens, LoRA r=16, alpha=32, all-linear,
dropout 0, AdamW lr 1e-4, fp32 compute. Each side runs in a fresh process (this script with
``--side``): build the model (the two QLoRA sides quantize every Linear but the head to bitsandbytes
NF4 with ``lk.quantize``, PEFT then wraps that same model with its own bitsandbytes LoRA), one warm-up
step, then ``--steps`` timed steps. Sides run one after another within a repetition (A B C A B C ...);
tokens/s and peak RSS are medians over ``--reps``. Peak RSS is reported twice: over the whole process
(``rss_peak_kib``: includes the fp32 weights the QLoRA sides build before quantizing them), and over
the training steps alone (``rss_train_kib``: VmHWM reset through /proc/self/clear_refs after the build).

    .venv/bin/python benchmarks/qlora.py [--layers 30] [--steps 3] [--reps 3] [--threads 2] [--json-out PATH]
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from _common import emit

R, ALPHA, LR, B, T = 16, 32.0, 1e-4, 4, 128
SIDES = ("fp32_lora", "lorakit_qlora", "peft_qlora")


def peak_rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError("no VmHWM in /proc/self/status")


def build(side: str, layers: int) -> torch.nn.Module:
    import lorakit as lk
    from lorakit.testing import smollm2_shape

    model = smollm2_shape(layers, seed=0)
    if side != "fp32_lora":
        lk.quantize(model, "nf4")
    if side == "peft_qlora":
        import peft

        cfg = peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules="all-linear", lora_dropout=0.0)
        return peft.get_peft_model(model, cfg)
    return lk.attach(model, lk.method_config("lora", r=R, alpha=ALPHA), targets="all-linear")


def run_side(side: str, layers: int, steps: int) -> dict[str, float]:
    """In a fresh process: build, reset the peak, warm up, time ``steps`` steps."""
    model = build(side, layers)
    gc.collect()
    rss_build = peak_rss_kib()
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 49152, (B, T), generator=g) for _ in range(steps + 1)]

    def step(ids: torch.Tensor) -> None:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step(batches[0])  # warm-up
    start = time.perf_counter()
    for ids in batches[1:]:
        step(ids)
    seconds = time.perf_counter() - start
    return {"tokens_per_s": steps * B * T / seconds, "rss_peak_kib": rss_build, "rss_train_kib": peak_rss_kib()}


def child(side: str, layers: int, steps: int, threads: int) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--side", side, "--layers", str(layers), "--steps", str(steps)]
    out = subprocess.run([*cmd, "--threads", str(threads)], capture_output=True, text=True, check=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    result["rss_peak_kib"] = max(result["rss_peak_kib"], result["rss_train_kib"])
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per repetition and side")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--side", choices=SIDES, help="(internal) run one side in this process and print its JSON")
    ap.add_argument("--json-out", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.side:
        print(json.dumps(run_side(args.side, args.layers, args.steps)))
        return
    runs: dict[str, list[dict[str, float]]] = {s: [] for s in SIDES}
    for _ in range(args.reps):
        for side in SIDES:
            runs[side].append(child(side, args.layers, args.steps, args.threads))
    med = {s: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for s, rs in runs.items()}
    fp32, ours, peft = med["fp32_lora"], med["lorakit_qlora"], med["peft_qlora"]
    emit(
        {
            "benchmark": "qlora",
            "workload": {"model": f"smollm2-shape {args.layers} layers", "B": B, "T": T, "r": R, "steps": args.steps},
            "reps": args.reps,
            "threads": args.threads,
            "median": med,
            "qlora_vs_fp32": {
                "rss_train": ours["rss_train_kib"] / fp32["rss_train_kib"],
                "rss_peak": ours["rss_peak_kib"] / fp32["rss_peak_kib"],
                "tokens_per_s": ours["tokens_per_s"] / fp32["tokens_per_s"],
            },
            "lorakit_vs_peft_qlora": {
                "tokens_per_s": ours["tokens_per_s"] / peft["tokens_per_s"],
                "rss_train": ours["rss_train_kib"] / peft["rss_train_kib"],
            },
        },
        args.json_out,
    )


if __name__ == "__main__":
    main()
