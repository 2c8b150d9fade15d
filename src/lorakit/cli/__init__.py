"""The ``lorakit`` command line: one typed function per subcommand; its docstring is its --help.

Verbs are registered in ``VERBS`` by name, as ``"module:function"``; a new verb is one line there
(its place is its place in ``lorakit --help``). The ``lorakit`` command (:func:`main`) imports a
verb's module only when that verb runs or shows its help, so ``lorakit extract`` loads neither
the method registry nor transformers nor a web server. ``lorakit.cli.app``, the Typer app with
every verb's function registered (what tests and other code invoke), imports them all on first
access; both are built from ``VERBS`` by :func:`build_app`.
"""

from __future__ import annotations

import gc
import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import typer
from typer._click import Parameter
from typer.core import TyperCommand

VERBS = {
    "info": "lorakit.cli.info:info",
    "inspect": "lorakit.cli.inspect_adapter:inspect",
    "generate": "lorakit.cli.generate:generate",
    "train": "lorakit.cli.train:train",
    "extract": "lorakit.cli.extract:extract",
    "resize": "lorakit.cli.extract:resize",
    "eval": "lorakit.cli.train:evaluate",
    "demo": "lorakit.cli.demo:demo",
    "merge": "lorakit.cli.merge:merge",
    "analyze": "lorakit.cli.analyze:analyze",
    "compress": "lorakit.cli.compress:compress",
    "export": "lorakit.cli.export:export",
    "serve": "lorakit.cli.serve:serve",
}

if TYPE_CHECKING:
    app: typer.Typer


def verb_function(verb: str) -> Callable[..., Any]:
    """The function implementing ``verb`` (its module is imported now)."""
    module, _, name = VERBS[verb].partition(":")
    function: Callable[..., Any] = getattr(importlib.import_module(module), name)
    return function


class LazyCommand(TyperCommand):
    """A verb whose options, help and callback are its function's, read when first needed.

    Typer builds every registered command when the app starts; this one stands in for its verb
    until the verb's parameters, help text or callback are asked for, then imports the function
    and takes them from the command Typer makes of it.
    """

    def real(self) -> TyperCommand:
        if "_real" not in self.__dict__:
            single = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
            single.command(self.name)(verb_function(str(self.name)))
            command = typer.main.get_command(single)
            assert isinstance(command, TyperCommand)
            self.__dict__["_real"] = command
        real: TyperCommand = self.__dict__["_real"]
        return real

    # click's Command.__init__ assigns these; the stand-in ignores that and answers with the real ones
    @property
    def params(self) -> list[Parameter]:
        return self.real().params

    @params.setter
    def params(self, value: list[Parameter]) -> None:
        pass

    @property
    def help(self) -> str | None:
        return self.real().help

    @help.setter
    def help(self, value: str | None) -> None:
        pass

    @property
    def callback(self) -> Callable[..., Any] | None:
        return self.real().callback

    @callback.setter
    def callback(self, value: Callable[..., Any] | None) -> None:
        pass


def _stand_in() -> None:
    """Replaced by the verb's own function (``VERBS``) when the verb is used."""


def build_app(*, lazy: bool) -> typer.Typer:
    """Every verb of ``VERBS``: as stand-ins importing their function when used (``lazy``), or the functions."""
    built = typer.Typer(
        name="lorakit",
        help="lorakit: train, inspect, merge and run LoRA-family adapters.",
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
    )
    for verb in VERBS:
        if lazy:
            built.command(verb, cls=LazyCommand)(_stand_in)
        else:
            built.command(verb)(verb_function(verb))
    return built


def __getattr__(name: str) -> Any:
    """``app``: built (importing every verb's module) on first access."""
    if name != "app":
        raise AttributeError(f"module 'lorakit.cli' has no attribute {name!r}")
    globals()["app"] = built = build_app(lazy=False)
    return built


def main() -> None:
    """Entry point of the ``lorakit`` console script."""
    try:
        build_app(lazy=True)(prog_name="lorakit")
    finally:
        # The verb is done. Collect its garbage once (finalizers run), then freeze what is left so the
        # interpreter's exit does not walk torch's object graph again: that walk took 0.45 s of every
        # command that loaded torch (1.6 s -> 1.15 s for `python -c "import torch"`).
        gc.collect()
        gc.freeze()


__all__ = ["VERBS", "LazyCommand", "app", "build_app", "main", "verb_function"]
