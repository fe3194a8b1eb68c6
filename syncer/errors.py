"""Errors with a meaning, so the retry policy is decided in one place (the worker)."""

from __future__ import annotations


class SyncerError(Exception):
    """Base class of syncer's own errors."""

    error_class = "error"


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


class InputError(SyncerError):
    """One input can never be embedded as it is (the provider rejected it)."""

    error_class = "invalid_input"

    def __init__(self, message: str, index: int | None = None) -> None:
        super().__init__(message)
        self.index = index


class ProviderError(SyncerError):
    """The provider refuses every request (bad key, unknown model, wrong dimensions)."""

    error_class = "provider"
