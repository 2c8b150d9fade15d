"""Built-in tasks with verifiable answers, generated deterministically (no downloads).

Each task maps a seeded random generator to one (prompt, answer) pair. A stable hash of the
prompt decides its split, so no held-out prompt ever appears in training and held-out accuracy
measures generalisation, not recall.
"""

from __future__ import annotations

import calendar
import random
import zlib
from collections.abc import Callable
from dataclasses import dataclass

from lorakit.errors import ConfigError

WORDS = [
    "apple",
    "river",
    "stone",
    "cloud",
    "tiger",
    "maple",
    "honey",
    "glass",
    "piano",
    "candle",
    "forest",
    "silver",
    "rocket",
    "garden",
    "lemon",
    "violet",
    "copper",
    "island",
    "basket",
    "pepper",
    "meadow",
    "falcon",
    "marble",
    "orange",
    "winter",
    "summer",
    "bridge",
    "castle",
    "dragon",
    "feather",
    "harbor",
    "jungle",
    "kettle",
    "ladder",
    "mirror",
    "needle",
    "pillow",
    "rabbit",
    "saddle",
    "tunnel",
    "velvet",
    "wagon",
    "yellow",
    "zebra",
    "anchor",
    "bottle",
    "carpet",
    "desert",
    "engine",
    "fabric",
    "guitar",
    "helmet",
]


@dataclass(frozen=True)
class Example:
    prompt: str
    answer: str


def _addition(rng: random.Random) -> Example:
    a, b = rng.randint(10, 999), rng.randint(10, 999)
    return Example(f"What is {a} + {b}? Reply with the number only.", str(a + b))


def _date(rng: random.Random) -> Example:
    y, m = rng.randint(1950, 2049), rng.randint(1, 12)
    d = rng.randint(1, calendar.monthrange(y, m)[1])
    return Example(f"Rewrite the date {y:04d}-{m:02d}-{d:02d} in the format DD/MM/YYYY.", f"{d:02d}/{m:02d}/{y:04d}")


def _sort(rng: random.Random) -> Example:
    words = rng.sample(WORDS, rng.randint(3, 5))
    return Example(f"Sort these words alphabetically: {', '.join(words)}", ", ".join(sorted(words)))


def _reverse(rng: random.Random) -> Example:
    words = rng.sample(WORDS, rng.randint(3, 5))
    return Example(f"Reverse the order of these words: {' '.join(words)}", " ".join(reversed(words)))


TASKS: dict[str, tuple[str, Callable[[random.Random], Example]]] = {
    "addition": ("add two numbers of 2-3 digits", _addition),
    "date": ("rewrite a YYYY-MM-DD date as DD/MM/YYYY", _date),
    "sort": ("sort 3-5 words alphabetically", _sort),
    "reverse": ("reverse the order of 3-5 words", _reverse),
}
HELDOUT_EVERY = 5  # one prompt in five (by a stable hash) belongs to the held-out split


def split_of(prompt: str) -> str:
    """'heldout' or 'train', fixed by the prompt text itself, so the splits never overlap."""
    return "heldout" if zlib.crc32(prompt.encode()) % HELDOUT_EVERY == 0 else "train"


def task_examples(name: str, split: str, n: int, seed: int = 0) -> list[Example]:
    """``n`` examples of task ``name`` from split 'train' or 'heldout', the same for the same arguments."""
    if name not in TASKS:
        raise ConfigError(f"unknown task {name!r}; built-in tasks: {', '.join(TASKS)}.")
    if split not in ("train", "heldout"):
        raise ConfigError(f"split must be 'train' or 'heldout', got {split!r}.")
    make = TASKS[name][1]
    out: list[Example] = []
    i = 0
    while len(out) < n:
        ex = make(random.Random(f"{name}:{seed}:{i}"))  # str seeds are hashed stably (sha512)
        i += 1
        if split_of(ex.prompt) == split:
            out.append(ex)
    return out
