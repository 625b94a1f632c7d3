"""Exception types. Each carries the value, what was expected and how to fix it.

The CLI prints any `MegarnnError` as one line and exits with status 2; anything else
is a bug and keeps its traceback.
"""


class MegarnnError(Exception):
    """Base class for errors caused by user input (config, data, files, checkpoints)."""


class ConfigError(MegarnnError):
    """A config key, value or combination is invalid."""


class DataError(MegarnnError):
    """A corpus, shard or tokenizer is missing, malformed or inconsistent."""


class CheckpointError(MegarnnError):
    """A checkpoint is missing, incomplete, or belongs to another model."""


class TrainingError(MegarnnError):
    """Training cannot continue (for example too many non-finite steps in a row)."""
