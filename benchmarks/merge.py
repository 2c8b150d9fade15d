"""Merging 4 LoRA adapters of SmolLM2's shape: lorakit's factor-level merge vs materialised deltas vs PEFT.

Workload `smollm2-shape` adapters: random factors for 30 layers × (q, k, v, o, gate, up, down),
hidden 576, MLP 1536, k/v 576→192 (9 heads / 3 KV heads), r = 16, 4 adapters, weights
1, 0.5, 0.25, 2. Sides, each run in a fresh child process (so its peak RSS is its own),
interleaved in rotating order, median of the timed repetitions after one warm-up round (none
with --quick):

- ``lk_linear``: ``lk.merge_adapters(method="linear")`` — exact, rank 64, from the factors only;
- ``dense_linear``: the same merge by materialising Σ w_i·ΔW_i per module and an SVD kept at rank 64;
- ``lk_svd``: ``lk.merge_adapters(method="svd", rank=16)`` — QR of the stacked factors + a 64×64 SVD;
- ``dense_svd``: materialise Σ w_i·ΔW_i, ``torch.linalg.svd``, keep 16;
- ``peft_svd`` (peer): PEFT ``add_weighted_adapter(combination_type="svd", svd_rank=16)`` on a PeftModel
  holding the 4 adapters over a random-weight smollm2-shape base, plus saving the merged adapter.

Timed: lorakit and dense read the 4 adapter dirs, merge and write the result; for PEFT only the
merge and the save are timed (loading base + adapters is outside the timer). Prints one JSON
object; also checks that the sides wrote the same deltas.

    .venv/bin/python benchmarks/merge.py [--quick] [--layers 30] [--reps 5] [--threads 2] [--json-out PATH]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import lorakit as lk
from lorakit.io.factors import AdapterFactors, read_factors, write_factors
from lorakit.methods._api import LoraFactors

R, K, HIDDEN, MLP, KV = 16, 4, 576, 1536, 192
WEIGHTS = [1.0, 0.5, 0.25, 2.0]
SHAPES = {  # module -> (out, in)
    "self_attn.q_proj": (HIDDEN, HIDDEN),
    "self_attn.k_proj": (KV, HIDDEN),
    "self_attn.v_proj": (KV, HIDDEN),
    "self_attn.o_proj": (HIDDEN, HIDDEN),
    "mlp.gate_proj": (MLP, HIDDEN),
    "mlp.up_proj": (MLP, HIDDEN),
    "mlp.down_proj": (HIDDEN, MLP),
}
SIDES = ("lk_linear", "dense_linear", "lk_svd", "dense_svd", "peft_svd")


def make_adapters(root: Path, layers: int) -> list[Path]:
    paths = []
    for i in range(K):
        g = torch.Generator().manual_seed(i)
        factors, kinds = {}, {}
        for layer in range(layers):
            for name, (d_out, d_in) in SHAPES.items():
                module = f"model.layers.{layer}.{name}"
                A = torch.randn(R, d_in, generator=g) / d_in**0.5  # (r, in)
                B = torch.randn(d_out, R, generator=g) * 0.02  # (out, r)
                factors[module], kinds[module] = LoraFactors(A, B, 2.0), "linear"
        paths.append(write_factors(root / f"adapter{i}", AdapterFactors(factors, kinds, task_type="CAUSAL_LM")))
    return paths


def dense_merge(paths: list[Path], rank: int, out: Path) -> None:
    """The same weighted-sum-then-SVD merge, done the direct way: materialise each module's sum."""
    adapters = [read_factors(p) for p in paths]
    merged = {}
    for module in adapters[0].factors:
        total = sum(w * a.delta(module) for w, a in zip(WEIGHTS, adapters, strict=True))  # (out, in)
        U, S, Vh = torch.linalg.svd(total, full_matrices=False)
        merged[module] = LoraFactors(Vh[:rank], U[:, :rank] * S[:rank], 1.0)
    write_factors(out, AdapterFactors(merged, dict.fromkeys(merged, "linear")))


def peft_setup(paths: list[Path], layers: int):  # noqa: ANN201 - a PeftModel
    import peft

    from lorakit.testing import smollm2_shape

    model = peft.PeftModel.from_pretrained(smollm2_shape(layers), str(paths[0]), adapter_name="a0")
    for i, p in enumerate(paths[1:], 1):
        model.load_adapter(str(p), adapter_name=f"a{i}")
    return model


def child(side: str, root: Path, layers: int, out: Path, threads: int) -> None:
    """Run one side once and print {"seconds", "rss_before_mb", "peak_rss_mb"}."""
    torch.set_num_threads(threads)
    paths = [root / f"adapter{i}" for i in range(K)]
    model = peft_setup(paths, layers) if side == "peft_svd" else None
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    if side == "lk_linear":
        lk.merge_adapters(paths, "linear", WEIGHTS, out=out)
    elif side == "lk_svd":
        lk.merge_adapters(paths, "svd", WEIGHTS, out=out, rank=R)
    elif side == "dense_linear":
        dense_merge(paths, K * R, out)
    elif side == "dense_svd":
        dense_merge(paths, R, out)
    else:
        assert model is not None
        names = [f"a{i}" for i in range(K)]
        model.add_weighted_adapter(names, WEIGHTS, "merged", combination_type="svd", svd_rank=R)
        model.save_pretrained(str(out), selected_adapters=["merged"])
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": seconds, "rss_before_mb": before, "peak_rss_mb": peak}))


def run_side(side: str, root: Path, layers: int, out: Path, threads: int) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--child", side, "--root", str(root), "--layers", str(layers), "--out", str(out)]
    cmd += ["--threads", str(threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"side {side} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def max_rel_error(a: Path, b: Path) -> float:
    """Largest per-module relative Frobenius difference of the deltas two adapter dirs hold."""
    fa, fb = read_factors(a), read_factors(b)
    return max(float((fa.delta(m) - fb.delta(m)).norm() / fb.delta(m).norm()) for m in fb.factors)


def exact_linear_error(paths: list[Path], merged: Path) -> float:
    adapters, out = [read_factors(p) for p in paths], read_factors(merged)
    worst = 0.0
    for module in out.factors:
        ref = sum(w * a.delta(module) for w, a in zip(WEIGHTS, adapters, strict=True))
        worst = max(worst, float((out.delta(module) - ref).norm() / ref.norm()))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="6 layers, 3 reps, no warm-up round")
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--threads", type=int, default=2, help="torch threads per side (default 2)")
    parser.add_argument("--json-out", type=Path, default=None)
    parser.add_argument("--child", choices=SIDES, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--root", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    layers = args.layers or (6 if args.quick else 30)
    if args.child:
        child(args.child, args.root, layers, args.out, args.threads)
        return
    reps = args.reps or (3 if args.quick else 5)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        paths = make_adapters(root, layers)
        runs: dict[str, list[dict[str, float]]] = {s: [] for s in SIDES}
        warmup = 0 if args.quick else 1  # a first, uncounted round warms the page cache
        for rep in range(reps + warmup):
            order = SIDES[rep % len(SIDES) :] + SIDES[: rep % len(SIDES)]
            for side in order:
                result = run_side(side, root, layers, root / f"out-{side}", args.threads)
                if rep >= warmup:
                    runs[side].append(result)
        peft_dir = root / "out-peft_svd" / "merged"
        check = {
            "lk_linear_vs_exact_sum_max_rel": exact_linear_error(paths, root / "out-lk_linear"),
            "lk_svd_vs_dense_svd_max_rel": max_rel_error(root / "out-lk_svd", root / "out-dense_svd"),
            "lk_svd_vs_peft_svd_max_rel": max_rel_error(root / "out-lk_svd", peft_dir),
        }
    med = {s: {k: statistics.median(r[k] for r in runs[s]) for k in runs[s][0]} for s in SIDES}
    seconds = {s: round(med[s]["seconds"], 4) for s in SIDES}
    peak = {s: round(med[s]["peak_rss_mb"], 1) for s in SIDES}
    merge_rss = {s: round(med[s]["peak_rss_mb"] - med[s]["rss_before_mb"], 1) for s in SIDES}
    result = {
        "workload": f"smollm2-shape LoRA adapters ({layers} layers x 7 modules, r={R}), merge of {K}",
        "threads": args.threads,
        "reps": reps,
        "lorakit": seconds["lk_svd"],
        "peer": seconds["peft_svd"],
        "ratio": round(seconds["peft_svd"] / seconds["lk_svd"], 2),
        "seconds": seconds,
        "peak_rss_mb": peak,
        "merge_rss_growth_mb": merge_rss,
        "ratios": {
            "time dense_linear/lk_linear": round(seconds["dense_linear"] / seconds["lk_linear"], 2),
            "time dense_svd/lk_svd": round(seconds["dense_svd"] / seconds["lk_svd"], 2),
            "time peft_svd/lk_svd": round(seconds["peft_svd"] / seconds["lk_svd"], 2),
            "peak_rss dense_svd/lk_svd": round(peak["dense_svd"] / peak["lk_svd"], 3),
            "peak_rss peft_svd/lk_svd": round(peak["peft_svd"] / peak["lk_svd"], 3),
        },
        "check": check,
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.json_out:
        args.json_out.write_text(text + "\n")


if __name__ == "__main__":
    main()
