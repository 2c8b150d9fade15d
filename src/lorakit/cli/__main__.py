"""``python -m lorakit.cli ...`` (and ``accelerate launch -m lorakit.cli ...``) runs the ``lorakit`` command."""

from lorakit.cli import main

main()
