"""`lorakit merge`: merge LoRA adapters into one adapter, or fold one adapter into its base model."""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from lorakit.cli._common import QUANTIZE_HELP, err, friendly_errors, out
from lorakit.compose import MERGE_METHODS
from lorakit.compose.into_base import DRIFT_NAME
from lorakit.errors import ConfigError

if TYPE_CHECKING:
    from lorakit.quant import MergeDrift

Opt = typer.Option
FIELDS = ("adapters", "method", "weights", "out", "rank", "energy", "density", "gamma", "lam", "seed", "missing")
METHOD_OPTIONS = ("density", "gamma", "lam")


def _weights(value: Any, where: str) -> list[float] | None:
    """'1,0.5,2' or a YAML list -> floats."""
    if value is None:
        return None
    items = value.split(",") if isinstance(value, str) else value
    try:
        return [float(w) for w in items if not (isinstance(w, str) and not w.strip())]
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: weights must be numbers, comma-separated (e.g. 1,0.5,2); got {value!r}.") from e


def _read_config(path: Path) -> dict[str, Any]:
    """The YAML merge config; relative paths in it are relative to the file's folder."""
    import yaml

    try:
        fields = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"cannot read merge config {path}: {e}") from e
    if not isinstance(fields, dict):
        raise ConfigError(f"{path} must hold a mapping (adapters: [...], method: ..., out: ...).")
    unknown = sorted(set(fields) - set(FIELDS))
    if unknown:
        raise ConfigError(f"{path}: unknown field(s) {', '.join(unknown)}; valid fields: {', '.join(FIELDS)}.")
    adapters = fields.get("adapters")
    if adapters is not None and (not isinstance(adapters, list) or not all(isinstance(a, str) for a in adapters)):
        raise ConfigError(f"{path}: adapters must be a list of adapter dir paths.")
    if adapters is not None:
        fields["adapters"] = [path.parent / a for a in adapters]
    if fields.get("out") is not None:
        fields["out"] = path.parent / str(fields["out"])
    return fields


def _merge_adapters(settings: dict[str, Any], where: str) -> None:
    from lorakit.compose import merge_adapters
    from lorakit.io.factors import read_factors

    adapters = settings.get("adapters") or []
    if settings.get("out") is None:
        raise ConfigError("give the output adapter dir with --out DIR (or out: in the config).")
    opts = {k: settings[k] for k in METHOD_OPTIONS if settings.get(k) is not None}
    method = settings.get("method") or "linear"
    path = merge_adapters(
        adapters,
        method,
        _weights(settings.get("weights"), where),
        out=settings["out"],
        rank=settings.get("rank"),
        energy=settings.get("energy"),
        missing=settings.get("missing") or "error",
        seed=int(settings.get("seed") or 0),
        progress=True,
        **opts,
    )
    ranks = read_factors(path).ranks()
    out.print(
        f"merged {len(adapters)} adapter(s) with {method}: {len(ranks)} modules, ranks "
        f"{min(ranks.values())}..{max(ranks.values())} (total {sum(ranks.values())}); wrote {path}",
        soft_wrap=True,
    )


def _into_base(
    base: str | None, adapter: Path | None, target: Path | None, options: dict[str, Any], calibration: Path | None
) -> None:
    from lorakit.compose import merge_into_base
    from lorakit.quant import MergeDrift

    if base is None or adapter is None or target is None:
        raise ConfigError("--into-base needs --base NAME|DIR, --adapter DIR and --out MODEL_DIR.")
    if options["quantize"] is None and (options["quantized"] is not None or calibration is not None):
        raise ConfigError("--quantized and --calibration apply to a quantized base: add --quantize KIND (e.g. nf4).")
    text = None
    if calibration is not None:
        try:
            text = calibration.read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"cannot read the --calibration text file {calibration}: {e}") from e
    options["quantized"] = options["quantized"] or "requantize"
    onto = f" (quantized {options['quantize']}, {options['quantized']})" if options["quantize"] else ""
    err.print(f"merging {adapter} into {base}{onto} ...", soft_wrap=True, markup=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        path = merge_into_base(base, adapter, target, calibration=text, **options)
    for w in caught:  # lorakit's own (lk.merge's over-threshold layers, a QLoRA adapter's note) as lines
        message = str(w.message)
        if "lorakit" not in Path(w.filename).parts:  # a library's: shown, or not, as Python would have
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        elif message.startswith("note:"):
            err.print(message, soft_wrap=True, markup=False)
        else:
            err.print(f"warning: {message}", soft_wrap=True, markup=False)
    shards = sorted(p.name for p in path.glob("*.safetensors"))
    if options["quantize"] is not None:
        _print_drift(MergeDrift.load(path / DRIFT_NAME), options["quantize"])
    extra = f" + {DRIFT_NAME}" if options["quantize"] is not None else ""
    out.print(f"wrote {path}: {len(shards)} safetensors shard(s) + tokenizer{extra}", soft_wrap=True)


def _print_drift(report: MergeDrift, kind: str, worst: int = 5) -> None:
    """The drift report as a short table: the worst layers, the totals, the calibration batch, the reload."""
    from rich.table import Table

    over = report.over()
    table = Table(
        title=f"merge drift ({report.mode} onto {kind}): {len(report.drift)} layers, {len(over)} over "
        f"{report.threshold:g}·‖ΔW‖"
    )
    table.add_column("layer")
    table.add_column("‖W_merged − (W_q + ΔW)‖", justify="right")
    table.add_column("÷ ‖ΔW‖", justify="right")
    for name in sorted(report.relative, key=lambda n: -report.relative[n])[:worst]:
        table.add_row(name, f"{report.drift[name]:.4g}", f"{report.relative[name]:.3g}")
    ratios = sorted(report.relative.values())
    total = math.sqrt(sum(d * d for d in report.drift.values()))
    table.add_row(f"all {len(ratios)} layers (total, median)", f"{total:.4g}", f"{ratios[len(ratios) // 2]:.3g}")
    out.print(table)
    if report.max_abs_logit is not None:
        out.print(f"calibration batch: max |Δlogit| {report.max_abs_logit:.4g}, mean KL {report.kl:.3g}")
    if report.reload_change is not None:
        same = " (the same quantized weights)" if report.reload_change == 0 else ""
        change = f"{report.reload_change:.3g}{same}"
        out.print(f"reloading with --quantize {kind} changes the saved weights by at most {change}", soft_wrap=True)


@friendly_errors
def merge(
    adapters: Annotated[
        list[Path] | None,
        typer.Argument(help="LoRA adapter dirs to merge (PEFT or lorakit format).", show_default=False),
    ] = None,
    out_dir: Annotated[
        Path | None, Opt("--out", help="Where to write the merged adapter (with --into-base: the model checkpoint).")
    ] = None,
    method: Annotated[
        str | None, Opt(help=f"Merge method: {', '.join(sorted(MERGE_METHODS))}. (default linear)")
    ] = None,
    weights: Annotated[
        str | None, Opt(help="One weight per adapter, comma-separated, e.g. 1,0.5,2 (default all 1).")
    ] = None,
    rank: Annotated[int | None, Opt(min=1, help="Output rank per module (re-factored by SVD).")] = None,
    energy: Annotated[float | None, Opt(help="Per module, the smallest rank keeping this fraction of Σσ².")] = None,
    density: Annotated[
        float | None, Opt(help="Fraction of entries kept (ties, dare_*, magnitude_prune, breadcrumbs).")
    ] = None,
    gamma: Annotated[float | None, Opt(help="Fraction of largest entries dropped (breadcrumbs).")] = None,
    lam: Annotated[float | None, Opt(help="λ, the overall scale of task_arithmetic.")] = None,
    seed: Annotated[int | None, Opt(help="Seed of the random masks (dare_*, ortho_dropout). (default 0)")] = None,
    missing: Annotated[
        str | None, Opt(help="Modules only some adapters adapt: 'error' or 'zero' (treat as zero). (default error)")
    ] = None,
    config: Annotated[
        Path | None, Opt(help="YAML with the same fields (adapters: [...], method, weights, out, ...).")
    ] = None,
    into_base: Annotated[
        bool, Opt("--into-base", help="Fold --adapter into --base and write a full checkpoint.")
    ] = False,
    base: Annotated[str | None, Opt(help="With --into-base: bundled base name or checkpoint dir.")] = None,
    adapter: Annotated[Path | None, Opt(help="With --into-base: the adapter dir to fold in.")] = None,
    max_shard_size: Annotated[str, Opt(help="With --into-base: largest safetensors shard, e.g. 2GB.")] = "2GB",
    check_base: Annotated[
        bool,
        Opt(
            "--check-base/--no-check-base",
            help="With --into-base: refuse an adapter saved for another base (off: apply it to a sibling "
            "fine-tune of that base on purpose, as RE-Adapt does).",
        ),
    ] = True,
    quantize: Annotated[
        str | None, Opt(help=f"With --into-base: merge onto the base quantized as it loads. {QUANTIZE_HELP}")
    ] = None,
    quantized: Annotated[
        str | None,
        Opt(
            help="With --quantize: 'requantize' W_q + ΔW with the same kind (small, may lose some of the update) or "
            "'dequantize' (exact, dense). Both write float weights; see README 'Quantized bases'. (default requantize)"
        ),
    ] = None,
    calibration: Annotated[
        Path | None,
        Opt(
            help="With --quantize: a text file whose first 256 tokens measure max |Δlogit| and KL between the "
            "unmerged adapter and the merged model (default: a short built-in text)."
        ),
    ] = None,
    drift_threshold: Annotated[
        float, Opt(help="With --quantize: warn about the layers whose drift exceeds this fraction of ‖ΔW‖.")
    ] = 0.5,
) -> None:
    """Merge LoRA adapters into one adapter, or fold one adapter into its base model.

    lorakit merge A B C --method ties --weights 1,0.5,2 --rank 16 --out DIR

    lorakit merge --config merge.yaml   (command-line flags override the file)

    lorakit merge --into-base --base NAME|DIR --adapter A --out MODEL_DIR [--quantize nf4 --quantized dequantize]

    Exact in factor form (rank Σ r_i): linear, cat, task_arithmetic, ortho_dropout.

    svd: the best rank-r approximation of the weighted sum (default r = max r_i).

    ties, dare_*, magnitude_prune, breadcrumbs: on each module's full deltas, re-factored.
    """
    if into_base:
        if adapters or config is not None:
            raise ConfigError("--into-base folds one --adapter into --base; do not also pass adapter dirs or --config.")
        options = {"max_shard_size": max_shard_size, "check_base": check_base, "quantize": quantize}
        options |= {"quantized": quantized, "drift_threshold": drift_threshold}
        _into_base(base, adapter, out_dir, options, calibration)
        return
    flags = {
        "adapters": adapters or None,
        "method": method,
        "weights": weights,
        "out": out_dir,
        "rank": rank,
        "energy": energy,
        "density": density,
        "gamma": gamma,
        "lam": lam,
        "seed": seed,
        "missing": missing,
    }
    settings = _read_config(config) if config is not None else {}
    settings.update({k: v for k, v in flags.items() if v is not None})
    if not settings.get("adapters"):
        raise ConfigError("give the adapter dirs to merge (lorakit merge A B --out DIR) or --config merge.yaml.")
    _merge_adapters(settings, str(config) if config is not None else "--weights")
