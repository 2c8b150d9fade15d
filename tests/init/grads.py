"""Shared by the gradient-based init tests: calibration batches and an independent reference gradient."""

from __future__ import annotations

import torch

from tests.helpers import tokens


def calibration(rows: int = 16) -> list[dict[str, torch.Tensor]]:
    out = []
    for seed in (1, 2):
        x = tokens(2, rows, seed=seed)
        out.append({"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x})
    return out


def reference_gradients(make, names, batches) -> dict[str, torch.Tensor]:
    """G = mean over batches of ∇_W loss, (out, in), by plain autograd on a float64 copy of the base."""
    model = make().double()
    layers = [model.get_submodule(n) for n in names]
    for layer in layers:
        layer.weight.requires_grad_(True)
    G: dict[str, torch.Tensor] = {}
    for batch in batches:
        parts = torch.autograd.grad(model(**batch).loss, [layer.weight for layer in layers])
        for n, layer, g in zip(names, layers, parts, strict=True):
            g = g if isinstance(layer, torch.nn.Linear) else g.T  # Conv1D stores (in, out)
            G[n] = G.get(n, 0) + g / len(batches)
    return G
