"""PEFT-format adapter I/O (atomic writes, checked reads)."""

from lorakit.io.adapter import CONFIG_NAME, WEIGHTS_NAME, load_adapter, read_config, save_adapter

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "load_adapter", "read_config", "save_adapter"]
