"""Convergence of LoRA initialisations on SmolLM2: training loss after N steps, `lora` vs each F3 init.

Issue 8's must-show. Every init trains on the same thing; only the initialisation differs:
base `smollm2-135m` (loaded once, a fresh `copy.deepcopy` per init, since PiSSA-like inits rewrite the
base), a built-in task (default `date`, as `lorakit demo`), the same 400 training records, seed, batch
(8), steps N (30), AdamW with cosine schedule and warm-up min(3, N−1), peak lr 1e-3 (the demo's) for all
unless `--lr-for NAME=LR` overrides one (reported), rank r = 8 (DoTA has no rank: its bond dimension is
set to r), targets all-linear, every other option at the method's registered (paper) default except
LoRA-SB's `lr` (the η of its simulated first step, by its definition the training lr) which is set to the
run's lr. `--set NAME:key=value` overrides any option (reported). Inits that need data get the same
calibration batches: the first `--init-batches` (4) training micro-batches in the loop's own order, as
`lorakit train --init-batches` feeds them.

Convergence speed. Per-step losses are on different batches (the same batches, in the same order, for
every init, so the curves are paired) and noisy, so every comparison uses the trailing mean over
`--smooth` (5) steps, L̄(t) = mean(loss[t−w+1..t]). For a target loss L*:

    steps(m, L*) = the first step t with L̄_m(t) ≤ L*          (None: never reached in N steps)
    speedup(m, L*) = steps(lora, L*) / steps(m, L*)

so "k× faster" means "reaches the loss plain LoRA reaches in k·t steps in t steps", the reading of
LoRA-GA's "2-4× faster convergence" (steps to equal training loss). Two targets: `final`, the
baseline's L̄ at step N (None unless the init gets at least as low at some step), and `half`,
its L̄ at step N/2 (the early phase, where a better start shows most; a target that the baseline
itself reaches in the warm-up is not informative, hence not earlier). Also reported per init: the
loss curve, L̄(N), the mean loss over all steps, the held-out loss and exact match on `--heldout`
(16) held-out questions after training (`--no-eval` skips them), trainable parameters, and the wall
time of the init (`lk.attach`, which includes the calibration pass) and of training. The machine
is shared: times are indicative; the loss numbers do not depend on load. The 1-minute load average
is recorded before and after. `--threads` defaults to 1, as `lorakit demo` (see its comment).

    .venv/bin/python benchmarks/init_convergence.py --json-out benchmarks/results/init_convergence.json \\
        --plot benchmarks/results/init_convergence.png
    .venv/bin/python benchmarks/init_convergence.py --inits pissa,lora_ga --steps 10 --no-eval   # quick
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch

import lorakit as lk
from _common import emit
from lorakit.init import INITS as INIT_OPTIONS
from lorakit.initialize import needs_calibration
from lorakit.train import TrainConfig, encode_rows, exact_match, mean_loss, task_examples, train
from lorakit.train.data import pad_id
from lorakit.train.run import RunSpec, calibration_batches

BASELINE = "lora"
# Every F3 init, in issue 8's order: init options of LoRA (pissa, lora_ga, eva, gora) and the inits that
# are methods (lora_one: LoRA-One's init with the authors' alpha = 16, rsLoRA; lora_sb, loldu, ...). An init
# that fails on SmolLM2 is moved to EXCLUDED (name -> what failed), which the JSON reports; `--inits` can
# still name it.
INITS = ["pissa", "lora_ga", "lora_one", "eva", "lora_sb", "gora", "loldu", "comp_lora", "salora", "dota"]
EXCLUDED: dict[str, str] = {}
TRAIN_EXAMPLES, MAX_LEN = 400, 128


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def parse_pairs(items: list[str], flag: str) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"{flag} expects KEY=VALUE, got {item!r}")
        out[key.strip()] = value.strip()
    return out


def parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def method_of(name: str) -> str:
    """The registered method ``name`` runs: itself, or LoRA for an init option."""
    return name if name in lk.REGISTRY else BASELINE


def build_config(name: str, opts: dict[str, Any]) -> Any:
    """``name``'s config: a registered method with ``opts``, or LoRA with init=name (its options in init_options)."""
    if name in lk.REGISTRY:
        return lk.method_config(name, **opts)
    lora = {f.name for f in dataclasses.fields(lk.REGISTRY[BASELINE].config)}
    own = {k: v for k, v in opts.items() if k not in lora}
    return lk.method_config(BASELINE, init=name, init_options=own, **{k: v for k, v in opts.items() if k in lora})


def method_options(name: str, rank: int, lr: float, sets: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """r = rank (DoTA: bond_dim = rank), LoRA-SB's first-step η = the training lr, then the --set overrides."""
    fields = {f.name for f in dataclasses.fields(lk.REGISTRY[method_of(name)].config)}
    opts: dict[str, Any] = {"r": rank} if "r" in fields else {"bond_dim": rank} if "bond_dim" in fields else {}
    if name == "lora_sb":
        opts["lr"] = lr
    if name == "gora":  # the authors run GoRA with rsLoRA scaling and α = 16 (the method's defaults before)
        opts |= {"alpha": 16.0, "rslora": True}
    opts.update(sets.get(name, {}))
    return opts


def smooth(losses: list[float], w: int) -> list[float]:
    """Trailing mean over the last w steps (fewer at the start): L̄(t) = mean(loss[max(0, t−w+1)..t])."""
    return [sum(losses[max(0, t - w + 1) : t + 1]) / (t + 1 - max(0, t - w + 1)) for t in range(len(losses))]


def steps_to(curve: list[float], target: float) -> int | None:
    """The first step (1-based) where the smoothed curve is at or below target, None if never."""
    return next((t + 1 for t, v in enumerate(curve) if v <= target), None)


class Bench:
    """The shared state of one benchmark run: base model, tokenizer, records, calibration batches."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        t0 = time.perf_counter()
        self.base, self.tok = lk.load_base(args.base)
        self.load_s = time.perf_counter() - t0
        self.chat = bool(getattr(self.tok, "chat_template", None))
        self.pad = pad_id(self.tok)
        rows = [
            {"prompt": e.prompt, "completion": e.answer}
            for e in task_examples(args.task, "train", TRAIN_EXAMPLES, seed=args.seed)
        ]
        self.records = encode_rows(self.tok, "prompt_completion", rows, chat=self.chat, max_len=MAX_LEN)
        self.held = task_examples(args.task, "heldout", args.heldout, seed=args.seed)
        held_rows = [{"prompt": e.prompt, "completion": e.answer} for e in self.held]
        self.held_records = encode_rows(self.tok, "prompt_completion", held_rows, chat=self.chat, max_len=MAX_LEN)
        cfg = self.train_config(args.lr)
        spec = RunSpec(task=args.task, init_batches=args.init_batches)
        self.calibration = calibration_batches(spec, self.records, cfg, self.pad)
        self.out = Path(tempfile.mkdtemp(prefix="init_convergence_"))

    def train_config(self, lr: float) -> TrainConfig:
        a = self.args
        return TrainConfig(steps=a.steps, batch_size=a.batch, lr=lr, warmup=min(3, a.steps - 1), seed=a.seed)

    def run(self, name: str, lr: float, opts: dict[str, Any]) -> dict[str, Any]:
        """Attach ``name`` to a fresh copy of the base, train it, evaluate it; the run's record."""
        cfg = build_config(name, opts)
        calibrate = needs_calibration(lk.REGISTRY[method_of(name)], cfg)
        model = copy.deepcopy(self.base)
        torch.manual_seed(self.args.seed)  # random factors (LoRA's A) are the same in every run
        t0 = time.perf_counter()
        lk.attach(model, cfg, targets="all-linear", calibration=self.calibration if calibrate else None)
        init_s = time.perf_counter() - t0
        rec: dict[str, Any] = {
            "config": dataclasses.asdict(cfg),
            "lr": lr,
            "needs_calibration": calibrate,
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "init_s": init_s,
        }
        result = train(
            model, self.records, self.train_config(lr), out_dir=self.out / name, pad_id=self.pad, progress=False
        )
        rec.update(train_s=result.seconds, losses=result.losses)
        bad = next((i + 1 for i, v in enumerate(result.losses) if not math.isfinite(v)), None)
        if bad is not None:
            raise FloatingPointError(f"non-finite training loss at step {bad}: {result.losses[bad - 1]}")
        if not self.args.no_eval:
            with torch.no_grad():
                rec["heldout_loss"] = mean_loss(model, self.held_records, self.pad)[0]
            rec["heldout_exact_match"] = exact_match(model, self.tok, self.held, chat=self.chat).accuracy
        del model
        return rec


def score(runs: dict[str, dict[str, Any]], steps: int, w: int) -> dict[str, float]:
    """Add smoothed curves, steps-to-target and speedups vs the baseline to every run; the targets."""
    for rec in runs.values():
        rec["smoothed"] = smooth(rec["losses"], w)
        rec["final_loss"] = rec["smoothed"][-1]
        rec["last_step_loss"] = rec["losses"][-1]
        rec["mean_loss"] = sum(rec["losses"]) / len(rec["losses"])
    if BASELINE not in runs:
        return {}
    base = runs[BASELINE]["smoothed"]
    targets = {"final": base[-1], "half": base[max(0, steps // 2 - 1)]}
    for rec in runs.values():
        for key, target in targets.items():
            mine, ref = steps_to(rec["smoothed"], target), steps_to(base, target)
            rec[f"steps_to_{key}"] = mine
            rec[f"speedup_{key}"] = ref / mine if mine and ref else None
    return targets


def plot(runs: dict[str, dict[str, Any]], targets: dict[str, float], file: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 5.2))
    cmap = plt.get_cmap("tab20")
    for i, (name, rec) in enumerate(runs.items()):
        steps = range(1, len(rec["losses"]) + 1)
        base_style = {"color": "black", "linewidth": 2, "linestyle": "--", "zorder": 10}  # on top, dashed
        style = base_style if name == BASELINE else {"color": cmap(i % 20)}
        ax1.plot(steps, rec["losses"], alpha=0.85, label=name, **style)
        ax2.plot(steps, rec["smoothed"], label=name, **style)
    for key, target in targets.items():
        ax2.axhline(target, color="grey", linestyle=":", linewidth=1)
        ax2.annotate(f"lora {key}", (1, target), fontsize=8, color="grey", va="bottom")
    ax1.set(title="training loss per step", xlabel="step", ylabel="cross-entropy (answer tokens)", yscale="log")
    ax2.set(title="trailing mean (the curves the speedups use)", xlabel="step", yscale="log")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    ax2.legend(fontsize=8, ncol=2)
    fig.suptitle(title)
    fig.tight_layout()
    file.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(file, dpi=110)
    plt.close(fig)


def table(runs: dict[str, dict[str, Any]]) -> str:
    """A markdown table: init, final loss, steps to the baseline's final/half loss, speedups, init seconds."""

    def f(v: Any, fmt: str) -> str:
        return "—" if v is None else format(v, fmt)

    lines = [
        "| init | L̄(N) | mean loss | steps to lora's L̄(N) | speedup | steps to lora's L̄(N/2) | speedup | "
        "held-out EM | init s | train s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, rec in runs.items():
        lines.append(
            f"| {name} | {rec['final_loss']:.4f} | {rec['mean_loss']:.3f} | {f(rec.get('steps_to_final'), 'd')} | "
            f"{f(rec.get('speedup_final'), '.2f')} | {f(rec.get('steps_to_half'), 'd')} | "
            f"{f(rec.get('speedup_half'), '.2f')} | {f(rec.get('heldout_exact_match'), '.0%')} | "
            f"{rec['init_s']:.1f} | {rec['train_s']:.0f} |"
        )
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", default="smollm2-135m")
    ap.add_argument("--task", default="date", help="a built-in task (lorakit.train.tasks)")
    ap.add_argument("--inits", default=",".join(INITS), help="comma-separated F3 inits (the baseline always runs)")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3, help="peak lr for every init")
    ap.add_argument("--lr-for", action="append", default=[], metavar="NAME=LR", help="another lr for one init")
    ap.add_argument("--set", action="append", default=[], metavar="NAME:KEY=VALUE", help="override a config option")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--init-batches", type=int, default=4, help="calibration batches for inits that need data")
    ap.add_argument("--smooth", type=int, default=5, help="trailing-mean window for the convergence targets")
    ap.add_argument("--heldout", type=int, default=16, help="held-out questions for exact match")
    ap.add_argument("--no-eval", action="store_true", help="skip the held-out loss and exact match")
    ap.add_argument("--seed", type=int, default=0)
    # 1, as `lorakit demo`: on this 2-core shared machine 2 threads trained at 14 tokens/s, 1 thread at 132 (load ~4)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (fixed for the whole run)")
    ap.add_argument("--json-out", type=Path)
    ap.add_argument("--plot", type=Path, help="PNG of every loss curve")
    return ap.parse_args()


def overrides(args: argparse.Namespace) -> tuple[dict[str, float], dict[str, dict[str, Any]]]:
    """(--lr-for as {name: lr}, --set as {name: {key: value}}); unknown names are errors."""
    lr_for = {k: float(v) for k, v in parse_pairs(args.lr_for, "--lr-for").items()}
    sets: dict[str, dict[str, Any]] = {}
    for item in args.set:
        name, sep, rest = item.partition(":")
        if not sep:
            raise SystemExit(f"--set expects NAME:KEY=VALUE, got {item!r}")
        sets.setdefault(name, {}).update({k: parse_value(v) for k, v in parse_pairs([rest], "--set").items()})
    for name in [*lr_for, *sets]:
        if name not in lk.REGISTRY and name not in INIT_OPTIONS:
            raise SystemExit(f"unknown method or init {name!r} in --lr-for/--set")
    return lr_for, sets


def run_all(
    bench: Bench, names: list[str], lr_for: dict[str, float], sets: dict[str, dict[str, Any]]
) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """(runs, failures): each init in turn; an error or a non-finite loss is recorded as a failure."""
    runs: dict[str, dict[str, Any]] = {}
    failed: dict[str, dict[str, Any]] = {}
    for name in names:
        lr = lr_for.get(name, bench.args.lr)
        opts = method_options(name, bench.args.rank, lr, sets)
        log(f"[{name}] lr {lr:g}, options {opts}")
        try:
            runs[name] = bench.run(name, lr, opts)
        except Exception as e:  # a failing init is a result: recorded, then the next one runs
            tb = traceback.format_exception(e)
            failed[name] = {"options": opts, "error": f"{type(e).__name__}: {e}", "traceback_tail": "".join(tb[-4:])}
            log(f"[{name}] FAILED: {type(e).__name__}: {e}")
            continue
        rec = runs[name]
        log(f"[{name}] loss {rec['losses'][0]:.3f} -> {rec['losses'][-1]:.4f}, init {rec['init_s']:.1f} s")
    return runs, failed


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    lr_for, sets = overrides(args)
    inits = [n.strip() for n in args.inits.split(",") if n.strip()]
    unknown = [n for n in inits if n not in lk.REGISTRY and n not in INIT_OPTIONS]
    if unknown:
        f3 = [n for n, s in lk.REGISTRY.items() if s.family == "F3"]
        raise SystemExit(f"unknown init(s) {unknown}; init options: {sorted(INIT_OPTIONS)}, F3 methods: {f3}")
    load_before = os.getloadavg()[0]
    bench = Bench(args)
    try:
        runs, failed = run_all(bench, [BASELINE, *[n for n in inits if n != BASELINE]], lr_for, sets)
    finally:
        shutil.rmtree(bench.out, ignore_errors=True)  # the loop's metrics.jsonl per init: the JSON has the losses
    targets = score(runs, args.steps, args.smooth)
    result = {
        "workload": "init_convergence",
        "base": args.base,
        "task": args.task,
        "baseline": BASELINE,
        "steps": args.steps,
        "batch": args.batch,
        "lr": args.lr,
        "lr_for": lr_for,
        "set": sets,
        "rank": args.rank,
        "targets": "all-linear",
        "init_batches": args.init_batches,
        "train_records": len(bench.records),
        "heldout": 0 if args.no_eval else args.heldout,
        "seed": args.seed,
        "threads": args.threads,
        "smooth_window": args.smooth,
        "loss_targets": targets,
        "runs": runs,
        "failed": failed,
        "excluded_from_default": EXCLUDED,
        "base_load_s": bench.load_s,
        "loadavg_1min_before": load_before,
        "loadavg_1min_after": os.getloadavg()[0],
        "versions": {"torch": torch.__version__, "lorakit": getattr(lk, "__version__", "?")},
    }
    if args.plot and runs:
        title = f"{args.base}, task '{args.task}', r={args.rank}, batch {args.batch}, lr {args.lr:g}"
        plot(runs, targets, args.plot, title)
    if runs:
        log(table(runs))
    emit(result, args.json_out)


if __name__ == "__main__":
    main()
