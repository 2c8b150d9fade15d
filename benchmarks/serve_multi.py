"""Multi-adapter serving throughput: lorakit's engine vs the base, a merged adapter, and PEFT's adapter_names.

Workload `smollm2-shape-6L` by default (random weights; --layers 30 for the full shape), all-linear
LoRA adapters of rank --rank with random factors, held in RAM and lent to --slots slots. Prefill:
--batch requests × --seq tokens; decode: one token per request on a KV cache of --context tokens.
Per phase, interleaved (one repetition runs every side once, in a fresh random order, so that no side
always runs after the same one: in a fixed order `single` always followed another model's pass, and
measured 0.90-0.93× mixed64), medians of --reps:

- base (no adapter), merged (one adapter folded into the weights), single (one adapter, unmerged);
- mixed16 / mixed64: 16 / 64 distinct adapters in the batch; zipf1000: --registered adapters
  registered, each request's adapter drawn as floor(n·u^(1/α)) (WORKLOADS.md), a fresh draw per
  repetition, so slot loads and evictions are part of the time; the fixed mixes (single, mixed16,
  mixed64) are preloaded into slots before their timed pass (``Engine.preload``, untimed): that is a
  fixed mix's steady state, whereas sharing the engine with zipf1000 would make each of them reload
  the adapters zipf1000 evicted (~48 copies, ~50 ms of a 0.5 s rank-64 prefill). JSON
  ``slot_loads_per_prefill`` counts the copies each side's timed pass made;
- compressed1000: the same adapters jointly compressed (Compress-then-Serve) to a shared basis of
  rank --shared-rank per module, served from per-adapter cores;
- peft16 / peft64: PEFT with 64 adapters loaded, the batch split with ``adapter_names=``.

Every side's output head gets a contiguous input, as lorakit's engine gives its own
(``models.heads.contiguous_head``): transformers slices the last position as a strided view, which
torch's matmul runs ~9× slower; left in, it was ~40 % of every side's prefill and diluted each
ratio. Logits are checked against PEFT's on the same weights before timing. Prints one JSON object.

    .venv/bin/python benchmarks/serve_multi.py [--layers 6] [--rank 16] [--batch 64] [--seq 32] [--reps 3]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import peft
import torch

from _common import emit
from lorakit.compose.compress import fit_module
from lorakit.models.heads import contiguous_head
from lorakit.serve.engine import Engine
from lorakit.serve.plan import CompressedSet
from lorakit.testing import smollm2_shape

Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]


def random_factors(dims: dict[str, tuple[int, int]], r: int, seed: int) -> Factors:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for m, (d_in, d_out) in dims.items():
        A = torch.randn(r, d_in, generator=g) / d_in**0.5  # (r, in)
        B = torch.randn(d_out, r, generator=g) * (0.5 / r**0.5)  # (out, r), scale folded in
        out[m] = (A, B)
    return out


def zipf_names(n: int, k: int, alpha: float, g: torch.Generator) -> list[str]:
    u = torch.rand(k, generator=g)
    return sorted((f"a{int(i)}" for i in (n * u ** (1 / alpha)).floor().clamp(max=n - 1)), key=lambda s: int(s[1:]))


def build_peft(layers: int, seed: int, factors: list[Factors], r: int) -> Any:
    cfg = peft.LoraConfig(r=r, lora_alpha=r, target_modules="all-linear", init_lora_weights=False)
    model = peft.get_peft_model(smollm2_shape(layers, seed).requires_grad_(False), cfg, adapter_name="a0")
    for i in range(1, len(factors)):
        model.add_adapter(f"a{i}", cfg)
    inner = model.base_model.model
    with torch.no_grad():
        for i, fac in enumerate(factors):
            for m, (A, B) in fac.items():
                layer = inner.get_submodule(m)
                layer.lora_A[f"a{i}"].weight.copy_(A)
                layer.lora_B[f"a{i}"].weight.copy_(B)
    return model.eval()


def merged_model(layers: int, seed: int, fac: Factors) -> torch.nn.Module:
    model = smollm2_shape(layers, seed).requires_grad_(False)
    with torch.no_grad():
        for m, (A, B) in fac.items():
            model.get_submodule(m).weight.add_(B @ A)
    return model


def compressed_set(engine: Engine, factors: list[Factors], rank: int) -> tuple[CompressedSet, float]:
    """Fit the shared basis of every module with lorakit's Compress-then-Serve fitter."""
    from lorakit.methods._api import LoraFactors

    modules, lost, energy = {}, 0.0, 0.0
    for m in engine.bank.dims:
        fit = fit_module([LoraFactors(f[m][0], f[m][1], 1.0) for f in factors], rank)
        modules[m] = (fit.U.float().contiguous(), fit.V.float().contiguous(), fit.cores.float().contiguous())
        lost, energy = lost + float(fit.lost.sum()), energy + float(fit.energy.sum())
    return CompressedSet(modules, [f"a{i}" for i in range(len(factors))]), lost / energy


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:  # noqa: C901 - one linear script
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--batch", type=int, default=64, help="requests per batch")
    ap.add_argument("--seq", type=int, default=32, help="prefill tokens per request")
    ap.add_argument("--context", type=int, default=64, help="KV cache length for decode")
    ap.add_argument("--registered", type=int, default=1000)
    ap.add_argument("--slots", type=int, default=64)
    ap.add_argument("--shared-rank", type=int, default=64)
    ap.add_argument("--alpha", type=float, default=0.5, help="Zipf-like skew α of WORKLOADS.md")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json-out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    B, T, C, L, r = args.batch, args.seq, args.context, args.layers, args.rank

    engine = Engine(smollm2_shape(L, args.seed).requires_grad_(False), max_slots=args.slots, max_batch=B)
    t0 = time.perf_counter()
    factors = [random_factors(engine.bank.dims, r, args.seed + 1 + i) for i in range(args.registered)]
    for i, fac in enumerate(factors):
        engine.cache.register(f"a{i}", "<memory>", persist=False, factors=fac)
    register_s = time.perf_counter() - t0
    coll, compress_error = compressed_set(engine, factors, args.shared_rank)
    compress_s = time.perf_counter() - t0 - register_s
    engine.collections.append(coll)
    engine.compressed.update({f"c{i}": (0, i) for i in range(args.registered)})
    log(f"registered {args.registered} adapters in {register_s:.1f} s, compressed in {compress_s:.1f} s")
    base = contiguous_head(smollm2_shape(L, args.seed).requires_grad_(False))
    merged = contiguous_head(merged_model(L, args.seed, factors[0]))
    peft_model = build_peft(L, args.seed, factors[:64], r)
    contiguous_head(peft_model.get_base_model())  # every side's head as the engine's (see the module doc)
    log(f"PEFT with 64 adapters built at {time.perf_counter() - t0:.1f} s")
    g = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, 49152, (B, T), generator=g)
    ctx = torch.randint(0, 49152, (B, C), generator=g)
    step_ids = torch.randint(0, 49152, (B, 1), generator=g)

    fixed = {
        "single": ["a0"] * B,
        "mixed16": sorted((f"a{i % 16}" for i in range(B)), key=lambda s: int(s[1:])),
        "mixed64": [f"a{i % 64}" for i in range(B)],
    }
    with torch.inference_mode():  # correctness before timing: the engine equals PEFT on the same weights
        want = peft_model(input_ids=ids[:8], adapter_names=fixed["mixed64"][:8], logits_to_keep=1).logits
        got = engine.forward(ids[:8], fixed["mixed64"][:8], keep=1)
        diff = float((want - got).abs().max())
        if diff > 1e-3:
            raise SystemExit(f"engine and PEFT logits differ by {diff:.3g}; not timing.")

    def names_for(side: str, rep_names: list[str]) -> list[str]:
        if side == "zipf1000":
            return rep_names
        if side == "compressed1000":
            return ["c" + n[1:] for n in rep_names]
        if side.startswith("peft"):
            return fixed[side.replace("peft", "mixed")]
        return fixed.get(side, [])

    def prefill(side: str, names: list[str]) -> Any:
        if side in ("base", "merged"):
            return (base if side == "base" else merged)(input_ids=ids, logits_to_keep=1)
        if side.startswith("peft"):
            return peft_model(input_ids=ids, adapter_names=names, logits_to_keep=1)
        return engine.forward(ids, names, keep=1)

    def decode(side: str, names: list[str]) -> float:
        """Time one decode step on a fresh cache of C tokens (the cache build is not timed)."""
        if side in ("base", "merged"):
            model = base if side == "base" else merged
            cache = model(input_ids=ctx, use_cache=True).past_key_values
            return timed(lambda: model(input_ids=step_ids, past_key_values=cache, logits_to_keep=1))
        if side.startswith("peft"):
            cache = peft_model(input_ids=ctx, adapter_names=names, use_cache=True).past_key_values
            return timed(
                lambda: peft_model(input_ids=step_ids, past_key_values=cache, adapter_names=names, logits_to_keep=1)
            )
        out: dict[str, Any] = {}
        engine.forward(ctx, names, keep=1, use_cache=True, past_key_values=(cache := _empty_cache()))
        out["t"] = timed(lambda: engine.forward(step_ids, names, keep=1, use_cache=True, past_key_values=cache))
        return float(out["t"])

    sides = ["base", "merged", "single", "mixed16", "mixed64", "zipf1000", "compressed1000", "peft16", "peft64"]
    times: dict[str, dict[str, list[float]]] = {"prefill": {s: [] for s in sides}, "decode": {s: [] for s in sides}}
    distinct: list[int] = []
    loads: dict[str, list[int]] = {s: [] for s in sides}
    with torch.inference_mode():
        for rep in range(args.reps + 1):  # the first round is the warm-up
            rep_names = zipf_names(args.registered, B, args.alpha, g)
            distinct.append(len(set(rep_names)))
            order = random.Random(args.seed + rep).sample(sides, len(sides))  # no side always follows another
            for side in order:
                names = names_for(side, rep_names)
                if side in fixed:
                    engine.preload(names)
                before = engine.cache.stats.loads
                p = timed(lambda side=side, names=names: prefill(side, names))
                loads[side].append(engine.cache.stats.loads - before)
                d = decode(side, names)
                if rep:
                    times["prefill"][side].append(p)
                    times["decode"][side].append(d)

    def summary(phase: str, tokens: int) -> dict[str, Any]:
        med = {s: statistics.median(v) for s, v in times[phase].items()}
        tps = {s: tokens / t for s, t in med.items()}
        return {
            "tokens_per_s": tps,
            "ratio": {
                "single_vs_base": tps["single"] / tps["base"],
                "merged_vs_base": tps["merged"] / tps["base"],
                "mixed16_vs_single": tps["mixed16"] / tps["single"],
                "mixed64_vs_single": tps["mixed64"] / tps["single"],
                "zipf1000_vs_single": tps["zipf1000"] / tps["single"],
                "compressed1000_vs_single": tps["compressed1000"] / tps["single"],
                "lorakit_vs_peft_16": tps["mixed16"] / tps["peft16"],
                "lorakit_vs_peft_64": tps["mixed64"] / tps["peft64"],
            },
            "median_s": med,
        }

    per_adapter = sum(r * (i + o) * 4 for i, o in engine.bank.dims.values())
    shared = sum((U.numel() + V.numel()) * 4 for U, V, _ in coll.modules.values())
    core = sum(c[0].numel() * 4 for _, _, c in coll.modules.values())
    zipf_distinct = statistics.median(distinct)
    result = {
        "workload": "serve_multi",
        "head": "contiguous input on every side",
        "shape": "smollm2-shape" if L == 30 else f"smollm2-shape-{L}L",
        "rank": r,
        "batch": B,
        "seq": T,
        "context": C,
        "registered": args.registered,
        "slots": args.slots,
        "shared_rank": args.shared_rank,
        "zipf_alpha": args.alpha,
        "zipf_distinct_per_batch_median": zipf_distinct,
        "prefill": summary("prefill", B * T),
        "decode": summary("decode", B),
        "adapter_bytes_read_per_step": {
            "single": per_adapter,
            "mixed16": 16 * per_adapter,
            "mixed64": 64 * per_adapter,
            "zipf1000": zipf_distinct * per_adapter,
            "compressed1000": shared + zipf_distinct * core,
        },
        "slot_loads_per_prefill": {s: statistics.median(v) for s, v in loads.items() if not s.startswith("peft")},
        "slot_loads": engine.cache.stats.loads,
        "slot_evictions": engine.cache.stats.evictions,
        "register_s": register_s,
        "compress_s": compress_s,
        "compressed_relative_error": compress_error,  # random adapters share no structure: a worst case
        "max_abs_diff_vs_peft": diff,
        "peer": f"peft {peft.__version__}",
        "reps": args.reps,
        "threads": args.threads,
        "torch": torch.__version__,
        "loadavg_1min": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
    }
    emit(result, args.json_out)


def _empty_cache() -> Any:
    from transformers import DynamicCache

    return DynamicCache()


if __name__ == "__main__":
    main()
