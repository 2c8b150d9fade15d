"""`lorakit info`: version, registered methods, inits, optimizers, training callbacks and placements, bundled
models, the cache."""

from __future__ import annotations

import importlib.util
import json
from typing import Annotated, Any

import typer
from rich.table import Table

import lorakit
from lorakit.cli._common import friendly_errors, out
from lorakit.init import INITS
from lorakit.methods import REGISTRY
from lorakit.models import BUNDLED, PACKAGES, cache_dir, smollm2_cache
from lorakit.train.callbacks import CALLBACKS
from lorakit.train.optimizers import OPTIMIZERS
from lorakit.train.placement import PLACEMENTS


def collect() -> dict[str, Any]:
    """Everything `lorakit info` reports, as plain data."""
    models = []
    for name, description in BUNDLED.items():
        package = PACKAGES[name]
        models.append(
            {
                "name": name,
                "description": description,
                "package": package,
                "package_installed": importlib.util.find_spec(package) is not None,
                # only SmolLM2 is de-quantised into the cache; MiniLM is read in place
                "cached": (smollm2_cache() / "config.json").is_file() if name == "smollm2-135m" else None,
            }
        )
    methods = [
        {"name": s.name, "paper": s.paper, "url": s.url, "mergeable": s.mergeable}
        for s in sorted(REGISTRY.values(), key=lambda s: s.name)
    ]
    inits = [
        {"name": s.name, "paper": s.paper, "url": s.url, "methods": list(s.methods), "calibration": s.calibration}
        for s in sorted(INITS.values(), key=lambda s: s.name)
    ]
    optimizers = [{"name": s.name, "help": s.help, "paper": s.paper, "url": s.url} for s in OPTIMIZERS.values()]
    callbacks = [{"name": s.name, "help": s.help} for s in CALLBACKS.values()]
    placements = [{"name": s.name, "help": s.help} for s in PLACEMENTS.values()]
    return {
        "version": lorakit.__version__,
        "methods": methods,
        "inits": inits,
        "optimizers": sorted(optimizers, key=lambda o: o["name"]),
        "callbacks": sorted(callbacks, key=lambda c: c["name"]),
        "placements": sorted(placements, key=lambda c: c["name"]),
        "models": models,
        "cache_dir": str(cache_dir()),
    }


@friendly_errors
def info(json_output: Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")] = False) -> None:
    """Show the lorakit version, the registered adapter methods, initialisations, optimizers and training
    callbacks, the bundled base models and the cache dir."""
    data = collect()
    if json_output:
        typer.echo(json.dumps(data, indent=2))
        return
    out.print(f"lorakit {data['version']}")
    methods = Table(title="Adapter methods")
    for col in ("method", "paper", "link", "mergeable"):
        methods.add_column(col, overflow="fold")
    for m in data["methods"]:
        methods.add_row(m["name"], m["paper"], m["url"], "yes" if m["mergeable"] else "no")
    out.print(methods)
    inits = Table(title="Initialisations (init=NAME on the methods listed)")
    for col in ("init", "paper", "methods", "reads data"):
        inits.add_column(col, overflow="fold")
    for i in data["inits"]:
        inits.add_row(i["name"], i["paper"], ", ".join(i["methods"]), "yes" if i["calibration"] else "no")
    out.print(inits)
    _print_named(data, "Optimizers (lorakit train --optimizer)", "optimizers")
    _print_named(data, "Training callbacks (--callback)", "callbacks")
    _print_named(data, "Placements (lorakit train --targets auto:NAME)", "placements")
    models = Table(title="Bundled base models")
    for col in ("name", "model", "package", "cached"):
        models.add_column(col, overflow="fold")
    for m in data["models"]:
        package = f"{m['package']} ({'installed' if m['package_installed'] else 'MISSING'})"
        cached = (
            "n/a (read in place)" if m["cached"] is None else ("yes" if m["cached"] else "no (built on first load)")
        )
        models.add_row(m["name"], m["description"], package, cached)
    out.print(models)
    out.print(f"cache dir: {data['cache_dir']}", soft_wrap=True)


def _print_named(data: dict[str, Any], title: str, key: str) -> None:
    """A two-column table (name, what it does) of one registry in ``data``."""
    table = Table(title=title)
    for col in ("name", "what it does"):
        table.add_column(col, overflow="fold")
    for entry in data[key]:
        table.add_row(entry["name"], entry["help"])
    out.print(table)
