"""lorakit extract vs mergekit-extract-lora on a SmolLM2-135M base / full fine-tune pair.

Each side runs its command line (``lorakit extract``, ``mergekit-extract-lora``) as a fresh child
process (so its peak RSS is its own, and start-up and imports count as a user sees them),
interleaved A B A B ..., on the same checkpoints at the same rank; medians of the timed repetitions.
Quality is measured here, on both outputs, against the true per-module deltas:
mean / max relative Frobenius error and its ratio to the exact-SVD optimum at that rank.
Also: LoRA parameters lorakit needs (``--energy``) to keep the mean energy mergekit keeps at --rank.

Set-up of the peer (its own environment; mergekit pins its own dependencies):
    bash benchmarks/setup_mergekit.sh            # -> benchmarks/.venv-mergekit
Run:
    .venv/bin/python benchmarks/extract_vs_mergekit.py [--reps 3] [--rank 16] [--threads 2]
The fine-tune (40 full AdamW steps on local text) is made once under runs/bench/extract_pair.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
PAIR = ROOT / "runs" / "bench" / "extract_pair"
MERGEKIT = ROOT / "benchmarks" / ".venv-mergekit" / "bin" / "mergekit-extract-lora"
LORAKIT = Path(sys.executable).parent / "lorakit"  # the console script of this environment
ENV = {**os.environ, "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2", "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}


def set_threads(n: int) -> None:
    """The cores' worth of threads each side may use: OMP_NUM_THREADS (mergekit's torch uses them for its
    SVDs; lorakit's CLI runs its SVDs on ``--threads`` torch threads, default 1, beside its I/O threads)."""
    ENV["OMP_NUM_THREADS"] = ENV["MKL_NUM_THREADS"] = str(n)
    torch.set_num_threads(n)


def make_tuned(steps: int = 40) -> Path:
    """A short full fine-tune of SmolLM2 on built-in task text (every parameter trains, embeddings too)."""
    tuned = PAIR / "tuned"
    if (tuned / "config.json").is_file():
        return tuned
    import lorakit as lk
    from lorakit.train.tasks import task_examples

    torch.manual_seed(0)
    model, tok = lk.load_base("smollm2-135m")
    model.train()
    texts = [f"{e.prompt} {e.answer}" for name in ("addition", "date") for e in task_examples(name, "train", 2 * steps)]
    texts = [texts[i // 2 + (i % 2) * 2 * steps] for i in range(4 * steps)]  # alternate the two tasks
    opt = torch.optim.AdamW(model.parameters(), lr=5e-5)
    for step in range(steps):
        batch = tok(texts[4 * step : 4 * step + 4], return_tensors="pt", padding=True)
        loss = model(**batch, labels=batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        print(f"fine-tune step {step + 1}/{steps} loss {loss.item():.3f}", file=sys.stderr)
    model.save_pretrained(tuned)
    tok.save_pretrained(tuned)
    return tuned


def run_child(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS MB) of one child process.

    GNU time runs the command and reports its peak RSS: the child is forked from ``time`` (a
    small process), not from this one, so the figure is the command's own.
    """
    timed = ["/usr/bin/time", "-f", "%e %M", "-o", str(PAIR / "time.txt"), *cmd]
    proc = subprocess.run(timed, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed: {proc.stderr[-2000:]}")
    wall, rss_kb = (PAIR / "time.txt").read_text().split()[-2:]
    return float(wall), float(rss_kb) / 1024


def lorakit_cmd(base: Path, tuned: Path, out: Path, flags: list[str]) -> list[str]:
    """``lorakit extract`` as a user runs it (its default ``--threads``; no progress bar: TQDM_DISABLE)."""
    return [
        str(LORAKIT),
        "extract",
        "--base",
        str(base),
        "--tuned",
        str(tuned),
        "--out",
        str(out),
        *flags,
        "--overwrite",
    ]


def quality(adapter: Path, base: Path, tuned: Path) -> dict[str, float]:
    """Errors of an adapter's LoRA modules against the true deltas, and against the exact SVD at each rank."""
    from lorakit.extract.checkpoint import Checkpoint
    from lorakit.io.factors import read_factors

    b, t, f = Checkpoint(base), Checkpoint(tuned), read_factors(adapter)
    errors, ratios, energies, params = [], [], [], 0
    for module, fac in f.factors.items():
        key = f"{module}.weight"
        delta = (t.get(key) - b.get(key)).double()
        if f.kinds[module] == "embedding":
            delta = delta.T
        s2 = torch.linalg.svdvals(delta).square()
        k = fac.A.shape[0]
        optimal = float((s2[k:].sum() / s2.sum()).sqrt())
        err = float((f.delta(module).double() - delta).norm() / delta.norm())
        errors.append(err)
        ratios.append(err / optimal if optimal > 0 else 1.0)
        energies.append(1 - err**2)
        params += k * (fac.A.shape[1] + fac.B.shape[0])
    return {
        "modules": len(errors),
        "mean_rel_error": statistics.mean(errors),
        "max_rel_error": max(errors),
        "mean_error_vs_optimal": statistics.mean(ratios),
        "max_error_vs_optimal": max(ratios),
        "mean_energy": statistics.mean(energies),
        "lora_params": params,
        "output_mb": round(sum(p.stat().st_size for p in adapter.iterdir() if p.is_file()) / 2**20, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of each side")
    parser.add_argument("--mergekit", type=Path, default=Path(os.environ.get("MERGEKIT_BIN", MERGEKIT)))
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    parser.add_argument("--make-pair", action="store_true", help="only make the fine-tuned checkpoint")
    args = parser.parse_args()
    if args.make_pair:
        make_tuned()
        return
    set_threads(args.threads)
    if not args.mergekit.exists():
        sys.exit(f"{args.mergekit} not found: run `bash benchmarks/setup_mergekit.sh` (or set MERGEKIT_BIN).")
    from lorakit.models import base_dir

    base, tuned = base_dir("smollm2-135m"), PAIR / "tuned"
    if not (tuned / "config.json").is_file():  # in a child, so this process stays small
        subprocess.run([sys.executable, __file__, "--make-pair"], env=ENV, check=True)
    work = PAIR / "outputs"
    ours, theirs = work / "lorakit", work / "mergekit"
    mk_cmd = [str(args.mergekit), "--model", str(tuned), "--base-model", str(base), "--out-path", str(theirs)]
    mk_cmd += ["--max-rank", str(args.rank), "--quiet"]
    times: dict[str, list[tuple[float, float]]] = {"lorakit": [], "mergekit": []}
    load = [os.getloadavg()[0]]  # 1-minute load average: the machine is shared, so say how busy it was
    for rep in range(args.reps + 1):  # the first round is a warm-up (page cache, imports)
        for side in ("lorakit", "mergekit"):
            shutil.rmtree(theirs, ignore_errors=True)
            cmd = lorakit_cmd(base, tuned, ours, ["--rank", str(args.rank)]) if side == "lorakit" else mk_cmd
            wall, rss = run_child(cmd)
            if rep:
                times[side].append((wall, rss))
            print(f"rep {rep} {side}: {wall:.2f} s, {rss:.0f} MB", file=sys.stderr)
    load.append(os.getloadavg()[0])
    q_ours, q_theirs = quality(ours, base, tuned), quality(theirs, base, tuned)
    target = q_theirs["mean_energy"]  # lorakit at the same mean kept energy, rank chosen per module
    energy_dir = work / "lorakit_energy"
    run_child(lorakit_cmd(base, tuned, energy_dir, ["--energy", f"{target:.6f}"]))
    q_energy = quality(energy_dir, base, tuned)
    med = {s: (statistics.median(w for w, _ in v), statistics.median(r for _, r in v)) for s, v in times.items()}
    result = {
        "workload": f"extract smollm2-135m vs a 40-step full fine-tune, rank {args.rank}, {args.threads} threads, CLIs",
        "reps": args.reps,
        "load_avg_1min": {"before": round(load[0], 2), "after": round(load[1], 2)},
        "lorakit": {"wall_s": round(med["lorakit"][0], 2), "peak_rss_mb": round(med["lorakit"][1]), **q_ours},
        "peer": {"name": "mergekit-extract-lora", "wall_s": round(med["mergekit"][0], 2)}
        | {"peak_rss_mb": round(med["mergekit"][1]), **q_theirs},
        "ratio": {
            "speedup": round(med["mergekit"][0] / med["lorakit"][0], 2),
            "rss": round(med["lorakit"][1] / med["mergekit"][1], 3),
            "error_vs_exact_svd": round(q_ours["mean_error_vs_optimal"], 4),
        },
        "equal_energy": {
            "mean_energy_target": round(target, 4),
            "lorakit_params": q_energy["lora_params"],
            "lorakit_mean_energy": round(q_energy["mean_energy"], 4),
            "mergekit_params": q_theirs["lora_params"],
            "params_ratio": round(q_energy["lora_params"] / q_theirs["lora_params"], 3),
        },
        "raw": times,
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
