"""Rank allocation on SmolLM2: held-out exact match against the trainable-parameter budget, uniform LoRA vs each
rank allocator (issue 20's must-show).

Every row trains the same thing; only how the rank is spread differs. Base `smollm2-135m` (loaded once, a
fresh deep copy per run), two built-in tasks, the same training records, seed, batch, steps and AdamW schedule
for every row; targets `q_proj,v_proj` (60 modules on SmolLM2's 30 layers). A budget is an average rank ρ per
module: the total rank ρ·n over the n adapted modules, the quantity every allocator's ``budget=`` counts.

- **uniform**: plain LoRA at r = ρ everywhere (α = r, so the scale is 1), no callback.
- **each allocator** ends at total rank ρ·n (its callback's ``budget=``). Where it starts depends on what it does
  (the `START` table below): pruners (adalora, dora_dynamic, lora2, ard_lora, pearl) attach 2ρ and prune to
  the budget; increlora attaches 1 and grows; the movers and one-shot allocators (elalora, alora_alloc, colora,
  sensitivity_lora, prilora, rankadaptor) attach ρ and redistribute it; the elastic searches (lonas, shears)
  attach 2ρ, sample ranks ρ/2 | ρ | 2ρ per module and search within uniform LoRA's parameter count at ρ
  (shears also prunes the base to 50 % sparsity first). Schedules in steps: t_init = 10 % of the run,
  t_final = 25 %, as the AdaLoRA paper's proportions. ρ = 1 is not a budget here: with at least one rank per
  module every allocator would end uniform.

Reported per row: held-out exact match (greedy) and loss after training, trainable parameters at the end of
training (after any rank surgery: what is saved), total rank at the end (checked equal to the budget), the
rank spread (min/max per module), and the wall time. The base's exact match before training is reported once
per task. The machine is shared: times are indicative; the quality numbers do not depend on load.

    .venv/bin/python benchmarks/rank_allocation.py --json-out benchmarks/results/rank_allocation.json
    .venv/bin/python benchmarks/rank_allocation.py --tasks date --budgets 2 --allocators adalora --steps 4  # quick
    .venv/bin/python benchmarks/rank_allocation.py --pivot a.json b.json    # one table over runs made side by side
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import lorakit as lk
from _common import emit
from lorakit.inject import wrappers
from lorakit.train import TrainConfig, encode_rows, exact_match, mean_loss, task_examples, train
from lorakit.train.callbacks import CALLBACKS
from lorakit.train.callbacks._allocator import RankAllocator
from lorakit.train.callbacks.prilora import block_index, linear_ranks
from lorakit.train.data import pad_id

TRAIN_EXAMPLES, MAX_LEN = 400, 128


def _sched(steps: int) -> str:
    return f"t_init={max(1, steps // 10)},t_final={max(1, steps // 4)}"


def _prilora(budget: int, steps: int, bench: Bench) -> str:
    """PRILoRA's linear ranks r_min..r_max around the average ρ = budget / modules (ρ = 1: 1..1), A pruned every
    steps/4 steps; its budget is the total of those ranks (the rounding may make it differ from ρ·n by a few: the
    row reports its own total)."""
    modules = bench.modules()
    rho = budget // len(modules)
    lo, hi = (1, 1) if rho == 1 else (rho // 2, rho + rho // 2)
    ranks = linear_ranks({m: block_index(m) or 0 for m in modules}, lo, hi)
    return f"prilora:budget={sum(ranks.values())},r_min={lo},r_max={hi},every={max(1, steps // 4)},fraction=0.1"


# name -> (method, attached rank for an average budget rho, callback spec for total budget B and the run's steps)
Start = Callable[[int], int]
Spec = Callable[[int, int, "Bench"], str]
START: dict[str, tuple[str, Start, Spec]] = {
    "adalora": ("adalora", lambda rho: 2 * rho, lambda b, n, _: f"adalora:budget={b},{_sched(n)}"),
    "increlora": ("lora", lambda rho: 1, lambda b, n, bench: _increlora(b, n, bench)),
    "elalora": ("lora", lambda rho: rho, lambda b, n, _: f"elalora:budget={b},k=6,every={max(1, n // 8)},{_sched(n)}"),
    "dora_dynamic": ("lora", lambda rho: 2 * rho, lambda b, n, _: f"dora_dynamic:budget={b},{_sched(n)}"),
    # each allocation ablates every component (R + 1 forwards): one allocation per run (at T/2)
    "alora_alloc": ("lora", lambda rho: rho, lambda b, n, _: f"alora_alloc:budget={b},k=6,every={n // 2},{_sched(n)}"),
    "lora2": ("lora", lambda rho: 2 * rho, lambda b, n, _: f"lora2:budget={b},orth=0.1,{_sched(n)}"),
    "colora": ("lora", lambda rho: rho, lambda b, n, _: f"colora:budget={b},warmup={max(1, n // 4)},grow=true"),
    "prilora": ("lora", lambda rho: rho, _prilora),
    "ard_lora": ("lora", lambda rho: 2 * rho, lambda b, n, _: f"ard_lora:budget={b}"),
    "sensitivity_lora": ("lora", lambda rho: rho, lambda b, n, _: f"sensitivity_lora:budget={b},probe=1,samples=4"),
    "pearl": ("lora", lambda rho: 2 * rho, lambda b, n, _: f"pearl:budget={b},probe={max(1, n // 4)}"),
    "rankadaptor": ("lora", lambda rho: rho, lambda b, n, bench: f"rankadaptor:budget={b},{_candidates(b, bench)}"),
    # elastic: a parameter budget (uniform LoRA's at ρ), ranks ρ/2 | ρ | 2ρ sampled per module, searched at the end
    "lonas": ("lora", lambda rho: 2 * rho, lambda b, n, bench: f"lonas:{_elastic(b, bench)}"),
    "shears": ("lora", lambda rho: 2 * rho, lambda b, n, bench: f"shears:{_elastic(b, bench)},sparsity=0.5"),
}


def _increlora(budget: int, steps: int, bench: Bench) -> str:
    """IncreLoRA from rank 1: one addition round per step until 3/4 of the run, enough modules each round to
    reach the budget (8 per round, as the first results used, could not reach ρ = 8 in 24 steps)."""
    rounds = max(1, 3 * steps // 4)
    per_step = max(1, math.ceil((budget - len(bench.modules())) / rounds))
    return f"increlora:budget={budget},every=1,per_step={per_step}"


def _levels(budget: int, bench: Bench) -> str:
    """ρ/2 | ρ | 2ρ around the average rank ρ (1 | 2 at ρ = 1)."""
    rho = budget // len(bench.modules())
    return "|".join(str(r) for r in sorted({max(1, rho // 2), rho, 2 * rho}))


def _candidates(budget: int, bench: Bench) -> str:
    return f"candidates={_levels(budget, bench)}"


def _elastic(budget: int, bench: Bench) -> str:
    rho = budget // len(bench.modules())
    return f"ranks={_levels(budget, bench)},budget={rho * bench.params_per_rank()}"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class Bench:
    """The base, tokenizer and one task's records, shared by every row of that task."""

    def __init__(self, args: argparse.Namespace, base: torch.nn.Module, tok: Any, task: str) -> None:
        self.args, self.base, self.tok, self.task = args, base, tok, task
        self.chat = bool(getattr(tok, "chat_template", None))
        self.pad = pad_id(tok)
        rows = [
            {"prompt": e.prompt, "completion": e.answer}
            for e in task_examples(task, "train", TRAIN_EXAMPLES, seed=args.seed)
        ]
        self.records = encode_rows(tok, "prompt_completion", rows, chat=self.chat, max_len=MAX_LEN)
        self.held = task_examples(task, "heldout", args.heldout, seed=args.seed)
        held_rows = [{"prompt": e.prompt, "completion": e.answer} for e in self.held]
        self.held_records = encode_rows(tok, "prompt_completion", held_rows, chat=self.chat, max_len=MAX_LEN)
        self.out = Path(tempfile.mkdtemp(prefix="rank_allocation_"))

    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        with torch.no_grad():
            loss = mean_loss(model, self.held_records, self.pad)[0]
        return {
            "heldout_loss": loss,
            "heldout_exact_match": exact_match(model, self.tok, self.held, chat=self.chat).accuracy,
        }

    def run(self, name: str, rho: int) -> dict[str, Any]:
        """Attach, train (with the allocator's callback), evaluate; the row's record."""
        a = self.args
        model = copy.deepcopy(self.base)
        torch.manual_seed(a.seed)
        if name == "uniform":
            method, r, callbacks = "lora", rho, ()
        else:
            method, start, spec = START[name]
            r, callbacks = start(rho), (spec(rho * len(self.modules()), a.steps, self),)
        lk.attach(model, lk.method_config(method, r=r, alpha=float(r)), targets=a.targets.split(","))
        cfg = TrainConfig(
            steps=a.steps, batch_size=a.batch, lr=a.lr, warmup=min(3, a.steps - 1), seed=a.seed, callbacks=callbacks
        )
        t0 = time.perf_counter()
        result = train(model, self.records, cfg, out_dir=self.out / f"{name}-{rho}", pad_id=self.pad, progress=False)
        seconds = time.perf_counter() - t0
        bad = next((i + 1 for i, v in enumerate(result.losses) if not math.isfinite(v)), None)
        if bad is not None:
            raise FloatingPointError(f"non-finite training loss at step {bad}")
        ranks = {n: int(w.adapters[str(w.active)].config.r) for n, w in wrappers(model)}
        rec: dict[str, Any] = {
            "method": method,
            "attached_r": r,
            "callbacks": list(callbacks),
            "budget_total_rank": rho * len(ranks),
            "total_rank": sum(ranks.values()),
            "rank_min": min(ranks.values()),
            "rank_max": max(ranks.values()),
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "train_s": seconds,
            "final_loss": sum(result.losses[-5:]) / len(result.losses[-5:]),
            "ranks": ranks,
        }
        rec.update(self.evaluate(model))
        del model
        return rec

    def modules(self) -> list[str]:
        """The adapted modules' names (the same for every row)."""
        if not hasattr(self, "_modules"):
            targets = self.args.targets.split(",")
            probe = lk.attach(copy.deepcopy(self.base), lk.method_config("lora", r=1), targets=targets)
            self._modules = [n for n, _ in wrappers(probe)]
            self._per_rank = sum(p.numel() for p in probe.parameters() if p.requires_grad)  # at r = 1
        return self._modules

    def params_per_rank(self) -> int:
        """Σ (d_in + d_out) over the adapted modules: LoRA's trainable parameters per unit of rank everywhere."""
        self.modules()
        return self._per_rank


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| task | budget ρ (total rank) | row | held-out EM | held-out loss | trainable params | ranks min-max "
        "| train s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['task']} | {r['rho']} | {r['row']} | failed: {r['error'][:60]} | | | | |")
            continue
        lines.append(
            f"| {r['task']} | {r['rho']} ({r['budget_total_rank']}) | {r['row']} | {r['heldout_exact_match']:.0%} | "
            f"{r['heldout_loss']:.3f} | {r['trainable_params']:,} | {r['rank_min']}-{r['rank_max']} | "
            f"{r['train_s']:.0f} |"
        )
    return "\n".join(lines)


def pivot(results: list[dict[str, Any]]) -> str:
    """One markdown table over the results of several runs (e.g. one per task, run side by side): a row per
    allocator, a column per (task, ρ): held-out exact match, Δ vs uniform in points, trainable params (k)."""
    rows = [r for res in results for r in res["rows"]]
    cols = list(dict.fromkeys((r["task"], r["rho"]) for r in rows))
    uniform = {(r["task"], r["rho"]): r.get("heldout_exact_match") for r in rows if r["row"] == "uniform"}
    names = list(dict.fromkeys(r["row"] for r in rows))
    head = "| allocator | " + " | ".join(f"{t} ρ={rho}" for t, rho in cols) + " | beats uniform |"
    lines = [head, "|---" * (len(cols) + 2) + "|"]
    for name in names:
        cells, wins = [], 0
        for col in cols:
            r = next((r for r in rows if r["row"] == name and (r["task"], r["rho"]) == col), None)
            if r is None:
                cells.append("not run")
            elif "error" in r:
                cells.append("failed")
            else:
                em, base = r["heldout_exact_match"], uniform.get(col)
                delta = "" if name == "uniform" or base is None else f" ({100 * (em - base):+.0f})"
                wins += name != "uniform" and base is not None and em > base
                short = r["total_rank"] < r["budget_total_rank"] and name not in ("lonas", "shears")  # a rank budget
                spent = f", rank {r['total_rank']}/{r['budget_total_rank']}" if short else ""
                cells.append(f"{em:.0%}{delta}, {r['trainable_params'] / 1000:.0f}k{spent}")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {'—' if name == 'uniform' else wins} |")
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", default="smollm2-135m")
    ap.add_argument("--tasks", default="date,reverse", help="comma-separated built-in tasks")
    ap.add_argument("--budgets", default="2,4,8", help="average ranks ρ per module (total budget ρ·n)")
    ap.add_argument("--allocators", default=",".join(START), help="comma-separated (uniform always runs)")
    ap.add_argument("--targets", default="q_proj,v_proj")
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--heldout", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (fixed for the whole run)")
    ap.add_argument("--json-out", type=Path)
    ap.add_argument("--pivot", type=Path, nargs="+", help="only print the table over these result JSONs")
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    if args.pivot:
        print(pivot([json.loads(p.read_text()) for p in args.pivot]))
        return
    torch.set_num_threads(args.threads)
    allocators = [n.strip() for n in args.allocators.split(",") if n.strip() and n.strip() != "uniform"]
    unknown = [n for n in allocators if n not in START]
    if unknown:
        raise SystemExit(f"unknown allocator(s) {unknown}; this benchmark runs: {', '.join(START)}")
    missing = sorted(n for n, spec in CALLBACKS.items() if issubclass(spec.cls, RankAllocator) and n not in START)
    load_before = os.getloadavg()[0]
    base, tok = lk.load_base(args.base)
    rows: list[dict[str, Any]] = []
    before: dict[str, dict[str, float]] = {}
    for task in args.tasks.split(","):
        bench = Bench(args, base, tok, task)
        before[task] = bench.evaluate(base)
        log(f"[{task}] base: {before[task]}")
        try:
            for rho in (int(b) for b in args.budgets.split(",")):
                for name in ["uniform", *allocators]:
                    row: dict[str, Any] = {"task": task, "rho": rho, "row": name}
                    try:
                        row.update(bench.run(name, rho))
                        em, lo, hi = row["heldout_exact_match"], row["rank_min"], row["rank_max"]
                        log(f"[{task} ρ={rho} {name}] EM {em:.0%} ranks {lo}-{hi}")
                    except Exception as e:  # a failing allocator is a result: recorded, then the next row runs
                        row["error"] = f"{type(e).__name__}: {e}"
                        row["traceback_tail"] = "".join(traceback.format_exception(e)[-4:])
                        log(f"[{task} ρ={rho} {name}] FAILED: {row['error']}")
                    rows.append(row)
                    if args.json_out:  # the rows so far, in case the run is cut short
                        partial = {**summary(args, before, rows, missing, load_before), "partial": True}
                        args.json_out.with_suffix(".partial.json").write_text(json.dumps(partial) + "\n")
        finally:
            shutil.rmtree(bench.out, ignore_errors=True)
    log(table(rows))
    emit(summary(args, before, rows, missing, load_before), args.json_out)


def summary(
    args: argparse.Namespace,
    before: dict[str, dict[str, float]],
    rows: list[dict[str, Any]],
    missing: list[str],
    load_before: float,
) -> dict[str, Any]:
    return {
        "workload": "rank_allocation",
        "base": args.base,
        "tasks": args.tasks.split(","),
        "budgets_rho": args.budgets,
        "targets": args.targets,
        "steps": args.steps,
        "batch": args.batch,
        "lr": args.lr,
        "seed": args.seed,
        "threads": args.threads,
        "heldout": args.heldout,
        "train_records": TRAIN_EXAMPLES,
        "before": before,
        "rows": rows,
        "not_in_benchmark": missing,
        "loadavg_1min_before": load_before,
        "loadavg_1min_after": os.getloadavg()[0],
        "versions": {"torch": torch.__version__},
    }


if __name__ == "__main__":
    main()
