"""What every subcommand shares: the consoles and the one way errors reach the user."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.text import Text

from lorakit.errors import LorakitError

F = TypeVar("F", bound=Callable[..., Any])
QUANTIZE_HELP = (
    "Quantize the base's Linear layers (not the output head) as it loads: nf4 or fp4 (4-bit) or int8, "
    "through bitsandbytes (pip install 'lorakit\\[quant]'), or int4g, int4g128, int3g, int2g (pure torch, integer "
    "codes per group of 32 or 128 inputs, as GPTQ). Adapters train and run on top of it (QLoRA)."
)  # (\\[ : a literal bracket in rich's help markup)

out = Console(highlight=False)  # results: stdout
err = Console(stderr=True, highlight=False)  # progress, status and errors: stderr


def friendly_errors(fn: F) -> F:
    """A LorakitError becomes one red ``error: ...`` line and exit code 2 (full traceback with LORAKIT_DEBUG=1)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except LorakitError as e:
            if os.environ.get("LORAKIT_DEBUG") == "1":
                raise
            err.print(Text(f"error: {e}", style="red"), soft_wrap=True)  # Text: no markup parsing of the message
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


def human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    raise AssertionError("unreachable")
