"""The error types samcache raises for bad user input.

The CLI turns any `SamcacheError` into a one-line message and a non-zero exit code;
anything else is a bug and keeps its traceback.
"""


class SamcacheError(Exception):
    """Base class: a problem with the user's input, files or environment."""


class ImageReadError(SamcacheError):
    """An image file is missing, corrupt, truncated or in an unsupported format."""


class DatasetError(SamcacheError):
    """A dataset cannot be read, or has problems and `strict` was asked for."""


class CheckpointError(SamcacheError):
    """Weights cannot be found, downloaded, verified or loaded into the model asked for."""


class CacheError(SamcacheError):
    """An embedding cache is unreadable or incompatible with the request."""


class ConfigError(SamcacheError):
    """An option has the wrong type or is out of range."""


class OptionCombinationError(ConfigError):
    """Options that do not go together (or one that needs another): a usage error, exit code 2."""


class TrainingError(SamcacheError):
    """Training cannot start or had to stop (empty split, non-finite loss, too small a batch)."""


class OutputError(SamcacheError):
    """A file cannot be written (disk full, read-only folder, no permission); whatever the file held
    before is kept, since every output is written to a temporary name and renamed."""


class RunError(SamcacheError):
    """A run folder cannot be written, read or resumed, or does not belong with a cache."""
