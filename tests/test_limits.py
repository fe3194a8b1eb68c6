"""Unit tests for syncer.providers.limits: no database, no network.

Rate-limit tests run on a virtual-time event loop: when every task waits, the clock jumps
to the next timer, so minutes of limiter behaviour take milliseconds and nothing depends on
how loaded the machine is. The limiter is given that loop's clock.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import random
import selectors
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, TypeVar

import pytest

from syncer.providers.limits import CircuitBreaker, ProviderLimiter
from syncer.providers.openai import read_quota

T = TypeVar("T")
Clock = Callable[[], float]


class _VirtualSelector(selectors.DefaultSelector):
    now = 0.0

    def select(self, timeout: float | None = None) -> list[Any]:
        if timeout is None:
            raise RuntimeError("deadlock: every task waits and no timer is set")
        self.now += max(0.0, timeout)  # jump to the next timer instead of sleeping
        return super().select(0)


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    def __init__(self) -> None:
        self._virtual = _VirtualSelector()
        super().__init__(self._virtual)

    def time(self) -> float:
        return self._virtual.now


def run_virtual(main: Callable[[Clock], Coroutine[Any, Any, T]]) -> T:
    loop = VirtualTimeLoop()
    try:
        return loop.run_until_complete(main(loop.time))
    finally:
        loop.close()


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def wait_until(condition: Callable[[], bool], timeout_s: float) -> None:
    """Poll a condition that no event signals (the breaker only reads the clock)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met before the deadline"
        await asyncio.sleep(0.01)


def on_headers(limiter: ProviderLimiter, headers: dict[str, str]) -> None:
    """The OpenAI protocol's headers, as the guarded client hands them to the limiter."""
    limiter.on_quota(read_quota(headers))


def state(breaker: CircuitBreaker) -> str:
    return breaker.state  # a plain str, so mypy does not narrow it between calls


def most_in_any_window(starts: Sequence[float], amounts: Sequence[float], window_s: float) -> float:
    """The largest sum of amounts started within any half-open window [t, t + window_s)."""
    order = sorted(range(len(starts)), key=lambda i: starts[i])
    times = [starts[i] for i in order]
    prefix = [0.0]
    for i in order:
        prefix.append(prefix[-1] + amounts[i])
    return max(
        prefix[bisect.bisect_left(times, t + window_s)] - prefix[k] for k, t in enumerate(times)
    )


# --- rate limiting ------------------------------------------------------------------------


async def _run_senders(
    limiter: ProviderLimiter,
    clock: Clock,
    tokens: Sequence[int],
    hold_s: Callable[[int], float] = lambda _: 0.5,
    arrive_s: Callable[[int], float] = lambda _: 0.0,
) -> list[float]:
    """Send one request per entry of tokens; return each request's start time."""
    starts = [0.0] * len(tokens)

    async def send(i: int) -> None:
        await asyncio.sleep(arrive_s(i))
        async with limiter.slot(tokens[i]):
            starts[i] = clock()
            await asyncio.sleep(hold_s(i))

    await asyncio.gather(*(send(i) for i in range(len(tokens))))
    return starts


def test_rpm_is_never_exceeded_in_any_sliding_minute() -> None:
    async def main(clock: Clock) -> list[float]:
        limiter = ProviderLimiter("p", max_concurrency=50, rpm=120, tpm=None, clock=clock)
        return await _run_senders(limiter, clock, [10] * 400)

    starts = run_virtual(main)
    assert most_in_any_window(starts, [1] * len(starts), 60.0) == 120
    # 400 requests paced evenly at 120 a minute (after a one-second burst): no slower
    assert max(starts) <= 400 * 60 / 120 + 2


def test_rpm_holds_with_random_arrivals_and_durations() -> None:
    rng = random.Random(11)
    arrive = [rng.uniform(0, 300) for _ in range(600)]
    hold = [rng.expovariate(2.0) for _ in range(600)]

    async def main(clock: Clock) -> list[float]:
        limiter = ProviderLimiter("p", max_concurrency=8, rpm=90, tpm=None, clock=clock)
        return await _run_senders(limiter, clock, [1] * 600, hold.__getitem__, arrive.__getitem__)

    starts = run_virtual(main)
    assert most_in_any_window(starts, [1] * 600, 60.0) <= 90


def test_tpm_is_never_exceeded_and_an_oversized_request_goes_alone() -> None:
    rng = random.Random(5)
    tokens = [rng.randint(1, 400) for _ in range(150)]
    tokens[40] = tokens[100] = 2500  # above the whole tpm: must still go, alone

    async def main(clock: Clock) -> list[float]:
        limiter = ProviderLimiter("p", max_concurrency=20, rpm=None, tpm=1000, clock=clock)
        return await _run_senders(limiter, clock, tokens)

    starts = run_virtual(main)
    capped = [min(n, 1000) for n in tokens]
    assert most_in_any_window(starts, capped, 60.0) <= 1000
    for big in (40, 100):
        others = [s for i, s in enumerate(starts) if i != big]
        assert all(abs(s - starts[big]) >= 60.0 for s in others)


def test_concurrency_is_bounded() -> None:
    rng = random.Random(2)
    hold = [rng.uniform(0.1, 2.0) for _ in range(40)]

    async def main(clock: Clock) -> int:
        limiter = ProviderLimiter("p", max_concurrency=3, rpm=None, tpm=None, clock=clock)
        active = peak = 0

        async def send(i: int) -> None:
            nonlocal active, peak
            async with limiter.slot(1):
                active += 1
                peak = max(peak, active)
                await asyncio.sleep(hold[i])
                active -= 1

        await asyncio.gather(*(send(i) for i in range(40)))
        assert limiter.in_flight == 0 and limiter.waiting == 0
        return peak

    assert run_virtual(main) == 3


def test_waiters_start_in_arrival_order_so_a_large_request_is_not_starved() -> None:
    async def main(clock: Clock) -> list[float]:
        limiter = ProviderLimiter("p", max_concurrency=10, rpm=None, tpm=1000, clock=clock)
        # 900 tokens now; then 800 (must wait a minute); then small ones that would fit now.
        tokens = [900, 800, 50, 50, 50]
        return await _run_senders(limiter, clock, tokens, arrive_s=lambda i: i * 0.01)

    starts = run_virtual(main)
    assert starts == sorted(starts)
    assert starts[1] >= 60.0


def test_a_cancelled_waiter_takes_no_slot() -> None:
    async def main(clock: Clock) -> None:
        limiter = ProviderLimiter("p", max_concurrency=1, rpm=None, tpm=None, clock=clock)
        async with limiter.slot(1):
            waiter = asyncio.create_task(limiter.slot(1).__aenter__())
            await asyncio.sleep(1)
            assert limiter.waiting == 1
            waiter.cancel()
            await asyncio.gather(waiter, return_exceptions=True)
        async with asyncio.timeout(1), limiter.slot(1):
            assert limiter.in_flight == 1
        assert limiter.in_flight == limiter.waiting == 0

    run_virtual(main)


def test_a_429_pauses_every_sender_until_retry_after() -> None:
    async def main(clock: Clock) -> tuple[float, list[float]]:
        limiter = ProviderLimiter("p", max_concurrency=1, rpm=None, tpm=None, clock=clock)
        waiting = None
        async with limiter.slot(1):
            # Others queue up behind the request that will be answered with a 429.
            waiting = asyncio.create_task(_run_senders(limiter, clock, [1] * 3, lambda _: 0))
            await asyncio.sleep(0.1)
            limiter.on_rate_limited(5.0)
            rate_limited_at = clock()
            assert limiter.paused_until == pytest.approx(rate_limited_at + 5.0)
        return rate_limited_at, await waiting

    rate_limited_at, starts = run_virtual(main)
    assert min(starts) >= rate_limited_at + 5.0


def test_a_429_without_retry_after_backs_off_1s_doubling_jittered_capped() -> None:
    clock = FakeClock()
    limiter = ProviderLimiter("p", max_concurrency=4, rpm=None, tpm=None, clock=clock)
    pauses = []
    for _ in range(10):
        limiter.on_rate_limited(None)
        pauses.append(limiter.paused_until - clock.now)
        clock.now = limiter.paused_until + 1.0  # the pause is over; the next 429 arrives
    for n, pause in enumerate(pauses):
        full = min(60.0, 2.0**n)
        assert full / 2 <= pause <= full
    limiter.on_success()  # the streak ends: back to 1 s
    limiter.on_rate_limited(None)
    assert limiter.paused_until - clock.now <= 1.0
    assert limiter.rate_limited == 11


def test_aimd_halves_once_per_episode_then_recovers_gradually() -> None:
    clock = FakeClock()
    limiter = ProviderLimiter("p", max_concurrency=16, rpm=600, tpm=60_000, clock=clock)
    limiter.on_rate_limited(2.0)
    limiter.on_rate_limited(2.0)  # an answer to a request sent before the cut: no second cut
    assert (limiter.effective_rpm, limiter.effective_tpm) == (300, 30_000)
    assert limiter.effective_concurrency == 8
    clock.now += 3.0
    limiter.on_rate_limited(None)  # a new episode
    assert (limiter.effective_rpm, limiter.effective_concurrency) == (150, 4)

    seen = [limiter.effective_rpm or 0]
    for _ in range(4):  # one round of 4 requests in flight adds 5 % of the configured rpm
        limiter.on_success()
        seen.append(limiter.effective_rpm or 0)
    assert seen == sorted(seen) and seen[-1] == pytest.approx(180)
    for _ in range(500):
        limiter.on_success()
    assert (limiter.effective_rpm, limiter.effective_tpm) == (600, 60_000)
    assert limiter.effective_concurrency == 16


def test_after_a_cut_the_window_admits_only_the_effective_rpm() -> None:
    async def main(clock: Clock) -> tuple[list[float], ProviderLimiter]:
        limiter = ProviderLimiter("p", max_concurrency=200, rpm=120, tpm=None, clock=clock)
        first = await _run_senders(limiter, clock, [1] * 120)
        limiter.on_rate_limited(0.0)  # halves the effective rpm to 60
        return first + await _run_senders(limiter, clock, [1] * 180), limiter

    starts, limiter = run_virtual(main)
    assert limiter.effective_rpm == 60 and limiter.started == 300
    assert most_in_any_window(starts[120:], [1] * 180, 60.0) == 60
    assert min(starts[120:]) >= 60.0  # the first minute's 120 must leave the window first


def test_aimd_floors_at_one() -> None:
    limiter = ProviderLimiter("p", max_concurrency=2, rpm=3, tpm=10, clock=FakeClock())
    for _ in range(20):
        limiter.on_rate_limited(0.0)
        limiter._cut_until = 0.0  # let every 429 count as its own episode
    assert limiter.effective_concurrency == 1
    assert limiter.effective_rpm == limiter.effective_tpm == 1


def test_headers_with_no_requests_left_pause_until_the_reset() -> None:
    async def main(clock: Clock) -> tuple[float, float]:
        limiter = ProviderLimiter("p", max_concurrency=4, rpm=None, tpm=None, clock=clock)
        on_headers(
            limiter, {"X-RateLimit-Remaining-Requests": "0", "x-ratelimit-reset-requests": "2s"}
        )
        assert limiter.paused_until == pytest.approx(clock() + 2.0)
        asked = clock()
        async with limiter.slot(1):
            return asked, clock()

    asked, started = run_virtual(main)
    assert started == pytest.approx(asked + 2.0)


def test_headers_with_too_few_tokens_left_hold_the_request_that_does_not_fit() -> None:
    async def main(clock: Clock) -> list[float]:
        limiter = ProviderLimiter("p", max_concurrency=4, rpm=None, tpm=None, clock=clock)
        on_headers(
            limiter, {"x-ratelimit-remaining-tokens": "100", "x-ratelimit-reset-tokens": "1.5s"}
        )
        return await _run_senders(limiter, clock, [50, 80], arrive_s=lambda i: i * 0.01)

    first, second = run_virtual(main)
    assert first == 0.0
    assert second == pytest.approx(1.5)


def test_headers_with_a_limit_wait_only_for_the_refill_needed() -> None:
    async def main(clock: Clock) -> float:
        limiter = ProviderLimiter("p", max_concurrency=4, rpm=None, tpm=None, clock=clock)
        headers = {
            "x-ratelimit-limit-tokens": "1000",
            "x-ratelimit-remaining-tokens": "0",
            "x-ratelimit-reset-tokens": "1m0s",
        }
        on_headers(limiter, headers)  # refills 1000 tokens a minute
        async with limiter.slot(100):
            return clock()

    assert run_virtual(main) == pytest.approx(6.0)


def test_headers_that_cannot_be_read_are_ignored_and_resets_are_capped() -> None:
    clock = FakeClock()
    limiter = ProviderLimiter("p", max_concurrency=4, rpm=None, tpm=None, clock=clock)
    on_headers(
        limiter, {"x-ratelimit-remaining-requests": "lots", "x-ratelimit-reset-requests": "1s"}
    )
    on_headers(limiter, {"x-ratelimit-remaining-tokens": "0", "x-ratelimit-reset-tokens": "soon"})
    assert limiter.paused_until <= clock.now
    on_headers(
        limiter, {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "6m0s"}
    )
    assert limiter.paused_until == pytest.approx(clock.now + 60.0)


async def test_the_default_clock_works_on_a_real_loop() -> None:
    limiter = ProviderLimiter("p", max_concurrency=2, rpm=None, tpm=None)
    on_headers(
        limiter, {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "50ms"}
    )
    asked = time.monotonic()
    async with asyncio.timeout(5), limiter.slot(1):
        assert time.monotonic() - asked >= 0.045


def test_limiter_rejects_bad_limits() -> None:
    with pytest.raises(ValueError):
        ProviderLimiter("p", max_concurrency=0, rpm=None, tpm=None)
    with pytest.raises(ValueError):
        ProviderLimiter("p", max_concurrency=1, rpm=0, tpm=None)


# --- circuit breaker ----------------------------------------------------------------------


def test_breaker_opens_after_consecutive_failures_only() -> None:
    breaker = CircuitBreaker("p", fail_max=3, reset_timeout_s=10, clock=FakeClock())
    for _ in range(2):
        breaker.record_failure()
    breaker.record_success()  # not consecutive any more
    for _ in range(2):
        breaker.record_failure()
    assert state(breaker) == "closed" and breaker.allow()
    breaker.record_failure()
    assert state(breaker) == "open"
    assert not breaker.allow()


def test_breaker_half_opens_for_exactly_one_probe_after_the_cool_down() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker("p", fail_max=1, reset_timeout_s=10, clock=clock)
    breaker.record_failure()
    assert breaker.probe_at == clock.now + 10
    clock.now += 9.9
    assert not breaker.allow()
    clock.now += 0.1
    assert breaker.allow()
    assert state(breaker) == "half_open"
    assert not breaker.allow()  # the probe is out
    breaker.record_success()
    assert state(breaker) == "closed" and breaker.allow() and breaker.allow()
    assert breaker.probe_at == 0.0


def test_breaker_reopens_on_a_failed_probe() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker("p", fail_max=2, reset_timeout_s=10, clock=clock)
    breaker.record_failure()
    breaker.record_failure()
    clock.now += 10
    assert breaker.allow()
    breaker.record_failure()
    assert state(breaker) == "open"
    clock.now += 5
    assert not breaker.allow()
    clock.now += 5
    assert breaker.allow() and state(breaker) == "half_open"


def test_breaker_gives_up_a_probe_that_never_reports() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker("p", fail_max=1, reset_timeout_s=10, clock=clock)
    breaker.record_failure()
    clock.now += 10
    assert breaker.allow()
    clock.now += 10  # the probe's outcome was lost
    assert breaker.allow()


def test_breaker_logs_state_changes_with_the_provider_name(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock()
    breaker = CircuitBreaker("openai", fail_max=1, reset_timeout_s=1, clock=clock)
    with caplog.at_level(logging.INFO, logger="syncer.breaker"):
        breaker.record_failure()
        clock.now += 1
        breaker.allow()
        breaker.record_success()
    messages = [r.getMessage() for r in caplog.records if r.name == "syncer.breaker"]
    assert messages == [
        "circuit breaker openai: closed -> open",
        "circuit breaker openai: open -> half_open",
        "circuit breaker openai: half_open -> closed",
    ]
    assert all(getattr(r, "provider", None) == "openai" for r in caplog.records)


async def test_breaker_half_opens_on_the_real_clock() -> None:
    breaker = CircuitBreaker("p", fail_max=1, reset_timeout_s=0.2)
    breaker.record_failure()
    opened = time.monotonic()
    assert not breaker.allow()
    await wait_until(breaker.allow, timeout_s=5.0)
    assert time.monotonic() - opened >= 0.2
    assert state(breaker) == "half_open"
    breaker.record_success()
    assert state(breaker) == "closed"


async def test_settled_tokens_free_the_estimate_s_excess() -> None:
    """The estimate errs high; the provider's count replaces it, so the quota is not wasted."""
    now = [0.0]
    limiter = ProviderLimiter("p", max_concurrency=4, rpm=None, tpm=1000, clock=lambda: now[0])
    async with limiter.slot(900) as reservation:
        reservation.settle(300)  # the provider counted 300 tokens, not 900
    now[0] = 20.0  # the pace owes 300 tokens' worth (18 s), not 900 (54 s)
    async with asyncio.timeout(1):  # 600 more fit now; without settle it would wait a minute
        async with limiter.slot(600):
            pass
    with pytest.raises(TimeoutError):  # and the window is really full at 900 now
        async with asyncio.timeout(0.2):
            async with limiter.slot(200):
                pass
