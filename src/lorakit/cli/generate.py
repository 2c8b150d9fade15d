"""`lorakit generate`: greedy generation with a base model, optionally with an adapter on top."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import torch
import typer

from lorakit.cli._common import QUANTIZE_HELP, err, friendly_errors
from lorakit.errors import ConfigError
from lorakit.train.data import pad_id


def prompt_ids(tok: Any, prompt: str, chat: bool) -> torch.Tensor:
    """Token ids (1, T) of ``prompt``: as one user turn of the chat template, or as plain text."""
    if chat:
        if not getattr(tok, "chat_template", None):
            raise ConfigError("this tokenizer has no chat template; run with --no-chat.")
        text = tok.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )
        return tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    return tok(prompt, return_tensors="pt")["input_ids"]


@torch.no_grad()
def greedy(model: Any, tok: Any, prompt: str, *, chat: bool, max_new_tokens: int = 48) -> str:
    """The model's greedy continuation of ``prompt`` (special tokens removed, whitespace stripped)."""
    ids = prompt_ids(tok, prompt, chat)  # (1, T)
    pad = pad_id(tok)
    new = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad
    )[0, ids.shape[1] :]  # (new,)
    return tok.decode(new, skip_special_tokens=True).strip()


@friendly_errors
def generate(
    prompt: Annotated[str, typer.Argument(help="The prompt (one user turn when --chat).")],
    base: Annotated[str, typer.Option(help="Bundled base model name or local checkpoint dir.")] = "smollm2-135m",
    quantize: Annotated[str | None, typer.Option(help=QUANTIZE_HELP)] = None,
    adapter: Annotated[
        Path | None, typer.Option(help="Adapter dir to apply; without it the base model answers.")
    ] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Most tokens to generate.")] = 64,
    chat: Annotated[
        bool | None,
        typer.Option(
            "--chat/--no-chat", help="Wrap the prompt in the chat template (default: if the tokenizer has one)."
        ),
    ] = None,
) -> None:
    """Greedy-decode an answer to PROMPT with BASE (plus ADAPTER if given) and print it."""
    import lorakit as lk

    with err.status(f"loading {base}" + (f" + {adapter}" if adapter else "")):
        model, tok = lk.load_base(base, quantize=quantize)
        if adapter is not None:
            lk.load_adapter(model, adapter)
    use_chat = bool(getattr(tok, "chat_template", None)) if chat is None else chat
    with err.status("generating"):
        answer = greedy(model, tok, prompt, chat=use_chat, max_new_tokens=max_new_tokens)
    typer.echo(answer)
