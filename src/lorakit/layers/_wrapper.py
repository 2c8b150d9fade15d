"""The wrapper a targeted layer becomes: the base layer plus named adapters (one active, or none).

It lives here, below the methods and inits, so that initialisations can reach a wrapped layer's
base and switch adapters off for calibration passes without importing Core (``lorakit.inject``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from lorakit.methods._api import AdapterModule


class _Wrapper(nn.Module):
    """Stands in for ``base_layer``: attributes it lacks (weight, bias, in_features, ...) are the base's."""

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer":
                raise
            return getattr(self.base_layer, name)


class AdaptedLayer(_Wrapper):
    """A base layer plus named adapters: forward = active adapter applied to the base output."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base_layer = base
        self.adapters = nn.ModuleDict()
        self.active: str | None = None

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        base, adapters, active = self.base_layer, self.adapters, self.active  # one lookup each: runs per layer per step
        if active is None or active not in adapters:
            return base(x, *args, **kwargs)
        adapter: AdapterModule = adapters[active]  # type: ignore[assignment]
        if torch.is_grad_enabled() and not args and not kwargs:  # training: base + adapter in one autograd node?
            out = adapter.fused_forward(x, base)
            if out is not None:
                return out
        return adapter(x, base, base(x, *args, **kwargs))


class SavedModule(_Wrapper):
    """A module replaced whole per adapter (PEFT's ``modules_to_save``): forward runs the active copy."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base_layer = base
        self.copies = nn.ModuleDict()
        self.active: str | None = None

    def current(self) -> nn.Module:
        """The active adapter's copy, or the original when that adapter saved none (or none is active)."""
        if self.active is not None and self.active in self.copies:
            return self.copies[self.active]
        return self.base_layer

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.current()(*args, **kwargs)


WRAPPERS = (AdaptedLayer, SavedModule)


def holders(model: nn.Module) -> list[AdaptedLayer | SavedModule]:
    """Every wrapper of the model: adapted layers and saved-module holders."""
    return [m for m in model.modules() if isinstance(m, (AdaptedLayer, SavedModule))]


@contextlib.contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model alone inside the block; the previous active adapter comes back after."""
    saved = [(w, w.active) for w in holders(model)]
    for w, _ in saved:
        w.active = None
    try:
        yield model
    finally:
        for w, active in saved:
            w.active = active
