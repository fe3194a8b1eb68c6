"""Provider limits: rate limiting and a circuit breaker.

Touches neither the database nor HTTP. One ProviderLimiter and one CircuitBreaker per
provider, shared by every pipeline using it in the process: the guarded client takes a
`slot()` before each request and reports back what the provider answered. What a
provider's rate-limit headers say reaches the limiter as `Quota`s, read by the provider's
protocol module, so the limiter knows no header names.

Not aiolimiter: its bucket (capacity = rate) lets twice the rate start within one sliding
minute, its rate is fixed at construction (no AIMD), it refuses amounts above capacity,
and it serves the smallest waiting amount first (large requests starve). A sliding log of
the last minute is exact, follows a changing limit, and we serve waiters in order.
Not aiobreaker: half-open lets every call through rather than one probe, it runs on the
wall clock (`datetime.utcnow`), and it wraps calls where we classify outcomes ourselves.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from typing import Literal

log = logging.getLogger("syncer.limits")
breaker_log = logging.getLogger("syncer.breaker")

Clock = Callable[[], float]
WINDOW_S = 60.0  # RPM and TPM are per minute
LIMIT_WINDOW_S = WINDOW_S + 1.0  # what we count over: see _Window
PACE_BURST_S = 1.0  # how far ahead of an even pace requests and tokens may start
MAX_PAUSE_S = 60.0  # longest pause from our own backoff or from rate-limit headers
MAX_RETRY_AFTER_S = 600.0  # a longer Retry-After is left to the worker's retry delay
RECOVERY_STEP = 0.05  # additive increase: 5 % of the configured rate per round of requests
MIN_FACTOR = 0.01
_MIN_WAIT_S = 0.001  # float rounding must not turn a wait into a busy loop

# --- rate limiting ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Quota:
    """One of the provider's limits as its answer reports it: what is left until the reset."""

    kind: Literal["requests", "tokens"]
    remaining: float
    reset_s: float
    limit: float | None = None  # None: unknown, so nothing refills before the reset


class _Window:
    """What started in the last minute (plus a margin): an exact sliding log.

    The provider counts a request when it arrives, a moment after we count it: without the
    margin the first request of a new minute can reach it while the old one is still full.
    """

    def __init__(self) -> None:
        self._log: deque[list[float]] = deque()  # [started, amount]
        self.total = 0.0

    def wait_s(self, now: float, amount: float, limit: float) -> float:
        """0 if amount fits under limit now, else the seconds until enough has left."""
        while self._log and self._log[0][0] + LIMIT_WINDOW_S <= now:
            self.total -= self._log.popleft()[1]
        # More than the whole limit can never fit: it waits for an empty window instead.
        excess = self.total + min(amount, limit) - limit
        if excess <= 0:
            return 0.0
        for started, n in self._log:
            excess -= n
            if excess <= 0:
                return started + LIMIT_WINDOW_S - now
        return self._log[-1][0] + LIMIT_WINDOW_S - now  # only float drift gets here

    def add(self, now: float, amount: float) -> list[float]:
        entry = [now, amount]
        self._log.append(entry)
        self.total += amount
        return entry

    def settle(self, entry: list[float], amount: float) -> None:
        """Replace an estimate by what the provider counted (if it is still in the log)."""
        if self._log and entry[0] >= self._log[0][0]:
            self.total += amount - entry[1]
        entry[1] = amount


@dataclass
class _Budget:
    """What the provider's headers say is left, refilled linearly until its reset."""

    remaining: float
    seen_at: float
    reset_at: float
    refill_per_s: float | None  # None: the limit is unknown, wait for the full reset

    def wait_s(self, now: float, need: float) -> float:
        if now >= self.reset_at or self.remaining >= need:
            return 0.0
        if self.refill_per_s is None:
            return self.reset_at - now
        ready_at = self.seen_at + (need - self.remaining) / self.refill_per_s
        return max(0.0, min(ready_at, self.reset_at) - now)


@dataclass(frozen=True)
class Reservation:
    """A started request's share of the TPM window."""

    limiter: ProviderLimiter
    entry: list[float] | None

    def settle(self, tokens: int) -> None:
        self.limiter._settle(self.entry, tokens)


class ProviderLimiter:
    """Concurrency, RPM and TPM for one provider, slowed down by 429s and rate-limit headers.

    No more than the effective rpm requests (tpm estimated tokens) start in any sliding
    60 s window; a request above the whole tpm waits for an empty window, then goes alone.
    Waiters are admitted in arrival order. Effective limits follow AIMD: a 429 halves them
    (floor 1), each round of successful requests adds back 5 % of the configured ones.
    """

    def __init__(
        self,
        name: str,
        max_concurrency: int,
        rpm: int | None,
        tpm: int | None,
        *,
        clock: Clock = time.monotonic,
    ) -> None:
        if max_concurrency < 1 or (rpm is not None and rpm < 1) or (tpm is not None and tpm < 1):
            raise ValueError("max_concurrency, rpm and tpm must be at least 1")
        self.name, self.max_concurrency, self.rpm, self.tpm = name, max_concurrency, rpm, tpm
        self._clock = clock
        self._gate = asyncio.Lock()  # FIFO: its holder is the next request to start
        self._changed = asyncio.Event()  # a slot was freed or a limit raised
        self._requests, self._tokens = _Window(), _Window()
        # Even pacing (GCRA): the clock time each stream is "due" at; a start may run at
        # most PACE_BURST_S ahead of it. Without it the quota goes out in a burst at the
        # start of each minute, and a provider's sliding window then sees minutes that are
        # partly idle — and a burst is what trips provider-side limits first.
        self._request_due = self._token_due = 0.0
        self._budgets: dict[str, _Budget] = {}
        self._factor = 1.0
        self._paused_until = 0.0
        self._cut_until = 0.0  # 429s before this belong to the episode already cut for
        self._strikes = 0  # 429 episodes since the last success
        self.in_flight = self.waiting = 0
        self.started = self.tokens_started = self.rate_limited = 0

    @property
    def effective_concurrency(self) -> int:
        return max(1, int(self.max_concurrency * self._factor))

    @property
    def effective_rpm(self) -> float | None:
        return None if self.rpm is None else max(1.0, self.rpm * self._factor)

    @property
    def effective_tpm(self) -> float | None:
        return None if self.tpm is None else max(1.0, self.tpm * self._factor)

    @property
    def paused_until(self) -> float:
        """Clock time before which no request starts (a 429, or headers saying none is left)."""
        now = self._clock()
        until = self._paused_until
        for b in self._budgets.values():
            # Only a real wait counts: `now` itself would read as a pause to a caller whose
            # clock read came a moment earlier.
            if (wait_s := b.wait_s(now, 1.0)) > 0:
                until = max(until, now + wait_s)
        return until

    @contextlib.asynccontextmanager
    async def slot(self, tokens: int) -> AsyncIterator[Reservation]:
        """Wait for a concurrency slot, RPM and TPM room, and the end of any pause.

        The estimated tokens are counted against TPM at the start; `settle()` on the
        reservation replaces them by the provider's own count once it answers, so an
        estimate that errs high does not leave the quota unused.
        """
        self.waiting += 1
        try:
            entry = await self._wait_turn(max(0, tokens))
        finally:
            self.waiting -= 1
        try:
            yield Reservation(self, entry)
        finally:
            self.in_flight -= 1
            self._changed.set()

    async def _wait_turn(self, tokens: int) -> list[float] | None:
        async with self._gate:
            while True:
                self._changed.clear()
                wait_s = self._wait_s(tokens)
                if wait_s == 0.0:
                    return self._admit(tokens)
                timeout_s = None if wait_s is None else max(wait_s, _MIN_WAIT_S)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(timeout_s):
                        await self._changed.wait()

    def _wait_s(self, tokens: int) -> float | None:
        """0.0 to start now; None to wait for a slot to be freed; else seconds to wait."""
        if self.in_flight >= self.effective_concurrency:
            return None
        now = self._clock()
        waits = [self._paused_until - now, 0.0]
        waits += [b.wait_s(now, tokens if k == "tokens" else 1) for k, b in self._budgets.items()]
        if (rpm := self.effective_rpm) is not None:
            waits.append(self._requests.wait_s(now, 1, rpm))
            waits.append(self._request_due - PACE_BURST_S - now)
        if (tpm := self.effective_tpm) is not None:
            waits.append(self._tokens.wait_s(now, tokens, tpm))
            waits.append(self._token_due - PACE_BURST_S - now)
        return max(waits)

    def _admit(self, tokens: int) -> list[float] | None:
        now = self._clock()
        entry = None
        if (rpm := self.effective_rpm) is not None:
            self._requests.add(now, 1)
            self._request_due = max(self._request_due, now) + WINDOW_S / rpm
        if (tpm := self.effective_tpm) is not None:
            entry = self._tokens.add(now, tokens)
            self._token_due = max(self._token_due, now) + tokens * WINDOW_S / tpm
        for kind, budget in self._budgets.items():
            budget.remaining -= tokens if kind == "tokens" else 1
        self.in_flight += 1
        self.started += 1
        self.tokens_started += tokens
        return entry

    def _settle(self, entry: list[float] | None, tokens: int) -> None:
        if entry is not None:
            if (tpm := self.effective_tpm) is not None:
                self._token_due -= (entry[1] - tokens) * WINDOW_S / tpm
            self._tokens.settle(entry, tokens)
            self._changed.set()

    def on_rate_limited(self, retry_after_s: float | None) -> None:
        """A 429: pause every sender, and halve the effective limits once per episode."""
        now = self._clock()
        self.rate_limited += 1
        pause_s = min(max(0.0, retry_after_s or 0.0), MAX_RETRY_AFTER_S)
        if now >= self._cut_until:  # not an answer to a request sent before the last cut
            self._strikes += 1
            self._factor = max(MIN_FACTOR, self._factor * 0.5)
            if retry_after_s is None:  # 1 s doubling while 429s go on, jittered
                backoff_s = min(MAX_PAUSE_S, 2.0 ** (self._strikes - 1))
                pause_s = backoff_s * random.uniform(0.5, 1.0)
            self._cut_until = now + max(pause_s, 1.0)
            log.warning(
                "provider rate limited: pausing and slowing down",
                extra={"provider": self.name, "pause_s": round(pause_s, 3), "factor": self._factor},
            )
        self._paused_until = max(self._paused_until, now + pause_s)

    def on_quota(self, quotas: Iterable[Quota]) -> None:
        """What the provider says is left of its limits: slow down before it answers 429."""
        now = self._clock()
        for q in quotas:
            reset_s = min(q.reset_s, MAX_PAUSE_S)
            refill = None
            if q.limit is not None and q.limit > q.remaining and reset_s > 0:
                refill = (q.limit - q.remaining) / reset_s
            self._budgets[q.kind] = _Budget(q.remaining, now, now + reset_s, refill)

    def on_success(self) -> None:
        """Additive increase: one RECOVERY_STEP per round of effective_concurrency successes."""
        self._strikes = 0
        if self._factor < 1.0:
            self._factor = min(1.0, self._factor + RECOVERY_STEP / self.effective_concurrency)
            self._changed.set()


# --- circuit breaker ----------------------------------------------------------------------

BreakerState = Literal["closed", "open", "half_open"]


class CircuitBreaker:
    """Stops calls to a failing provider; after a cool-down one probe decides.

    Callers ask `allow()` before a request and report every allowed request with
    `record_success()` or `record_failure()`. A probe that never reports is given up
    after another cool-down, so a lost outcome cannot keep the breaker half-open.
    """

    def __init__(
        self,
        name: str,
        fail_max: int = 5,
        reset_timeout_s: float = 30.0,
        *,
        clock: Clock = time.monotonic,
    ) -> None:
        self.name, self.fail_max, self.reset_timeout_s = name, fail_max, reset_timeout_s
        self._clock = clock
        self._state: BreakerState = "closed"
        self.failures = 0  # consecutive
        self._since = 0.0  # when it opened, or when the probe went out

    @property
    def state(self) -> BreakerState:
        return self._state

    @property
    def probe_at(self) -> float:
        """Clock time from which allow() lets a probe through; 0.0 while closed."""
        return 0.0 if self._state == "closed" else self._since + self.reset_timeout_s

    def allow(self) -> bool:
        if self._state == "closed":
            return True
        if self._clock() - self._since < self.reset_timeout_s:
            return False  # still cooling down, or the probe is out
        if self._state == "open":
            self._set("half_open")
        self._since = self._clock()
        return True

    def record_success(self) -> None:
        self.failures = 0
        if self._state == "half_open":
            self._set("closed")

    def record_failure(self) -> None:
        self.failures += 1
        if self._state == "half_open" or (
            self._state == "closed" and self.failures >= self.fail_max
        ):
            self._since = self._clock()
            self._set("open")

    def _set(self, state: BreakerState) -> None:
        level = logging.WARNING if state == "open" else logging.INFO
        extra = {"provider": self.name, "failures": self.failures}
        breaker_log.log(
            level, "circuit breaker %s: %s -> %s", self.name, self._state, state, extra=extra
        )
        self._state = state
