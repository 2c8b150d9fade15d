"""Calibration data for initialisations that read data (LoRA-GA, EVA, ...): validate batches, then
compute what an init needs from the BASE model (every adapter disabled, eval mode):

- :func:`full_gradients`: G_W = (1/n) Σ_batches ∇_W L_batch for each targeted base weight W, (out, in);
- :func:`input_activations`: the rows x (d_in,) each targeted base layer saw, padding dropped.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from lorakit import layers as L
from lorakit.errors import ConfigError, TargetError
from lorakit.layers._wrapper import AdaptedLayer, disabled

IGNORE = -100  # label value the causal-LM loss skips


def as_batches(
    calibration: Iterable[Mapping[str, Any]] | None, *, need_labels: bool, min_rows: int = 1, where: str
) -> list[dict[str, torch.Tensor]]:
    """Materialise and validate calibration batches (dicts of tensors with ``input_ids`` (B, T)).

    ``where`` names the user of the data in messages (e.g. ``"lora_ga"``). Errors (ConfigError): no
    batches; a batch that is not a dict, lacks ``input_ids`` (or ``labels`` when ``need_labels``),
    holds a non-tensor value or a mask/labels shape other than ``input_ids``'s; fewer than
    ``min_rows`` token rows (non-padding tokens) in all batches together.
    """
    fix = "pass calibration=[{'input_ids': (B, T) LongTensor, 'attention_mask': ..., 'labels': ...}, ...]"
    if calibration is None:
        raise ConfigError(f"{where} initialises from data but got no calibration batches; {fix}.")
    if isinstance(calibration, Mapping) or not isinstance(calibration, Iterable):
        raise ConfigError(
            f"{where}: calibration must be an iterable of batches (dicts), "
            f"not a single {type(calibration).__name__}; {fix}."
        )
    batches = [_check_batch(i, b, need_labels, where) for i, b in enumerate(calibration)]
    if not batches:
        raise ConfigError(f"{where}: the calibration data is empty; {fix}.")
    rows = sum(_rows(b) for b in batches)
    if rows < min_rows:
        raise ConfigError(
            f"{where}: the calibration batches hold {rows} token rows but at least {min_rows} are needed "
            "(e.g. at least the rank); pass more or longer batches (--init-batches N on the CLI)."
        )
    return batches


def _check_batch(i: int, batch: Any, need_labels: bool, where: str) -> dict[str, torch.Tensor]:
    if not isinstance(batch, Mapping):
        raise ConfigError(f"{where}: calibration batch {i} is a {type(batch).__name__}, expected a dict of tensors.")
    required = ("input_ids", "labels") if need_labels else ("input_ids",)
    for key in required:
        if key not in batch:
            raise ConfigError(
                f"{where}: calibration batch {i} has no {key!r} (keys: {', '.join(map(str, batch)) or 'none'}); "
                f"{where} needs {' and '.join(required)}."
            )
    for key, value in batch.items():
        if not isinstance(value, torch.Tensor):
            raise ConfigError(
                f"{where}: calibration batch {i}[{key!r}] is a {type(value).__name__}, expected a tensor."
            )
    ids = batch["input_ids"]
    if ids.ndim != 2 or ids.is_floating_point():
        raise ConfigError(
            f"{where}: calibration batch {i}['input_ids'] must be integer (B, T), got {tuple(ids.shape)} {ids.dtype}."
        )
    mask = batch.get("attention_mask")
    if mask is not None and mask.shape != ids.shape:
        raise ConfigError(
            f"{where}: calibration batch {i}['attention_mask'] has shape {tuple(mask.shape)}, "
            f"expected {tuple(ids.shape)} (as input_ids)."
        )
    return dict(batch)


def _rows(batch: Mapping[str, torch.Tensor]) -> int:
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else int(batch["input_ids"].numel())


def _keep(batch: Mapping[str, torch.Tensor], label_mask: bool) -> torch.Tensor | None:
    """(B, T) bool of the token positions to use, or None for all."""
    keep = batch["attention_mask"].bool() if "attention_mask" in batch else None
    labels = batch.get("labels")
    if label_mask and labels is not None and labels.shape == batch["input_ids"].shape:
        keep = labels != IGNORE if keep is None else keep & (labels != IGNORE)
    return keep


def base_layer(model: nn.Module, name: str) -> nn.Module:
    """The base layer of logical module ``name`` (wrapped or not)."""
    module = model.get_submodule(name)
    return module.base_layer if isinstance(module, AdaptedLayer) else module


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@contextlib.contextmanager
def _base_eval(model: nn.Module) -> Iterator[nn.Module]:
    """Adapters disabled and eval mode (no dropout) inside the block; both restored after."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with disabled(model):
            yield model
    finally:
        for m, mode in modes:
            m.training = mode


def full_gradients(
    model: nn.Module, modules: list[str], batches: list[dict[str, torch.Tensor]]
) -> dict[str, torch.Tensor]:
    """G = (1/n) Σ_k ∇_W mean-loss(batch k) for each listed module's base weight W, as (out, in) float32.

    The loss is the model's own (``model(**batch).loss``: causal-LM cross-entropy, labels = -100
    ignored). Adapters are disabled and dropout is off; ``requires_grad`` is restored and no
    ``.grad`` is left behind (gradients come from ``torch.autograd.grad``). A quantized base (whose codes
    cannot require grad) gets a zero probe Z (out, in) added as y + Z·x, so ∇_Z = ∇_W = Σ gᵀx.
    """
    bases = {m: base_layer(model, m) for m in modules}
    device = _device(model)
    probes = {
        m: torch.zeros(L.weight_out_in(b).shape, device=device, requires_grad=True)
        for m, b in bases.items()
        if L.is_quantized(b)
    }
    weights: list[torch.Tensor] = [probes.get(m, b.weight) for m, b in bases.items()]  # type: ignore[arg-type]
    flags = [w.requires_grad for w in weights]
    grads = {m: torch.zeros(L.weight_out_in(b).shape, dtype=torch.float32, device=device) for m, b in bases.items()}
    hooks = [bases[m].register_forward_hook(_probe(z)) for m, z in probes.items()]
    try:
        with _base_eval(model), torch.enable_grad():
            for w in weights:
                w.requires_grad_(True)
            for k, batch in enumerate(batches):
                loss = model(**{key: t.to(device) for key, t in batch.items()}).loss
                if loss is None:
                    raise ConfigError(f"calibration batch {k}: the model returned no loss; the batch needs 'labels'.")
                parts = torch.autograd.grad(loss, weights, allow_unused=True)
                for (m, b), g in zip(bases.items(), parts, strict=True):
                    if g is not None:
                        grads[m] += (g.float() if m in probes else L.to_base_layout(b, g.float())) / len(batches)
    finally:
        for hook in hooks:
            hook.remove()
        for w, flag in zip(weights, flags, strict=True):
            w.requires_grad_(flag)
    return grads


def _probe(Z: torch.Tensor) -> Callable[[nn.Module, tuple[Any, ...], torch.Tensor], torch.Tensor]:
    """A forward hook returning y + Z·x (Z = 0, so the value is unchanged and ∇_Z is the weight gradient)."""
    return lambda module, args, y: y + torch.nn.functional.linear(args[0].to(Z.dtype), Z).to(y.dtype)


def input_activations(
    model: nn.Module,
    modules: list[str],
    batches: list[dict[str, torch.Tensor]],
    *,
    max_rows: int | None = None,
    label_mask: bool = False,
) -> dict[str, torch.Tensor]:
    """The inputs x each listed module's base layer saw, as rows (n, d_in) float32 on the model's device.

    Positions with ``attention_mask == 0`` are dropped (with ``label_mask``, also those whose label is
    -100, as PEFT's EVA ``use_label_mask``); with ``max_rows`` only the first rows are kept (and the
    forward passes stop once every module has that many). Adapters are disabled, no grad.
    """
    bases = {m: base_layer(model, m) for m in modules}
    for m, b in bases.items():
        if L.layer_kind(b, m) == "embedding":
            raise TargetError(
                f"{m} is an embedding: its inputs are token ids, not activations; leave it out of targets."
            )
    rows: dict[str, list[torch.Tensor]] = {m: [] for m in modules}
    counts = dict.fromkeys(modules, 0)
    mask: list[torch.Tensor | None] = [None]
    device = _device(model)

    def hook_for(m: str) -> Any:
        def hook(_: nn.Module, args: tuple[Any, ...]) -> None:
            x, keep = args[0], mask[0]
            x = x[keep] if keep is not None and x.shape[:-1] == keep.shape else x.reshape(-1, x.shape[-1])  # (n, d_in)
            if max_rows is not None:
                x = x[: max(0, max_rows - counts[m])]
            counts[m] += x.shape[0]
            rows[m].append(x.detach().float())

        return hook

    handles = [b.register_forward_pre_hook(hook_for(m)) for m, b in bases.items()]
    try:
        with _base_eval(model), torch.no_grad():
            for batch in batches:
                batch = {key: t.to(device) for key, t in batch.items()}
                mask[0] = _keep(batch, label_mask)
                model(**{k: v for k, v in batch.items() if k != "labels"})
                if max_rows is not None and all(c >= max_rows for c in counts.values()):
                    break
    finally:
        for h in handles:
            h.remove()
    return {m: torch.cat(parts) for m, parts in rows.items()}


class Moments:
    """Running first and second moments of rows x (d,), in float64: count, mean and scatter Σ(x−μ)(x−μ)ᵀ.

    Accumulated relative to the first batch's mean (a shift m₀) so large means do not cancel precision.
    """

    def __init__(self) -> None:
        self.n = 0
        self.shift: torch.Tensor | None = None  # (d,) m₀
        self.total: torch.Tensor | None = None  # (d,) Σ(x − m₀)
        self.gram: torch.Tensor | None = None  # (d, d) Σ(x − m₀)(x − m₀)ᵀ

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().double()  # (n, d)
        if self.shift is None:
            self.shift = x.mean(0) if x.shape[0] else torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
            self.total = torch.zeros_like(self.shift)
            self.gram = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64, device=x.device)
        assert self.total is not None and self.gram is not None
        c = x - self.shift  # (n, d)
        self.n += x.shape[0]
        self.total += c.sum(0)
        self.gram += c.T @ c

    @property
    def mean(self) -> torch.Tensor:
        assert self.shift is not None and self.total is not None
        return self.shift + self.total / max(self.n, 1)

    @property
    def scatter(self) -> torch.Tensor:
        """Σ(x − μ)(x − μ)ᵀ, (d, d) float64."""
        assert self.total is not None and self.gram is not None
        return self.gram - torch.outer(self.total, self.total) / max(self.n, 1)


def input_moments(
    model: nn.Module, modules: list[str], batches: list[dict[str, torch.Tensor]], *, label_mask: bool = False
) -> dict[str, Moments]:
    """Streaming :class:`Moments` of the inputs each listed module's base layer saw (rows as in
    :func:`input_activations`), with memory d_in² per input whatever the amount of data. Modules fed the
    very same tensor (q/k/v, gate/up) share one Moments object, so ``is`` tells which inputs are equal.
    """
    bases = {m: base_layer(model, m) for m in modules}
    for m, b in bases.items():
        if L.layer_kind(b, m) == "embedding":
            raise TargetError(
                f"{m} is an embedding: its inputs are token ids, not activations; leave it out of targets."
            )
    owner: dict[str, Moments] = {}
    seen: dict[int, tuple[torch.Tensor, Moments]] = {}  # this batch: id(input) -> (input kept alive, its moments)
    mask: list[torch.Tensor | None] = [None]

    def hook_for(m: str) -> Any:
        def hook(_: nn.Module, args: tuple[Any, ...]) -> None:
            x, keep = args[0], mask[0]
            hit = seen.get(id(x))
            if hit is not None and hit[0] is x and owner.setdefault(m, hit[1]) is hit[1]:
                return  # the very tensor another module of this batch saw: its moments are counted there
            stats = owner.setdefault(m, Moments())
            seen[id(x)] = (x, stats)
            stats.add(x[keep] if keep is not None and x.shape[:-1] == keep.shape else x.reshape(-1, x.shape[-1]))

        return hook

    handles = [b.register_forward_pre_hook(hook_for(m)) for m, b in bases.items()]
    device = _device(model)
    try:
        with _base_eval(model), torch.no_grad():
            for batch in batches:
                batch = {key: t.to(device) for key, t in batch.items()}
                mask[0] = _keep(batch, label_mask)
                model(**{k: v for k, v in batch.items() if k != "labels"})
                seen.clear()
    finally:
        for h in handles:
            h.remove()
    return owner
