"""The retry policy: what happens after an error, decided in one place, without I/O.

Two questions, both answered from the error's class and the numbers given:
- a request that failed: send it again in process (after how long), split it to find
  the input at fault, or give up on it;
- an item whose request was given up: back to the queue (after how long, spending an
  attempt or not), or to the dead-letter table.
Attempts are the item's own, counted at claim: items claimed together keep their own
budgets, so a fresh item never pays for a neighbour on its last attempt.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from syncer.config import WorkerConfig
from syncer.errors import (
    CircuitOpenError,
    DimensionError,
    InputError,
    PausedError,
    ProviderError,
    RateLimitedError,
    RetryableError,
    SyncerError,
)

# A request of several inputs is sent whole at most this many times again before it is split.
SPLIT_AFTER_RETRIES = 1
# A 429's sender is already held by the provider's limiter until Retry-After: an in-process
# retry only spreads out, so that the held requests do not arrive together.
RATE_LIMITED_SPREAD_S = 0.1


@dataclass(frozen=True)
class Decision:
    """An item's way out of a failed request."""

    dead_letter: bool
    delay_s: float = 0.0  # before it may be claimed again
    counts: bool = True  # False: not the item's fault, the attempt is handed back


class RetryPolicy:
    def __init__(self, worker: WorkerConfig, breaker_reset_s: float) -> None:
        self.max_attempts = worker.max_attempts
        self.max_retries = worker.max_retries
        self.base_s = worker.retry_base_s
        self.cap_s = worker.retry_max_s
        self.breaker_reset_s = breaker_reset_s

    def retry_in_s(
        self,
        err: SyncerError,
        retry: int,
        time_left_s: float,
        n_inputs: int = 1,
        part: bool = False,
    ) -> float | None:
        """Seconds before sending a failed request again (this is its `retry`-th retry), or
        None: give up on it (and split it, or let each item's decision follow).

        A request of several inputs that fails twice in a row is split rather than sent
        whole again (see `split`); a part of a split request is never retried in process:
        its sibling's answer says whether the provider is up, and its items come back on a
        later claim."""
        if not isinstance(err, RetryableError) or part:
            return None
        limit = self.max_retries
        if n_inputs > 1 and _input_specific(err):
            limit = min(limit, SPLIT_AFTER_RETRIES)
        if retry > limit:
            return None
        if isinstance(err, RateLimitedError):
            delay_s = random.uniform(0, RATE_LIMITED_SPREAD_S)
        elif isinstance(err, CircuitOpenError):
            delay_s = err.retry_after_s or self.breaker_reset_s
        else:
            delay_s = backoff_s(retry, self.base_s, self.cap_s, err)
        return delay_s if delay_s <= time_left_s else None

    @staticmethod
    def split(err: SyncerError, n_inputs: int) -> bool:
        """Split the request to find the input at fault? A 400 names one bad input; a 5xx,
        a timeout or a malformed answer that keeps coming back may be one input the provider
        always fails on (some do): halves that succeed are written, the failing half is split
        again, and only the input at fault spends its attempts. Not for a 429, an open
        breaker or a wrong dimension: those are the provider's state, not an input's."""
        return n_inputs > 1 and (isinstance(err, InputError) or _input_specific(err))

    @staticmethod
    def traced(err: SyncerError) -> bool:
        """Did a split input fail for its own sake? (then it is sent alone from now on, and
        the breaker does not count its failures)"""
        return _input_specific(err)

    def decide(self, err: SyncerError, attempts: int) -> Decision:
        """The item's way out, given the attempts it has had (this claim included)."""
        if isinstance(err, InputError):
            return Decision(dead_letter=True)  # no retry can fix it
        if isinstance(err, ProviderError):
            # The provider refuses everything (a bad key, an unknown model): not the item's
            # fault; back when the provider is asked again.
            return Decision(False, self.breaker_reset_s, counts=False)
        if isinstance(err, PausedError):
            return Decision(False, 0.0, counts=False)  # never sent: claimable on resume
        # Never sent (the breaker was open): the attempt is not the item's to spend.
        counts = not isinstance(err, CircuitOpenError)
        if counts and attempts >= self.max_attempts:
            return Decision(dead_letter=True)
        return Decision(False, backoff_s(attempts, self.base_s, self.cap_s, err), counts)


def _input_specific(err: SyncerError) -> bool:
    """Could one input cause this error? (a 5xx, a timeout, a reset, a malformed answer)"""
    return isinstance(err, RetryableError) and not isinstance(
        err, RateLimitedError | CircuitOpenError | DimensionError
    )


def backoff_s(attempt: int, base_s: float, cap_s: float, err: Exception | None = None) -> float:
    """Full-jitter exponential backoff; a Retry-After is a floor, never shortened."""
    delay = random.uniform(0, min(cap_s, base_s * (2 ** max(0, attempt - 1))))
    retry_after = getattr(err, "retry_after_s", None)
    if retry_after:
        delay = max(delay, float(retry_after))
    return delay
