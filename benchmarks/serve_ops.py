"""Batched heterogeneous adapter ops on SmolLM2 module shapes: base Linear, single LoRA, lorakit mixed, PEFT mixed.

One served module at a time (q/o_proj 576→576, gate/up_proj 576→1536, down_proj 1536→576), 64 adapters
in slots (r = 16, alpha = 32; ``--mixed-ranks`` cycles r ∈ {8, 16, 32, 64}), requests assigned to
1 / 16 / 64 distinct adapters and sorted by slot as the engine sends them. Sides, all under
inference_mode, interleaved (A B C … A B C …) after one warm-up call each; medians of ``--reps``:

- ``base``: ``F.linear(x, W)`` alone;
- ``single``: base + one adapter as lorakit's Lora inference path adds it (``y.addmm_(x·Aᵀ, Bᵀ, alpha=s)``);
- ``lorakit_D``: base + ``add_lora_delta_`` over D distinct adapters (the SlotBatch is built once per
  forward for all ~200 modules, so it is timed apart, in ``build_us``);
- ``peft_D``: PEFT's own ``lora.Linear`` holding the same 64 adapters, called with ``adapter_names=``
  (its ``_mixed_batch_forward``: a loop over the unique adapter names, a sub-batch gather per name).

Also ``paths`` (segments vs gather-BMM vs the auto rule, op alone, decode-like batches, which set
``GATHER_MAX``), ``compressed`` (a 1,000-adapter collection under Zipf popularity: x·V once, the
per-token core, ·Uᵀ) and ``compressed_paths`` (which set ``CORE_GATHER_MAX``). Ratios are throughput
ratios (time ratios) of the medians; ``ratio_of_min`` uses each side's fastest round. On a shared
machine check ``loadavg_1min``: with 2 threads, a descheduled OpenMP worker stalls small ops by ~1 ms,
so ``--threads 1`` gives the steadier comparison of paths. Prints one JSON object.

    .venv/bin/python benchmarks/serve_ops.py [--reps 15] [--threads 2] [--only paths] [--json-out PATH]
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import peft
import torch
import torch.nn.functional as F
from peft.tuners.lora.layer import Linear as PeftLinear

from _common import emit
from lorakit.serve.ops import SlotBatch, add_compressed_delta_, add_lora_delta_
from lorakit.serve.ops.batch import CORE_GATHER_MAX, GATHER_MAX

SHAPES = {"q_o_proj": (576, 576), "gate_up_proj": (576, 1536), "down_proj": (1536, 576)}
PREFILL = [(16, 128), (64, 32)]  # (requests, tokens each)
DECODE = [16, 64]  # requests, one new token each
DISTINCT = [1, 16, 64]
SLOTS, ALPHA = 64, 32.0


def interleaved(fns: dict[str, Callable[[], object]], reps: int, inner: int) -> dict[str, list[float]]:
    """Seconds per call of every side, ``reps`` rounds of A B C …, each side ``inner`` calls per round."""
    for f in fns.values():
        f()  # warm-up
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            t0 = time.perf_counter()
            for _ in range(inner):
                f()
            times[k].append((time.perf_counter() - t0) / inner)
    return times


class Served:
    """One module: base weight W (out, in), 64 adapters as slot buffers and as a PEFT lora.Linear."""

    def __init__(self, d_in: int, d_out: int, ranks: list[int], seed: int):
        g = torch.Generator().manual_seed(seed)
        self.ranks, r_max = ranks, max(ranks)
        self.W = torch.randn(d_out, d_in, generator=g) / math.sqrt(d_in)  # (out, in)
        self.A = torch.zeros(len(ranks), r_max, d_in)  # (S, r_max, in)
        self.B = torch.zeros(len(ranks), d_out, r_max)  # (S, out, r_max), scale folded in
        base = torch.nn.Linear(d_in, d_out, bias=False)
        base.weight.data.copy_(self.W)
        cfg = peft.LoraConfig(r=ranks[0], lora_alpha=ALPHA, lora_dropout=0.0, init_lora_weights=False)
        self.peft = PeftLinear(base, "a0", config=cfg, r=ranks[0], lora_alpha=ALPHA).eval()
        for s, r in enumerate(ranks):
            if s:
                self.peft.update_layer(f"a{s}", r, lora_alpha=ALPHA, config=cfg)
            A = torch.randn(r, d_in, generator=g) / math.sqrt(d_in)  # (r, in)
            B = torch.randn(d_out, r, generator=g) / math.sqrt(r)  # (out, r)
            self.peft.lora_A[f"a{s}"].weight.data.copy_(A)
            self.peft.lora_B[f"a{s}"].weight.data.copy_(B)
            self.A[s, :r], self.B[s, :, :r] = A, B * (ALPHA / r)
        self.peft.requires_grad_(False)

    def sides(self, x: torch.Tensor, distinct: list[int]) -> dict[str, Callable[[], torch.Tensor]]:
        """x (batch, T, in): the timed sides of one case."""
        b, t, d_in = x.shape
        x2 = x.reshape(-1, d_in)  # (N, in)
        r0 = self.ranks[0]
        A0, B0 = self.A[0, :r0], self.B[0, :, :r0]  # the single adapter, scale folded (alpha=1 below)

        def single() -> torch.Tensor:
            y = F.linear(x2, self.W)  # (N, out)
            return y.addmm_(x2 @ A0.T, B0.T)  # (N, out) += (N, r)(r, out)

        out: dict[str, Callable[[], torch.Tensor]] = {"base": lambda: F.linear(x2, self.W), "single": single}
        for d in distinct:
            req = request_slots(b, d)  # (batch,)
            batch = SlotBatch.build(req.repeat_interleave(t), self.ranks)
            out[f"lorakit_{d}"] = self._mixed(x2, batch)
            out[f"peft_{d}"] = self._peft(x, [f"a{s}" for s in req.tolist()])
        return out

    def _mixed(self, x2: torch.Tensor, batch: SlotBatch) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            y = F.linear(x2, self.W)  # (N, out)
            add_lora_delta_(y, x2, self.A, self.B, batch)
            return y

        return run

    def _peft(self, x: torch.Tensor, names: list[str]) -> Callable[[], torch.Tensor]:
        return lambda: self.peft(x, adapter_names=names).reshape(-1, self.W.shape[0])


def request_slots(requests: int, distinct: int) -> torch.Tensor:
    """Request i uses slot i mod D, requests sorted by slot (as the engine batches them)."""
    return (torch.arange(requests) % distinct).sort().values  # (requests,)


def summarize(times: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    med = {k: statistics.median(v) for k, v in times.items()}
    low = {k: min(v) for k, v in times.items()}
    return {"median_us": {k: v * 1e6 for k, v in med.items()}, "min_us": {k: v * 1e6 for k, v in low.items()}}


def ratios(t: dict[str, float]) -> dict[str, float]:
    """Throughput ratios from times: single ÷ base, mixed ÷ single, lorakit ÷ PEFT at the same mix."""
    out = {"single_vs_base": t["base"] / t["single"]}
    for k in t:
        if k.startswith("lorakit_"):
            d = k.removeprefix("lorakit_")
            out[f"mixed{d}_vs_single"] = t["single"] / t[k]
            out[f"mixed{d}_vs_base"] = t["base"] / t[k]
            out[f"lorakit{d}_vs_peft{d}"] = t[f"peft_{d}"] / t[k]
    return out


def check(sides: dict[str, Callable[[], torch.Tensor]]) -> float:
    """Largest relative difference between lorakit and PEFT outputs at each mix (must be float noise)."""
    worst = 0.0
    for k in sides:
        if k.startswith("lorakit_"):
            ours, theirs = sides[k](), sides["peft_" + k.removeprefix("lorakit_")]()
            worst = max(worst, float((ours - theirs).abs().max() / theirs.abs().max()))
    if worst > 1e-4:
        raise SystemExit(f"lorakit and PEFT outputs differ by {worst:.3g} (relative) > 1e-4; not timing.")
    return worst


def bench_modules(args: argparse.Namespace, ranks: list[int]) -> tuple[dict[str, object], float]:
    results: dict[str, object] = {}
    worst = 0.0
    cases = [("prefill", b, t) for b, t in PREFILL] + [("decode", b, 1) for b in DECODE]
    for name, (d_in, d_out) in SHAPES.items():
        mod = Served(d_in, d_out, ranks, args.seed)
        for kind, b, t in cases:
            x = torch.randn(b, t, d_in, generator=torch.Generator().manual_seed(args.seed + b + t))
            sides = mod.sides(x, [d for d in DISTINCT if d <= b])
            worst = max(worst, check(sides))
            times = interleaved(sides, args.reps, 1 if kind == "prefill" else 20)
            s = summarize(times)
            builds = interleaved(
                {"b": lambda b=b, t=t: SlotBatch.build(request_slots(b, b).repeat_interleave(t), ranks)}, 5, 5
            )
            results[f"{kind}_{b}x{t}/{name}"] = {
                **s,
                "ratio": ratios(s["median_us"]),
                "ratio_of_min": ratios(s["min_us"]),
                "build_us": statistics.median(builds["b"]) * 1e6,
            }
            print(
                f"# {kind} {b}x{t} {name}: "
                + " ".join(f"{k}={v:.2f}" for k, v in results[f"{kind}_{b}x{t}/{name}"]["ratio"].items()),
                flush=True,
            )  # type: ignore[index]
    return results, worst


def bench_paths(args: argparse.Namespace) -> dict[str, object]:
    """Op alone, decode-like (runs of 1 and 4 tokens): every token gathered, every run a segment, the auto rule."""
    out: dict[str, object] = {}
    for d_out in (576, 1536):
        for r in (8, 16, 32, 64):
            mod_A = torch.randn(SLOTS, r, 576) / 24  # (S, r, in)
            mod_B = torch.randn(SLOTS, d_out, r) / math.sqrt(r)  # (S, out, r)
            for n, distinct in ((16, 16), (64, 64), (32, 16), (64, 16)):
                slots = request_slots(n, distinct)
                x, y = torch.randn(n, 576), torch.zeros(n, d_out)
                fns: dict[str, Callable[[], object]] = {
                    p: partial(add_lora_delta_, y, x, mod_A, mod_B, SlotBatch.build(slots, [r] * SLOTS, path=p))
                    for p in ("segments", "gather", "auto")
                }
                stats = summarize(interleaved(fns, args.reps, 10))
                med, low = stats["median_us"], stats["min_us"]
                out[f"out{d_out}_r{r}_{n}tok_{distinct}distinct"] = {
                    **stats,
                    "run_len": n // distinct,
                    "gather_vs_segments_time": med["gather"] / med["segments"],
                    "gather_vs_segments_time_of_min": low["gather"] / low["segments"],
                }
    return out


def compressed_side(W: torch.Tensor, x2: torch.Tensor, coll: tuple[torch.Tensor, ...], batch: SlotBatch) -> None:
    """Base layer + the collection's per-token deltas (x·V once, the token's core, ·Uᵀ)."""
    U, V, cores = coll
    add_compressed_delta_(F.linear(x2, W), x2, U, V, cores, batch)


def bench_compressed(args: argparse.Namespace, cores_n: int = 1000) -> dict[str, object]:
    """1,000 adapters compressed to a shared rank R under Zipf popularity (α = 0.5) vs one plain LoRA (r = 16)."""
    out: dict[str, object] = {}
    d_in, d_out = SHAPES["gate_up_proj"]
    W = torch.randn(d_out, d_in) / math.sqrt(d_in)
    A0, B0 = torch.randn(16, d_in) / 24, torch.randn(d_out, 16) / 4
    g = torch.Generator().manual_seed(args.seed)
    for R in (32, 128):
        coll = collection(d_in, d_out, R, cores_n)
        for kind, b, t in (("prefill", 16, 128), ("decode", 64, 1)):
            u = torch.rand(b, generator=g)
            req = torch.floor(cores_n * u**2).long().sort().values  # request i -> floor(n · u^(1/α)), α = 0.5
            x2 = torch.randn(b * t, d_in)
            fns: dict[str, Callable[[], object]] = {
                "base": partial(F.linear, x2, W),
                "single": lambda x2=x2: F.linear(x2, W).addmm_(x2 @ A0.T, B0.T),
            }
            for p in ("segments", "gather", "auto"):
                batch = SlotBatch.for_cores(req.repeat_interleave(t), cores_n, R, path=p)
                fns[f"compressed_{p}"] = partial(compressed_side, W, x2, coll, batch)
            stats = summarize(interleaved(fns, args.reps, 1 if kind == "prefill" else 20))
            med = stats["median_us"]
            out[f"{kind}_{b}x{t}_R{R}"] = {
                **stats,
                "distinct": len(set(req.tolist())),
                "compressed_vs_single": med["single"] / med["compressed_auto"],
                "compressed_vs_base": med["base"] / med["compressed_auto"],
            }
    return out


def bench_core_paths(args: argparse.Namespace) -> dict[str, object]:
    """Compressed op alone, 16 distinct cores in runs of L tokens: every run gathered vs every run a segment."""
    out: dict[str, object] = {}
    d_in, d_out = SHAPES["gate_up_proj"]
    for R in (32, 64, 128):
        U, V, cores = collection(d_in, d_out, R, 1000)
        for run in (1, 4, 16):
            cidx = (torch.arange(16 * run) // run) * 61  # (16·L,) 16 cores, L tokens each, grouped
            x, y = torch.randn(len(cidx), d_in), torch.zeros(len(cidx), d_out)
            fns: dict[str, Callable[[], object]] = {
                p: partial(add_compressed_delta_, y, x, U, V, cores, SlotBatch.for_cores(cidx, 1000, R, path=p))
                for p in ("segments", "gather", "auto")
            }
            stats = summarize(interleaved(fns, args.reps, 5))
            med, low = stats["median_us"], stats["min_us"]
            out[f"R{R}_run{run}"] = {
                **stats,
                "gather_vs_segments_time": med["gather"] / med["segments"],
                "gather_vs_segments_time_of_min": low["gather"] / low["segments"],
            }
    return out


def collection(d_in: int, d_out: int, R: int, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A random compressed collection: U (out, R), V (in, R), cores (n, R, R)."""
    U, V = torch.randn(d_out, R) / math.sqrt(R), torch.randn(d_in, R) / math.sqrt(d_in)
    return U, V, torch.randn(n, R, R) / math.sqrt(R)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=15, help="timed rounds per side, after 1 warm-up each")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    ap.add_argument("--mixed-ranks", action="store_true", help="slot ranks cycle 8, 16, 32, 64 (default: all 16)")
    ap.add_argument("--only", choices=("modules", "paths", "compressed"), default=None, help="run one section")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json-out", type=Path, default=None, help="also write the JSON object to this file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ranks = [(8, 16, 32, 64)[s % 4] for s in range(SLOTS)] if args.mixed_ranks else [16] * SLOTS
    load_before = os.getloadavg()
    result: dict[str, object] = {"workload": "serve_ops", "shape": "smollm2-shape modules", "threads": args.threads}
    result["ranks"] = "cycle 8,16,32,64" if args.mixed_ranks else "16"
    result["peer"] = {"name": f"peft {peft.__version__} lora.Linear(x, adapter_names=...) (_mixed_batch_forward)"}
    with torch.inference_mode():
        if args.only in (None, "modules"):
            modules, worst = bench_modules(args, ranks)
            result["lorakit"] = modules
            result["ratio"] = {k: v["ratio"] for k, v in modules.items()}  # type: ignore[index]
            result["max_rel_diff_vs_peft"] = worst
        if args.only in (None, "paths"):
            result["paths"] = bench_paths(args)
            result["gather_max"] = GATHER_MAX
        if args.only in (None, "compressed"):
            result["compressed"] = bench_compressed(args)
            result["compressed_paths"] = bench_core_paths(args)
            result["core_gather_max"] = CORE_GATHER_MAX
    result["reps"] = args.reps
    result["torch"] = torch.__version__
    result["loadavg_1min"] = [round(load_before[0], 2), round(os.getloadavg()[0], 2)]
    emit(result, args.json_out)


if __name__ == "__main__":
    main()
