"""What every benchmark script shares: printing its one JSON object and saving it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def emit(result: dict[str, Any], json_out: Path | None) -> None:
    """Print ``result`` as one JSON line; also write it to ``json_out`` (parents created) when given."""
    text = json.dumps(result)
    print(text)
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(text + "\n")
