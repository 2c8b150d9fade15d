"""The ``lorakit`` command line: one typed function per subcommand; its docstring is its --help."""

from __future__ import annotations

import typer

from lorakit.cli import (  # modules; each holds its command function
    analyze,
    compress,
    demo,
    export,
    extract,
    generate,
    info,
    inspect_adapter,
    merge,
    serve,
    train,
)

app = typer.Typer(
    name="lorakit",
    help="lorakit: train, inspect, merge and run LoRA-family adapters.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
for command in (info.info, inspect_adapter.inspect, generate.generate, train.train, extract.extract, extract.resize):
    app.command()(command)
app.command("eval")(train.evaluate)
app.command()(demo.demo)
app.command()(merge.merge)
app.command()(analyze.analyze)
app.command()(compress.compress)
app.command()(export.export)
app.command()(serve.serve)


def main() -> None:
    """Entry point of the ``lorakit`` console script."""
    app()


__all__ = ["app", "main"]
