"""syncer's errors, one hierarchy rooted in SyncerError.

Two families: errors that end a command (ConfigError, DatabaseError, SchemaError), whose
message is the one line the user sees, and errors of one embedding request (retryable,
one bad input, or a provider that refuses everything), which syncer.retry turns into an
outcome for each queue item. `EXIT_CODES` maps them to a command's exit status.
"""

from __future__ import annotations


class SyncerError(Exception):
    """Base class of syncer's own errors."""

    error_class = "error"


class ConfigError(SyncerError):
    """A configuration problem; the message names the file and the key."""


class DatabaseError(SyncerError):
    """The database cannot be reached or lacks what syncer needs."""


class DatabaseUnavailable(DatabaseError):
    """The database is not there now (down, restarting, unreachable): worth waiting for."""


class ListenError(SyncerError):
    """observe.listen cannot be served (in use, no such address); the message names it."""


class SchemaError(SyncerError):
    """The database does not match the configuration; the message says what and where."""


class SlotError(SchemaError):
    """The slot or publication is missing or unusable; the message says what to run."""


class RetryableError(SyncerError):
    """The whole request may succeed later: 429, 5xx, timeouts, resets, malformed answers."""

    error_class = "retryable"

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class RateLimitedError(RetryableError):
    error_class = "rate_limited"


class DimensionError(RetryableError):
    """An answer whose vectors have another dimension than the config says."""

    error_class = "wrong_dimension"


class CircuitOpenError(RetryableError):
    """Not sent: the provider failed too often in a row; a probe follows the cool-down."""

    error_class = "circuit_open"


class PausedError(CircuitOpenError):
    """Not sent: the pipeline was paused (`syncer pause`); its items go back to the queue."""

    error_class = "paused"


class InputError(SyncerError):
    """One input can never be embedded as it is (the provider rejected it)."""

    error_class = "invalid_input"

    def __init__(self, message: str, index: int | None = None) -> None:
        super().__init__(message)
        self.index = index


class InputTooLongError(InputError):
    """A text over the model's input limit, with `on_too_long = "dead_letter"`."""

    error_class = "input_too_long"


class ProviderError(SyncerError):
    """The provider refuses every request (bad key, unknown model, wrong dimensions)."""

    error_class = "provider"


# What a command's exit status means, for scripts and supervisors.
EXIT_OK = 0
EXIT_ERROR = 1  # an error; also: the database cannot be reached, syncer is not installed
EXIT_USAGE = 2  # the command line or the configuration is wrong
EXIT_PROVIDER = 3  # a provider refuses every request, or a threshold was passed
EXIT_THRESHOLD = 3  # `syncer status`: a --max-*/--min-*/--require-* threshold was passed

# The one table from error to exit status; the nearest class in an error's MRO decides, and
# an error that is not syncer's (OSError, asyncpg's, a bug) ends with EXIT_ERROR.
EXIT_CODES: dict[type[BaseException], int] = {
    ConfigError: EXIT_USAGE,
    ProviderError: EXIT_PROVIDER,
    SyncerError: EXIT_ERROR,
}


def exit_code(err: BaseException) -> int:
    """The exit status of a command that ends with `err`."""
    codes = (EXIT_CODES.get(cls) for cls in type(err).__mro__)
    return next((code for code in codes if code is not None), EXIT_ERROR)
