"""Event-loop lag, from time.monotonic() deltas of a periodic timer, and the allocation
growth report of SYNCER_TRACEMALLOC."""

from __future__ import annotations

import asyncio
import logging
import os
import time
import tracemalloc
from collections.abc import Callable

from syncer.observe import Event, LoopLag

log = logging.getLogger("syncer.loop")

TICK_S = 0.25  # how often the timer asks to run; its lateness is the lag
UNHEALTHY_AFTER_S = 10.0  # lag over the threshold this long fails /healthz
LOG_EVERY_S = 10.0  # at most one lag warning this often
TRACEMALLOC_TOP = 10


class LoopWatch:
    """Measures how late the loop runs a timer; lag above `warn_s` is logged (once every
    LOG_EVERY_S), and lag that stays above it UNHEALTHY_AFTER_S makes `healthy` false."""

    def __init__(self, warn_s: float, emit: Callable[[Event], None]) -> None:
        self.warn_s = warn_s
        self.emit = emit
        self.lag_s = 0.0
        self._over_since: float | None = None
        self._logged_at = -LOG_EVERY_S

    @property
    def healthy(self) -> bool:
        since = self._over_since
        return since is None or time.monotonic() - since < UNHEALTHY_AFTER_S

    async def run(self) -> None:
        while True:
            asked = time.monotonic()
            await asyncio.sleep(TICK_S)
            self.record(max(0.0, time.monotonic() - asked - TICK_S))

    def record(self, lag_s: float) -> None:
        now = time.monotonic()
        self.lag_s = lag_s
        self.emit(LoopLag(lag_s))
        if lag_s <= self.warn_s:
            self._over_since = None
            return
        if self._over_since is None:
            self._over_since = now
        if now - self._logged_at >= LOG_EVERY_S:
            self._logged_at = now
            log.warning(
                "event loop lag over observe.loop_lag_warn_s",
                extra={"lag_s": round(lag_s, 4), "warn_s": self.warn_s},
            )


def tracemalloc_every_s(env: dict[str, str] | None = None) -> float | None:
    """SYNCER_TRACEMALLOC=N: report the top allocation growth every N seconds."""
    value = (os.environ if env is None else env).get("SYNCER_TRACEMALLOC", "")
    try:
        every_s = float(value)
    except ValueError:
        return None
    return every_s if every_s > 0 else None


async def report_allocations(every_s: float) -> None:
    """Log where memory grew most since the last report (one line each, for grep)."""
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    while True:
        await asyncio.sleep(every_s)
        now = tracemalloc.take_snapshot()
        top = now.compare_to(before, "lineno")[:TRACEMALLOC_TOP]
        before = now
        for stat in top:
            frame = stat.traceback[0]
            log.info(
                "allocation growth",
                extra={
                    "where": f"{frame.filename}:{frame.lineno}",
                    "size_diff_b": stat.size_diff,
                    "count_diff": stat.count_diff,
                },
            )
