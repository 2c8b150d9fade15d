"""LoRA training throughput and peak memory: lorakit vs PEFT, same model, same adapter, same batch.

Workload `smollm2-shape` (random weights), B=4 × T=128 tokens, LoRA r=16, alpha=32, all-linear,
AdamW lr 1e-4 (WORKLOADS.md "Training"; lorakit's optimiser as `lorakit train` builds it).
Three parts, one JSON object out:

1. parity: both sides start from the same adapter weights with dropout 0 and take the same
   steps; their losses must agree to 1e-4 relative;
2. speed: with dropout 0.05, steps are timed interleaved (A B C A B C ...) in one process, after a
   warm-up step; tokens/s is the median over repetitions. Sides: `lorakit` (lorakit's training
   step, as `lorakit train` runs it: the loss through `train/loss.py`'s fused head), PEFT (the
   model's own loss), and `lorakit_model_loss` (lorakit's adapters and optimiser with the model's own
   loss: lorakit's step without its fused head);
3. memory: peak RSS of a fresh process per side doing the same steps (resource.getrusage).

    .venv/bin/python benchmarks/train_throughput.py [--layers 30] [--steps 5] [--reps 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import peft
import torch

import lorakit as lk
from _common import emit
from lorakit.inject import wrappers
from lorakit.testing import randomize_adapters, smollm2_shape
from lorakit.train.loop import TrainConfig
from lorakit.train.loss import training_loss
from lorakit.train.optimizers import build_optimizer

B, T, R, ALPHA, LR, WD = 4, 128, 16, 32.0, 1e-4, 0.0


def build(side: str, layers: int, dropout: float, init_dir: Path) -> torch.nn.Module:
    """The same base and the same initial adapter (saved by lorakit, loaded by PEFT), trainable."""
    base = smollm2_shape(layers, seed=0)
    if side == "lorakit":
        model = lk.load_adapter(base, init_dir)
        for _, wrapper in wrappers(model):  # the saved config has dropout 0; set the run's dropout
            if dropout > 0:
                wrapper.adapters["default"].dropout = torch.nn.Dropout(dropout)
        return model.train()
    model = peft.PeftModel.from_pretrained(base, init_dir, is_trainable=True)
    for module in model.modules():
        if isinstance(module, peft.tuners.lora.LoraLayer) and dropout > 0:
            module.lora_dropout["default"] = torch.nn.Dropout(dropout)
    return model.train()


def make_init(layers: int, folder: Path) -> Path:
    model = smollm2_shape(layers, seed=0)
    lk.attach(model, lk.method_config("lora", r=R, alpha=ALPHA), targets="all-linear")
    randomize_adapters(model, seed=1, std=0.01)  # B != 0: gradients reach A from the first step
    return lk.save_adapter(model, folder / "init")


def batch(step: int) -> torch.Tensor:
    return torch.randint(0, 49152, (B, T), generator=torch.Generator().manual_seed(step))


def step(model: torch.nn.Module, opt: torch.optim.Optimizer, ids: torch.Tensor, fused_loss: bool = False) -> float:
    """One step. ``fused_loss``: lorakit's training loss (``lorakit train``: the head and the cross-entropy
    fused over row chunks, train/loss.py), else the model's own ``loss`` (what PEFT users run)."""
    batch = {"input_ids": ids, "labels": ids}
    loss = training_loss(model, batch) if fused_loss else model(**batch).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss)


def optimizer(model: torch.nn.Module, side: str) -> torch.optim.Optimizer:
    """AdamW on both sides: lorakit's as ``lorakit train`` builds it (fused kernel where it runs), and
    torch's default (foreach) as a PEFT user builds it."""
    if side == "lorakit":
        return build_optimizer(model, TrainConfig(lr=LR, weight_decay=WD))
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=WD)


def peak_rss_kib() -> int:
    """This process's peak resident set (VmHWM). Unlike ru_maxrss, which Linux carries over from the
    parent through fork + exec, VmHWM belongs to the new address space alone."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def rss_child(side: str, layers: int, steps: int, init_dir: Path) -> int:
    """Peak RSS (KiB) of a fresh interpreter that builds one side and trains it."""
    here = str(Path(__file__).parent)
    code = (
        f"import sys, torch; sys.path.insert(0, {here!r}); import train_throughput as t; "
        f"torch.set_num_threads(2); m = t.build({side!r}, {layers}, 0.05, t.Path({str(init_dir)!r})); "
        f"o = t.optimizer(m, {side!r}); [t.step(m, o, t.batch(i), {side == 'lorakit'}) for i in range({steps + 1})]; "
        "print(t.peak_rss_kib())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per repetition and side")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json-out", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp())
    init_dir = make_init(args.layers, tmp)

    # 1. parity: same start, dropout 0, same steps
    losses = {}
    for side in ("lorakit", "peft"):
        torch.manual_seed(0)
        model = build(side, args.layers, 0.0, init_dir)
        opt = optimizer(model, side)
        losses[side] = [step(model, opt, batch(i), side == "lorakit") for i in range(3)]
        del model, opt
    rel = max(abs(a - b) / abs(b) for a, b in zip(losses["lorakit"], losses["peft"], strict=True))

    # 2. speed: interleaved, dropout 0.05
    models = {side: build(side, args.layers, 0.05, init_dir) for side in ("lorakit", "peft")}
    models["lorakit_model_loss"] = models["lorakit"]  # the same adapters, trained on by both lorakit sides
    opts = {side: optimizer(m, side) for side, m in models.items() if side != "lorakit_model_loss"}
    opts["lorakit_model_loss"] = opts["lorakit"]
    for side in models:
        step(models[side], opts[side], batch(0), side == "lorakit")  # warm-up
    times: dict[str, list[float]] = {side: [] for side in models}
    for rep in range(args.reps):
        for side in models:
            t0 = time.perf_counter()
            for i in range(args.steps):
                step(models[side], opts[side], batch(1 + rep * args.steps + i), side == "lorakit")
            times[side].append(time.perf_counter() - t0)
    del models, opts
    tps = {side: B * T * args.steps / statistics.median(ts) for side, ts in times.items()}

    # 3. memory: a fresh process per side
    rss = {side: rss_child(side, args.layers, args.steps, init_dir) / 1024 for side in ("lorakit", "peft")}
    result = {
        "workload": "train_throughput",
        "shape": f"smollm2-shape-{args.layers}L",
        "batch": B,
        "seq": T,
        "threads": args.threads,
        "lorakit": {"tokens_per_s": tps["lorakit"], "peak_rss_mb": rss["lorakit"]},
        "peer": {"name": f"peft {peft.__version__}", "tokens_per_s": tps["peft"], "peak_rss_mb": rss["peft"]},
        "lorakit_model_loss": {"tokens_per_s": tps["lorakit_model_loss"]},
        "ratio": {
            "tokens_per_s": tps["lorakit"] / tps["peft"],
            "peak_rss": rss["lorakit"] / rss["peft"],
            "adapters_alone_tokens_per_s": tps["lorakit_model_loss"] / tps["peft"],
        },
        "loss_parity": {"lorakit": losses["lorakit"], "peft": losses["peft"], "max_rel_diff": rel},
        "median_s": {side: statistics.median(ts) for side, ts in times.items()},
        "rep_s": {side: [round(t, 3) for t in ts] for side, ts in times.items()},
        "reps": args.reps,
        "steps_per_rep": args.steps,
        "peak_rss_this_process_mb": peak_rss_kib() / 1024,
    }
    emit(result, args.json_out)


if __name__ == "__main__":
    main()
