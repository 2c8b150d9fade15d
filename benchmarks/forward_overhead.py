"""Unmerged LoRA forward overhead: base model vs lorakit vs PEFT, one process, interleaved.

Workload `smollm2-shape` (random weights), prefill forward of B×T tokens under inference_mode,
one LoRA adapter (r=16, alpha=32, all-linear, dropout 0) left unmerged on both adapter sides.
lorakit's randomized adapter is copied into PEFT's lora_A/lora_B, and the logits of the two are
checked to agree before any timing. Prints one JSON object (see benchmarks/README.md).

    .venv/bin/python benchmarks/forward_overhead.py [--layers 30] [--reps 7] [--threads 2] [--json-out PATH]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import peft
import torch

import lorakit as lk
from _common import emit
from lorakit.inject import wrappers
from lorakit.models.heads import contiguous_head
from lorakit.testing import randomize_adapters, smollm2_shape

R, ALPHA = 16, 32.0


def build_lorakit(layers: int, seed: int) -> torch.nn.Module:
    model = smollm2_shape(layers, seed)
    lk.attach(model, lk.method_config("lora", r=R, alpha=ALPHA), targets="all-linear")
    randomize_adapters(model, seed=seed)  # B != 0, so the adapter really changes the output
    return model.eval()


def build_peft(layers: int, seed: int, source: torch.nn.Module) -> torch.nn.Module:
    """PEFT's LoRA on an identical base, holding exactly lorakit's A and B."""
    cfg = peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules="all-linear", lora_dropout=0.0, init_lora_weights=False)
    model = peft.get_peft_model(smollm2_shape(layers, seed), cfg).eval()
    inner = model.base_model.model
    copied = 0
    with torch.no_grad():
        for name, wrapper in wrappers(source):
            adapter, target = wrapper.adapters["default"], inner.get_submodule(name)
            target.lora_A["default"].weight.copy_(adapter.A)
            target.lora_B["default"].weight.copy_(adapter.B)
            assert target.scaling["default"] == adapter.scale
            copied += 1
    n_peft = sum(1 for m in inner.modules() if isinstance(m, peft.tuners.lora.LoraLayer))
    assert copied == n_peft, f"lorakit wraps {copied} modules, PEFT {n_peft}"
    return model


def forward(model: torch.nn.Module, ids: torch.Tensor, keep: int) -> torch.Tensor:
    return model(input_ids=ids, logits_to_keep=keep).logits  # keep=0: logits at every position


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--layers", type=int, default=30, help="decoder layers (30 = SmolLM2-135M; 6 for quick runs)")
    ap.add_argument("--batch", type=int, default=16, help="requests per prefill batch (B)")
    ap.add_argument("--seq", type=int, default=64, help="tokens per request (T)")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    ap.add_argument("--reps", type=int, default=7, help="timed repetitions per side, after 1 warm-up each")
    ap.add_argument(
        "--logits",
        choices=("all", "last"),
        default="all",
        help="'all': the LM head runs on every position (default); 'last': only the last, as generate() does",
    )
    ap.add_argument("--seed", type=int, default=0, help="seed for base weights, adapters and inputs")
    ap.add_argument("--json-out", type=Path, default=None, help="also write the JSON object to this file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    keep = 0 if args.logits == "all" else 1
    load_before = os.getloadavg()

    # frozen like the adapter sides' bases: with trainable weights torch's matmul takes another path
    # for the strided (B, 1, d) input of --logits last (a fold to mm instead of bmm over an expanded weight)
    base = smollm2_shape(args.layers, args.seed).requires_grad_(False)
    lora = build_lorakit(args.layers, args.seed)
    peft_model = build_peft(args.layers, args.seed, lora)
    sides = {"base": base, "lorakit": lora, "peft": peft_model}
    for model in (base, lora, peft_model.get_base_model()):  # --logits last: a contiguous head input on every
        contiguous_head(model)  # side (transformers' strided last-position slice runs ~9x slower; models/heads.py)
    ids = torch.randint(
        0, base.config.vocab_size, (args.batch, args.seq), generator=torch.Generator().manual_seed(args.seed)
    )

    with torch.inference_mode():
        logits = {name: forward(model, ids, keep) for name, model in sides.items()}  # also the warm-up run
        max_diff = (logits["lorakit"] - logits["peft"]).abs().max().item()
        adapter_effect = (logits["lorakit"] - logits["base"]).abs().max().item()
        del logits
        if max_diff > 1e-4:
            raise SystemExit(f"lorakit and PEFT logits differ by {max_diff:.3g} > 1e-4; not timing.")
        if adapter_effect < 1e-3:
            raise SystemExit(f"the adapter barely changes the logits ({adapter_effect:.3g}); is B zero?")

        times: dict[str, list[float]] = {name: [] for name in sides}
        for _ in range(args.reps):  # interleaved: base lorakit peft base lorakit peft ...
            for name, model in sides.items():
                t0 = time.perf_counter()
                forward(model, ids, keep)
                times[name].append(time.perf_counter() - t0)

    tokens = args.batch * args.seq
    median = {name: statistics.median(ts) for name, ts in times.items()}
    tps = {name: tokens / m for name, m in median.items()}
    fastest = {name: min(ts) for name, ts in times.items()}

    def ratios(t: dict[str, float]) -> dict[str, float]:  # throughput ratios from times
        return {
            "lorakit_vs_base": t["base"] / t["lorakit"],
            "peft_vs_base": t["base"] / t["peft"],
            "lorakit_vs_peft": t["peft"] / t["lorakit"],
        }

    ratio = ratios(median)
    result = {
        "workload": "forward_overhead",
        "shape": "smollm2-shape" if args.layers == 30 else f"smollm2-shape-{args.layers}L",
        "batch": args.batch,
        "seq": args.seq,
        "logits": args.logits,
        "head": "contiguous input on every side",
        "threads": args.threads,
        "lorakit": {"tokens_per_s": tps["lorakit"], "median_s": median["lorakit"]},
        "peer": {"name": f"peft {peft.__version__}", "tokens_per_s": tps["peft"], "median_s": median["peft"]},
        "ratio": ratio,
        "ratio_of_min": ratios(fastest),  # least disturbed by other jobs on shared cores (noise only slows)
        "tokens_per_s": tps,
        "median_s": median,
        "min_s": fastest,
        "all_s": times,
        "reps": args.reps,
        "max_abs_diff_vs_peft": max_diff,
        "adapter_effect_max_abs": adapter_effect,
        "torch": torch.__version__,
        # 1-min load average before and after; above --threads means other jobs shared the cores
        "loadavg_1min": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
    }
    emit(result, args.json_out)


if __name__ == "__main__":
    main()
