"""Provider limits: token estimates, request packing, rate limiting and a circuit breaker.

Touches neither the database nor HTTP. One ProviderLimiter and one CircuitBreaker per
provider, shared by every pipeline using it in the process: the embedder takes a `slot()`
before each request and reports back what the provider answered.

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
import math
import random
import re
import string
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
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

# --- token estimates ----------------------------------------------------------------------


def _all_but(first: int, last: int) -> bytes:
    return bytes(b for b in range(256) if not first <= b <= last)


_ALL_BUT_3_BYTE_LEADS = _all_but(0xE0, 0xEF)  # U+0800..U+FFFF
_ALL_BUT_4_BYTE_LEADS = _all_but(0xF0, 0xF7)  # U+10000 and above
# U+3000..U+D7FF: CJK symbols, kana, ideographs, hangul; cl100k/o200k take ~1 token a char.
_ALL_BUT_CJK_LEADS = _all_but(0xE3, 0xED)
# Pieces that are at least one token each: words, up to 3 digits, 2 punctuation marks, line
# breaks. This catches what bytes/3 misses, e.g. "a b c d" or one word per line.
_PIECE = re.compile(r"[^\W\d_]+|\d{1,3}|[^\w\s]{1,2}|[\r\n]+")
_SPACE = re.compile(r"\s")
_LETTERS_AND_BLANKS = (string.ascii_letters + " \t\f\v").encode("ascii")


def estimate_tokens(text: str) -> int:
    """An offline estimate of cl100k/o200k tokens that errs high.

    Cost by character: UTF-8 bytes / 3 below U+0800 (ASCII, Latin, Greek, Cyrillic, Arabic,
    Hebrew); 1.5 in U+3000..U+D7FF (CJK, kana, hangul); one per UTF-8 byte for any other
    character (Indic and South-East Asian scripts, emoji, symbols), which is a byte-level
    BPE's hard upper bound. The result is at least the number of words, 3-digit groups,
    punctuation pairs and line breaks, which covers "a b c" and one word per line.

    How far off (real / estimate): English prose (~4 chars a token) 0.7-0.8; Cyrillic or
    Greek ~0.6; Chinese, Japanese, Korean 0.5-0.9 on cl100k, less on o200k; Indic, Thai,
    emoji 0.3-1. Known under-estimates, up to 2x but only for those characters: rare CJK
    characters that cl100k splits into bytes, and runs of unusual ASCII symbols.
    """
    if not text:
        return 0
    cost = math.ceil(_byte_cost(text))
    return max(cost, _pieces(text, cost))


def _byte_cost(text: str) -> float:
    if text.isascii():
        return len(text) / 3
    raw = text.encode("utf-8", "surrogatepass")  # never raise on a stray surrogate
    # Counting UTF-8 lead bytes is ~20x faster than a regex over the characters.
    n3 = len(raw.translate(None, _ALL_BUT_3_BYTE_LEADS))
    n4 = len(raw.translate(None, _ALL_BUT_4_BYTE_LEADS))
    n_cjk = len(raw.translate(None, _ALL_BUT_CJK_LEADS))
    wide_bytes = 3 * n3 + 4 * n4
    return (len(raw) - wide_bytes) / 3 + 1.5 * n_cjk + (wide_bytes - 3 * n_cjk)


def _pieces(text: str, at_most_needed: int) -> int:
    """The number of _PIECE matches, or 0 when a cheap bound shows it cannot matter."""
    if len(text) <= at_most_needed:  # a piece is at least one character (CJK text)
        return 0
    if text.isascii():
        # Letter runs <= chunks + others; digit groups, punctuation pairs and line breaks
        # <= others. The regex costs ~100 ns a character; this bound ~10 ns.
        others = len(text.encode("ascii").translate(None, _LETTERS_AND_BLANKS))
        # Words <= blanks + 1; counting is 4x cheaper than text.split().
        words = text.count(" ") + text.count("\t") + text.count("\f") + text.count("\v") + 1
        if words + 2 * others <= at_most_needed:
            return 0
    return len(_PIECE.findall(text))


def truncate_to_tokens(text: str, max_tokens: int) -> str:
    """The longest prefix whose estimate fits, cut at whitespace when one is near the end."""
    if estimate_tokens(text) <= max_tokens:
        return text
    if max_tokens <= 0:
        return ""
    # Every character costs at least 1/3 token, so the cut is within 3 * max_tokens chars.
    lo, hi = 0, min(len(text), 3 * max_tokens)
    while lo < hi:  # invariant: text[:lo] fits
        mid = (lo + hi + 1) // 2
        if estimate_tokens(text[:mid]) <= max_tokens:
            lo = mid
        else:
            hi = mid - 1
    # Prefer not to cut a word in half, unless that throws away a long stretch.
    spaces = [m.start() for m in _SPACE.finditer(text, max(1, lo - 200), lo + 1)]
    kept = text[: spaces[-1]].rstrip() if spaces else ""
    return kept or text[:lo]


def pack_requests(token_counts: Sequence[int], max_inputs: int, max_tokens: int) -> list[list[int]]:
    """Split input indices, in order, into requests of <= max_inputs and <= max_tokens.

    An input alone above max_tokens gets a request of its own (too-long inputs are the
    caller's to truncate or reject first).
    """
    if max_inputs < 1 or max_tokens < 1:
        raise ValueError("max_inputs and max_tokens must be at least 1")
    out: list[list[int]] = []
    cur: list[int] = []
    cur_tokens = 0
    for i, n in enumerate(token_counts):
        if cur and (len(cur) >= max_inputs or cur_tokens + n > max_tokens):
            out.append(cur)
            cur, cur_tokens = [], 0
        cur.append(i)
        cur_tokens += n
    if cur:
        out.append(cur)
    return out


_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_UNIT_S = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1, "m": 60, "h": 3600}


def parse_duration(value: str) -> float | None:
    """Seconds from a rate-limit reset header: "1s", "6m0s", "20ms", "1.5s", or "2" (seconds)."""
    value = value.strip()
    with contextlib.suppress(ValueError):
        seconds = float(value)
        return seconds if seconds >= 0 and math.isfinite(seconds) else None
    parts = list(_DURATION_PART.finditer(value))
    if not parts or "".join(p.group(0) for p in parts) != value:
        return None
    return sum(float(p.group(1)) * _UNIT_S[p.group(2)] for p in parts)


# --- rate limiting ------------------------------------------------------------------------


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

    def on_headers(self, headers: Mapping[str, str]) -> None:
        """Read x-ratelimit-{remaining,reset,limit}-{requests,tokens} to slow down in time."""
        lower = {k.lower(): v for k, v in headers.items()}
        now = self._clock()
        for kind in ("requests", "tokens"):
            remaining = _number(lower.get(f"x-ratelimit-remaining-{kind}"))
            reset_s = parse_duration(lower.get(f"x-ratelimit-reset-{kind}") or "")
            if remaining is None or reset_s is None:
                continue
            reset_s = min(reset_s, MAX_PAUSE_S)
            limit = _number(lower.get(f"x-ratelimit-limit-{kind}"))
            refill = None
            if limit is not None and limit > remaining and reset_s > 0:
                refill = (limit - remaining) / reset_s
            self._budgets[kind] = _Budget(remaining, now, now + reset_s, refill)

    def on_success(self) -> None:
        """Additive increase: one RECOVERY_STEP per round of effective_concurrency successes."""
        self._strikes = 0
        if self._factor < 1.0:
            self._factor = min(1.0, self._factor + RECOVERY_STEP / self.effective_concurrency)
            self._changed.set()


def _number(value: str | None) -> float | None:
    with contextlib.suppress(ValueError):
        n = float(value or "")
        return n if math.isfinite(n) and n >= 0 else None
    return None


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
