"""The demo's serving step: the adapters it made plus 100 synthetic ones, one mixed batch, one engine."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from rich.table import Table

from lorakit.cli._common import err, out

SYNTHETIC, BATCH, NEW_TOKENS = 100, 24, 12


def _synthetic(dims: dict[str, tuple[int, int]], seed: int, r: int = 8) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """A random rank-r adapter with a small effect (‖ΔW‖ ≈ 1% of a typical weight)."""
    g = torch.Generator().manual_seed(seed)
    return {
        m: (torch.randn(r, d_in, generator=g) / d_in**0.5, torch.randn(d_out, r, generator=g) * (0.01 / r**0.5))
        for m, (d_in, d_out) in dims.items()
    }


def _timed_generate(
    engine: Any, prompts: list[list[int]], names: list[str | None], new_tokens: int = NEW_TOKENS
) -> tuple[list[Any], float]:
    t0 = time.perf_counter()
    outs = engine.generate(prompts, names, max_new_tokens=new_tokens)
    seconds = time.perf_counter() - t0
    return outs, sum(len(o.token_ids) for o in outs) / seconds


def serve_step(base: str, adapters: dict[str, Path], held: list[Any], prompt_ids: Any, expected: list[str]) -> dict:
    """Serve ``adapters`` + 100 synthetic ones; answer a mixed batch; compare throughput with one adapter."""
    import lorakit as lk
    from lorakit.serve.engine import Engine
    from lorakit.train.evaluate import normalise

    with err.status(f"loading {base} for the engine"):
        model, tok = lk.load_base(base)
    engine = Engine(model, tok, max_slots=32, max_batch=BATCH)
    for name, path in adapters.items():
        engine.add_adapter(name, path)
    for i in range(SYNTHETIC):
        engine.add_factors(f"synthetic-{i:03d}", _synthetic(engine.bank.dims, seed=i))
    trained = next(iter(adapters))
    cycle: list[str | None] = [trained, None, *list(adapters)[1:], "synthetic-007", "synthetic-042"]
    names = [cycle[i % len(cycle)] for i in range(BATCH)]
    names[: len(expected)] = [trained] * len(expected)
    prompts = [prompt_ids(held[i % len(held)].prompt) for i in range(BATCH)]
    # as many new tokens as exact_match gave the trained model (its first batch of 16), so answers compare
    longest = max(len(tok(ex.answer, add_special_tokens=False)["input_ids"]) for ex in held[:16]) + 4
    outs, mixed_tps = _timed_generate(engine, prompts, names, longest)
    table = Table(title=f"one batch, {len(set(names))} adapters (+{SYNTHETIC} synthetic registered)")
    for col in ("#", "adapter", "question", "answer"):
        table.add_column(col, overflow="fold")
    for i, (who, o) in enumerate(zip(names, outs, strict=True)):
        if i < 10 or who != trained:
            table.add_row(str(i), who or "(base)", held[i % len(held)].prompt[:48], normalise(o.text)[:40])
    out.print(table)
    same = [normalise(o.text) for o in outs[: len(expected)]] == expected
    distinct = [f"synthetic-{i:03d}" for i in range(BATCH)]
    _, distinct_tps = _timed_generate(engine, prompts, distinct)  # type: ignore[arg-type]
    _, single_tps = _timed_generate(engine, prompts, [trained] * BATCH)
    out.print(
        f"{BATCH} requests: one adapter {single_tps:.1f} tokens/s, {BATCH} distinct adapters "
        f"{distinct_tps:.1f} tokens/s ({distinct_tps / single_tps:.2f}x)"
    )
    return {
        "serve_adapters": len(engine.adapters()),
        "serve_batch_adapters": len(set(names)),
        "serve_matches_trained": same,
        "serve_single_tps": single_tps,
        "serve_mixed_tps": mixed_tps,
        "serve_distinct_tps": distinct_tps,
        "serve_slot_loads": engine.cache.stats.loads,
        "serve_slot_evictions": engine.cache.stats.evictions,
    }
