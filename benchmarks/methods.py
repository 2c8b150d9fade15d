"""Every registered method on the SmolLM2 shape: trainable parameters, training speed, peak memory, vs PEFT.

Workload `smollm2-shape-6L` (random weights; 6 layers keep the run short), B=4 × T=128, each
method with its paper defaults on ``targets="all-linear"``, AdamW lr 1e-4. Each method runs in
a fresh child process (its peak RSS, VmHWM, is its own): one warm-up step, then ``--steps`` timed
forward+backward+update steps; where PEFT has the method, the same adapter (saved by lorakit,
loaded by PEFT) is timed in the same child, interleaved step by step, and the ratio reported.

    .venv/bin/python benchmarks/methods.py [--layers 6] [--steps 3] [--only lora,vera] \
        [--out benchmarks/results/methods.json]

The README's "Training cost per method" table is rendered from that JSON by
``python -m lorakit.cli.readme README.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import lorakit as lk
from lorakit.testing import randomize_adapters, smollm2_shape

B, T, LR = 4, 128, 1e-4


def vm_hwm_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def timed_step(model: torch.nn.Module, opt: torch.optim.Optimizer, ids: torch.Tensor) -> float:
    start = time.perf_counter()
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def child(method: str, layers: int, steps: int) -> dict[str, Any]:
    """Run one method (and PEFT's version when there is one) and return its measurements."""
    torch.set_num_threads(2)
    torch.manual_seed(0)
    spec = lk.REGISTRY[method]
    model = lk.attach(smollm2_shape(layers), lk.method_config(method), targets="all-linear").train()
    randomize_adapters(model, seed=1, std=0.01)
    sides: dict[str, torch.nn.Module] = {"lorakit": model}
    result: dict[str, Any] = {
        "method": method,
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }
    if spec.adapter.peft_type is not None:
        import peft

        with tempfile.TemporaryDirectory() as tmp:
            lk.save_adapter(model, tmp)
            sides["peft"] = peft.PeftModel.from_pretrained(smollm2_shape(layers), tmp, is_trainable=True).train()
    opts = {s: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=LR) for s, m in sides.items()}
    times: dict[str, list[float]] = {s: [] for s in sides}
    for i in range(steps + 1):
        ids = torch.randint(0, 49152, (B, T), generator=torch.Generator().manual_seed(i))
        for s, m in sides.items():  # interleaved: A B A B ...
            dt = timed_step(m, opts[s], ids)
            if i:  # step 0 is the warm-up
                times[s].append(dt)
    for s, ts in times.items():
        result[f"{s}_tokens_per_s"] = round(B * T / statistics.median(ts), 1)
    if "peft" in sides:
        result["ratio_vs_peft"] = round(result["lorakit_tokens_per_s"] / result["peft_tokens_per_s"], 3)
    result["peak_rss_mb"] = round(vm_hwm_mb())
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--only", default="", help="comma-separated method names (default: all registered)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.layers, args.steps)))
        return
    names = [n for n in args.only.split(",") if n] or sorted(lk.REGISTRY)
    rows = []
    for name in names:
        cmd = [sys.executable, __file__, "--child", name, "--layers", str(args.layers), "--steps", str(args.steps)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode == 0:
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        else:
            rows.append({"method": name, "error": proc.stderr.strip().splitlines()[-1][:300]})
        print(json.dumps(rows[-1]), file=sys.stderr)
    result = {
        "workload": f"smollm2-shape-{args.layers}L, B={B} T={T}, all-linear, paper defaults, AdamW, 2 threads",
        "steps": args.steps,
        "methods": rows,
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
