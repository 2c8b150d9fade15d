"""lorakit's exceptions: each message names the file, field or module at fault and how to fix it."""


class LorakitError(ValueError):
    """Base class of every error lorakit raises on bad input."""


class ConfigError(LorakitError):
    """An option or config value is invalid (unknown method, bad rank, ...)."""


class TargetError(LorakitError):
    """Target selection failed: nothing matched, or a matched module has an unsupported type."""


class AdapterFormatError(LorakitError):
    """An adapter directory cannot be read or does not fit the base model."""


class BaseModelError(LorakitError):
    """A base model name or path cannot be resolved or loaded."""


class CheckpointError(LorakitError):
    """A model checkpoint (base or fine-tuned) cannot be read, or two checkpoints do not match."""
