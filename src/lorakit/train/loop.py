"""The one training loop, for every method, on ``accelerate``.

``accelerate launch`` runs this same loop on many GPUs or nodes. The batch order is a pure
function of (seed, step), and a checkpoint holds only what changes (adapter weights, optimiser,
scheduler, RNG), so a resumed run reproduces the uninterrupted one exactly. The optimizer comes from
the ``optimizers/`` registry; the ``callbacks/`` registry's hooks run at fixed points of every step.
"""

from __future__ import annotations

import io
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from lorakit.errors import ConfigError
from lorakit.inject import adapter_names
from lorakit.io.atomic import atomic_write_bytes
from lorakit.methods._api import AdapterModule
from lorakit.registry import unknown_entry
from lorakit.train.callbacks import Callback, TrainState, build_callbacks, check_callbacks
from lorakit.train.data import Record, collate
from lorakit.train.loss import regularization, training_loss
from lorakit.train.optimizers import OPTIMIZERS, active_adapters, build_optimizer
from lorakit.train.schedule import SCHEDULES, build_scheduler

ALWAYS_ON = ("adapter_steps",)  # callbacks every run has, before the configured ones


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    steps: int = 100
    """Optimiser steps."""
    batch_size: int = 8
    """Sequences per micro-batch."""
    grad_accum: int = 1
    """Micro-batches per optimiser step."""
    lr: float = 2e-4
    """Peak learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    schedule: str = "cosine"
    """'cosine', 'linear' or 'constant', after a linear warm-up."""
    warmup: int = 0
    """Warm-up steps."""
    optimizer: str = "adamw"
    """A registered optimizer (``lorakit info`` lists them): 'adamw', 'loraplus' (LoRA+), 'lorafa' (LoRA-FA), ..."""
    loraplus_ratio: float = 16.0
    """LoRA+ ratio λ = lr_B / lr_A."""
    max_grad_norm: float | None = 1.0
    """Gradient clipping (None: off)."""
    mixed_precision: str = "no"
    """'no', 'bf16' or 'fp16' (where the device supports it)."""
    grad_checkpointing: bool = False
    """Recompute activations in backward to save memory."""
    seed: int = 0
    """Seed for data order, dropout and initialisation."""
    log_every: int = 1
    """Write a metrics line every N steps."""
    save_every: int = 0
    """Checkpoint every N steps (0: only at the end)."""
    callbacks: tuple[str, ...] = ()
    """Registered training callbacks to run, in order (``adapter_steps`` always runs first)."""

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "log_every"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)!r}.")
        if not self.lr > 0:
            raise ConfigError(f"lr must be > 0, got {self.lr!r}.")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule must be 'cosine', 'linear' or 'constant', got {self.schedule!r}.")
        if self.optimizer not in OPTIMIZERS:
            raise unknown_entry(OPTIMIZERS, "optimizer", self.optimizer)
        names = (self.callbacks,) if isinstance(self.callbacks, str) else tuple(self.callbacks or ())
        object.__setattr__(self, "callbacks", names)  # a YAML list or a single name -> a tuple
        check_callbacks(self.callbacks)
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise ConfigError(f"mixed_precision must be 'no', 'bf16' or 'fp16', got {self.mixed_precision!r}.")
        if self.warmup < 0 or self.save_every < 0:
            raise ConfigError("warmup and save_every must be >= 0.")


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)
    tokens: int = 0
    seconds: float = 0.0
    resumed_from: int = 0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def batch_indices(n: int, batch_size: int, micro_step: int, seed: int) -> list[int]:
    """Record indices of micro-batch ``micro_step``: a fresh permutation of all n records per epoch."""
    per_epoch = max(1, math.ceil(n / batch_size))
    epoch, k = divmod(micro_step, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    return perm[k * batch_size : (k + 1) * batch_size].tolist()


def _trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _adapter_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """Persistent adapter buffers that change in training (e.g. SingLoRA's step counter)."""
    persistent = {n for n, _ in model.state_dict(keep_vars=True).items()}
    return {n: b for n, b in model.named_buffers() if ".adapters." in n and n in persistent}


def _save_checkpoint(path: Path, model: nn.Module, opt: Any, sched: Any, step: int, losses: list[float]) -> None:
    state = {
        "step": step,
        "losses": losses,
        "trainable": {n: p.detach().cpu() for n, p in _trainable(model).items()},
        "buffers": {n: b.detach().cpu().clone() for n, b in _adapter_buffers(model).items()},
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "rng": torch.get_rng_state(),
    }
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())


def _load_checkpoint(path: Path, model: nn.Module, opt: Any, sched: Any) -> tuple[int, list[float]]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
        params = _trainable(model)
        if set(state["trainable"]) != set(params):
            raise ConfigError(f"checkpoint {path} belongs to a different adapter set-up; delete it or change --out.")
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(state["trainable"][n])
            buffers = _adapter_buffers(model)
            for n, b in state.get("buffers", {}).items():
                if n in buffers:
                    buffers[n].copy_(b)
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        return int(state["step"]), list(state["losses"])
    except (OSError, RuntimeError, KeyError, EOFError) as e:
        raise ConfigError(f"cannot resume from {path}: {e}; delete it to start over.") from e


def _regularized(model: nn.Module) -> list[AdapterModule]:
    """The active adapters whose method defines a ``regularizer`` term (AdaLoRA's orthogonality penalty)."""
    return [a for a, _ in active_adapters(model) if type(a).regularizer is not AdapterModule.regularizer]


def _accumulate(
    model: nn.Module,
    acc: Any,
    records: Sequence[Record],
    cfg: TrainConfig,
    step: int,
    pad_id: int,
    regularized: Sequence[AdapterModule] = (),
) -> tuple[float, int]:
    """Forward + backward over the step's micro-batches, the adapters' regularizer added to each loss (the
    mean over ``regularized``); returns (loss, tokens)."""
    step_loss, step_tokens = 0.0, 0
    for j in range(cfg.grad_accum):
        idx = batch_indices(len(records), cfg.batch_size, step * cfg.grad_accum + j, cfg.seed)
        batch = {k: v.to(acc.device) for k, v in collate([records[i] for i in idx], pad_id).items()}
        with acc.autocast():
            loss = training_loss(model, batch)  # model(**batch).loss, head fused
            if regularized:
                loss = loss + regularization(regularized)
            loss = loss / cfg.grad_accum
        acc.backward(loss)
        step_loss += float(loss.detach())
        step_tokens += int(batch["attention_mask"].sum())
    return step_loss, step_tokens


def _optimizer_step(model: nn.Module, acc: Any, cfg: TrainConfig, state: TrainState, callbacks: Callback) -> None:
    """Clip the gradients, step the optimizer and the schedule, run ``after_optimizer_step``, clear the gradients."""
    if cfg.max_grad_norm:
        acc.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg.max_grad_norm)
    state.optimizer.step()
    state.scheduler.step()
    state.step += 1
    callbacks.after_optimizer_step(state)
    state.optimizer.zero_grad(set_to_none=True)


def train(
    model: nn.Module,
    records: Sequence[Record],
    cfg: TrainConfig,
    *,
    out_dir: str | Path,
    pad_id: int,
    resume: bool = False,
    on_step: Callable[[int, float], None] | None = None,
    progress: bool = True,
    full: bool = False,
) -> TrainResult:
    """Train the model's trainable (adapter) parameters on ``records``; logs go to ``out_dir``.

    ``full=True`` trains whatever requires grad without an adapter (a full or partial fine-tune,
    e.g. to make a checkpoint to extract from); otherwise an attached adapter is required.
    ``ALWAYS_ON`` and then ``cfg.callbacks`` run at their points of every step (callbacks/_api.py).
    """
    from accelerate import Accelerator

    if not records:
        raise ConfigError("no training records.")
    if not _trainable(model) or not (full or adapter_names(model)):
        raise ConfigError("the model has no trainable adapter; attach an adapter first (lk.attach).")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    acc = Accelerator(mixed_precision=cfg.mixed_precision, cpu=not torch.cuda.is_available())
    if cfg.grad_checkpointing and hasattr(model, "gradient_checkpointing_enable"):
        enable: Any = model.gradient_checkpointing_enable
        enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg)
    model, opt = acc.prepare(model, opt)
    ckpt = out_dir / "checkpoint.pt"
    start, losses = _load_checkpoint(ckpt, model, opt, sched) if resume and ckpt.exists() else (0, [])
    result = TrainResult(losses=losses, resumed_from=start)
    callbacks = build_callbacks((*ALWAYS_ON, *cfg.callbacks))
    state = TrainState(model=acc.unwrap_model(model), optimizer=opt, scheduler=sched, config=cfg, step=start)
    regularizes = bool(_regularized(state.model))  # else no step walks the modules for a term
    metrics = (out_dir / "metrics.jsonl").open("a" if start else "w")
    model.train()
    bar = tqdm(total=cfg.steps, initial=start, desc="train", disable=not progress or not acc.is_local_main_process)
    t0 = time.perf_counter()
    for step in range(start, cfg.steps):
        state.step, state.metrics = step, {}
        callbacks.on_step_begin(state)
        regularized = _regularized(state.model) if regularizes else []  # after callbacks that may swap adapters
        step_loss, step_tokens = _accumulate(model, acc, records, cfg, step, pad_id, regularized)
        lr = state.scheduler.get_last_lr()[0]  # the rate this step used
        state.metrics = {"loss": step_loss, "lr": float(lr), "tokens": step_tokens}
        callbacks.after_backward(state)
        _optimizer_step(model, acc, cfg, state, callbacks)
        result.losses.append(step_loss)
        result.tokens += step_tokens
        elapsed = time.perf_counter() - t0
        state.step, state.metrics["tokens_per_s"] = step + 1, result.tokens / elapsed
        callbacks.on_step_end(state)
        bar.set_postfix(loss=f"{step_loss:.4f}", tok_s=f"{result.tokens / elapsed:.0f}")
        bar.update(1)
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            line = {"step": step + 1, "loss": step_loss, "lr": lr, "tokens_per_s": result.tokens / elapsed}
            metrics.write(json.dumps(line) + "\n")
            metrics.flush()
        if on_step is not None:
            on_step(step + 1, step_loss)
        if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < cfg.steps:
            _save_checkpoint(ckpt, state.model, state.optimizer, state.scheduler, step + 1, result.losses)
            callbacks.on_save(state, ckpt)
    bar.close()
    metrics.close()
    callbacks.on_end(state)
    result.seconds = time.perf_counter() - t0
    model.eval()
    if ckpt.exists():
        os.unlink(ckpt)  # finished: the adapter is the result, the checkpoint is no longer needed
    return result
