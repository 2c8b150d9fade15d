"""Recipes: end-to-end uses of lorakit's methods and callbacks on small self-contained tasks (no downloads), each
one file with a ``*_demo(seed)`` that returns its numbers."""
