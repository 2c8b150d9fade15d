"""The later stages of `lorakit demo`: a short QLoRA, extraction from a full fine-tune, merging and analysis."""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorakit.cli._common import out

EXTRACT_ENERGY = 0.9  # PHLoRA energy kept per module
FT_LAYERS, FT_STEPS, FT_LR = 2, 20, 1e-4  # full fine-tune of the top transformer blocks
QLORA_KIND, QLORA_STEPS, QLORA_LR = "nf4", 3, 3e-3  # a short QLoRA: about 45 s on 2 CPU cores, scoring included


def _blocks(model: nn.Module) -> nn.ModuleList:
    """The model's list of transformer blocks (Llama: model.layers, GPT-2: transformer.h)."""
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > 1:
            return module
    raise ValueError(f"{type(model).__name__} has no list of transformer blocks")


@torch.no_grad()
def _logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    mask = batch["attention_mask"]
    return model(input_ids=batch["input_ids"], attention_mask=mask).logits * mask[..., None]  # (N, T, V)


def qlora_step(base: str, task: str, records: list[Any], held: list[Any], chat: bool, out_dir: Path, pad: int) -> dict:
    """The demo's LoRA (same task, data and rank) on the base quantized to NF4 as `--quantize nf4` loads it
    (QLoRA), trained for QLORA_STEPS steps, scored on the same held-out questions and saved to adapters/TASK-qlora."""
    import lorakit as lk
    from lorakit.quant import quantized_kinds
    from lorakit.train import TrainConfig, exact_match, train

    if importlib.util.find_spec("bitsandbytes") is None:
        out.print("skipped: QLoRA needs bitsandbytes (pip install 'lorakit\\[quant]')")
        return {"qlora_skipped": "bitsandbytes is not installed"}
    s: dict[str, Any] = {"qlora_kind": QLORA_KIND, "qlora_steps": QLORA_STEPS}
    t0 = time.perf_counter()
    model, tok = lk.load_base(base, quantize=QLORA_KIND)
    lk.attach(model, lk.method_config("lora", r=8, alpha=16), targets="all-linear")
    s["qlora_on_quantized"] = quantized_kinds(model) == {"bnb4bit"}
    cfg = TrainConfig(steps=QLORA_STEPS, batch_size=8, lr=QLORA_LR, warmup=1, seed=0)
    result = train(model, records, cfg, out_dir=out_dir / "qlora-train", pad_id=pad)
    s["qlora_train_s"], s["qlora_losses"] = result.seconds, result.losses
    s["qlora_loss_before"], s["qlora_loss_after"] = result.losses[0], result.losses[-1]
    s["qlora_accuracy"] = exact_match(model, tok, held, chat=chat, progress=True).accuracy
    s["qlora_dir"] = str(lk.save_adapter(model, out_dir / "adapters" / f"{task}-qlora"))
    s["qlora_s"] = time.perf_counter() - t0
    out.print(
        f"QLoRA ({QLORA_KIND} base): loss {s['qlora_loss_before']:.3f} -> {s['qlora_loss_after']:.3f} in "
        f"{QLORA_STEPS} steps ({result.seconds:.0f} s); held-out exact match {s['qlora_accuracy']:.0%}; "
        f"{s['qlora_s']:.0f} s in all; saved to {s['qlora_dir']}"
    )
    return s


def extract_step(base: str, records: list[Any], batch: dict[str, torch.Tensor], out_dir: Path, pad: int) -> dict:
    """Fully fine-tune the top blocks' Linear weights, extract a LoRA at EXTRACT_ENERGY, compare outputs."""
    import lorakit as lk
    from lorakit.extract import extract
    from lorakit.train import TrainConfig, train

    s: dict[str, Any] = {}
    tuned: Any
    tuned, tok = lk.load_base(base)
    for p in tuned.parameters():
        p.requires_grad_(False)
    for block in list(_blocks(tuned))[-FT_LAYERS:]:  # every Linear weight of the top blocks (norms stay, so the
        for module in block.modules():  # extracted adapter is pure LoRA and merges with the trained one)
            if isinstance(module, nn.Linear):
                module.requires_grad_(True)
    s["ft_params"] = sum(p.numel() for p in tuned.parameters() if p.requires_grad)
    cfg = TrainConfig(steps=FT_STEPS, batch_size=8, lr=FT_LR, warmup=2, seed=0)
    result = train(tuned, records, cfg, out_dir=out_dir / "finetune-train", pad_id=pad, full=True)
    s["ft_loss_before"], s["ft_loss_after"], s["ft_s"] = result.losses[0], result.losses[-1], result.seconds
    tuned.eval()
    tuned_dir = out_dir / "finetune"
    tuned.save_pretrained(tuned_dir)
    tok.save_pretrained(tuned_dir)
    out.print(f"fine-tuned the top {FT_LAYERS} blocks ({s['ft_params']:,} parameters) in {result.seconds:.0f} s")
    t0 = time.perf_counter()
    x = extract(base, tuned_dir, out_dir / "adapters" / "extracted", energy=EXTRACT_ENERGY, overwrite=True)
    s["extract_s"] = time.perf_counter() - t0
    summary = x.to_json()["summary"]
    ranks = [m["rank"] for m in x.modules.values()]
    s["extract_modules"], s["extract_params"] = summary["lora_modules"], summary["lora_params"]
    s["extract_rank_range"] = (min(ranks), max(ranks)) if ranks else (0, 0)
    s["extract_mean_energy"], s["extract_dir"] = summary["mean_energy"], str(x.path)
    fresh, _ = lk.load_base(base)
    want = _logits(tuned, batch)
    with torch.no_grad():
        s["ft_effect_rel"] = float((_logits(fresh, batch) - want).norm() / want.norm())
    lk.load_adapter(fresh, x.path)
    s["extract_logits_rel"] = float((_logits(fresh, batch) - want).norm() / want.norm())
    out.print(
        f"extracted {s['extract_modules']} modules at energy ≥ {EXTRACT_ENERGY} (ranks {s['extract_rank_range'][0]}-"
        f"{s['extract_rank_range'][1]}) in {s['extract_s']:.1f} s; logits vs the fine-tune: relative error "
        f"{s['extract_logits_rel']:.4f} (the fine-tune itself moved them by {s['ft_effect_rel']:.4f})"
    )
    return s


def compose_step(base: str, lora_dir: Path, extracted_dir: Path, out_dir: Path) -> dict:
    """Merge the trained LoRA with the extracted one (exact linear sum), then analyse the trained LoRA."""
    import lorakit as lk

    s: dict[str, Any] = {}
    t0 = time.perf_counter()
    merged = lk.merge_adapters(
        [lora_dir, extracted_dir], method="linear", out=out_dir / "adapters" / "merged", missing="zero"
    )
    s["merge_s"], s["merged_dir"] = time.perf_counter() - t0, str(merged)
    s["merged_modules"] = len(json.loads((Path(merged) / "adapter_config.json").read_text()).get("rank_pattern") or {})
    out.print(f"merged {lora_dir.name} + {extracted_dir.name} (linear, exact) into {merged} in {s['merge_s']:.1f} s")
    t0 = time.perf_counter()
    report = lk.analyze(lora_dir, base=base)
    plots = out_dir / "plots" / "analysis"
    report.save(plots)
    s["analyze_s"], s["analysis_dir"] = time.perf_counter() - t0, str(plots)
    ranks = [m.spectrum.effective_rank for m in report.modules]
    s["effective_rank_mean"] = sum(ranks) / len(ranks)
    s["intruders"] = report.intruder_total()
    out.print(
        f"analysed {len(report.modules)} modules in {s['analyze_s']:.1f} s: mean effective rank "
        f"{s['effective_rank_mean']:.2f}, intruder dimensions {s['intruders']}; plots in {plots}"
    )
    return s
