"""User-facing errors. The CLI prints any of them as one line and exits with status 2."""


class EvoforgeError(ValueError):
    """Bad input a user can fix; the message is one line that names the file and the field."""


class ConfigError(EvoforgeError):
    """A run file or recipe that cannot be used."""


class IncompatibleModelsError(EvoforgeError):
    """Models that cannot be merged (architecture or tensor shapes differ)."""


class ModelNotAvailableError(ConfigError):
    """A model reference that is neither a folder nor in the local Hugging Face cache (evoforge.models)."""
