"""The claimer: claims only as many items as there are free slots, and hands them to the
dispatcher; waits on a wake-up, a freed slot, the poll or the stop, whichever comes first."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

from syncer.aio import wait_first
from syncer.capture import always_caught_up
from syncer.config import WorkerConfig
from syncer.db import Database
from syncer.observe import Claimed, Events, new_trace_id, tracing
from syncer.providers import Embedder
from syncer.queue import Item, Queue
from syncer.worker.inflight import InFlight
from syncer.worker.pause import Pauses


class Dispatch(Protocol):
    """Takes claimed items on (the dispatcher for rows, or for chunked documents)."""

    async def dispatch(self, items: list[Item]) -> None: ...


class ProviderPaused(Exception):
    """Raised out of an --exit-when-idle run when a provider refuses every request."""


class Claimer:
    def __init__(
        self,
        pipeline: str,
        wcfg: WorkerConfig,
        window: tuple[int, int],  # (items in flight at most, items per claim while busy)
        queue: Queue,
        db: Database,
        embedder: Embedder,
        in_flight: InFlight,
        dispatcher: Dispatch,
        events: Events,
        wakeup: asyncio.Event,
    ) -> None:
        self.pipeline = pipeline
        self.poll_interval_s = wcfg.poll_interval_s
        self.bulk_share = wcfg.bulk_share
        self.capacity, self.claim_min = window
        self.queue = queue
        self.db = db
        self.embedder = embedder
        self.in_flight = in_flight
        self.dispatcher = dispatcher
        self.events = events
        self.wakeup = wakeup
        self.capture_caught_up: Callable[[], Awaitable[bool]] = always_caught_up
        self.pauses: Pauses | None = None  # `syncer pause`: claim nothing meanwhile

    async def run(self, stop: asyncio.Event, exit_when_idle: bool) -> None:
        """Until stop is set (or, with exit_when_idle, until nothing is left)."""
        freed = self.in_flight.freed
        while not stop.is_set():
            if self.pauses is not None and self.pauses.is_paused(self.pipeline):
                if exit_when_idle:
                    return  # nothing will be claimed: as idle as this run gets
                self.wakeup.clear()  # what it announces is claimed on resume
                await wait_first(stop, self.pauses.resumed(self.pipeline))
                continue
            wait_s = self.embedder.ready_in_s()
            if wait_s > 0:
                # Open breaker, 429 pause or a refusing provider: claim nothing meanwhile.
                if exit_when_idle and self.embedder.refused_error:
                    raise ProviderPaused(self.embedder.refused_error)
                await wait_first(stop, timeout_s=wait_s)
                continue
            free = self.capacity - len(self.in_flight)
            if free <= 0:
                freed.clear()
                await wait_first(stop, freed)
                continue
            # While the window is nearly full, a claim waits for a quarter of it to free up
            # (each claim is two round trips), unless woken: a live edit is taken at once and
            # goes out in the next free request, ahead of the bulk work already waiting.
            busy = free < self.claim_min and len(self.in_flight) > 0
            if busy and not self.wakeup.is_set():
                freed.clear()
                await wait_first(stop, freed, self.wakeup)
                continue
            self.wakeup.clear()
            started = time.perf_counter()
            items = await self.db.call(self.queue.claim, self.pipeline, free, self.bulk_share)
            if items:
                seconds = time.perf_counter() - started
                # The batch's trace id: its jobs and write batches carry it to the commit.
                with tracing(new_trace_id(), self.pipeline):
                    key = items[0].key if len(items) == 1 else None
                    self.events.emit(Claimed(self.pipeline, len(items), key, seconds))
                    self.in_flight.add(items)
                    await self.dispatcher.dispatch(items)
                if len(items) == free:
                    continue  # a full claim: more is likely waiting
            elif exit_when_idle and not len(self.in_flight) and await self._idle():
                return
            wake = [stop, self.wakeup]
            if busy:
                freed.clear()
                wake.append(freed)
            elif exit_when_idle and len(self.in_flight):
                # The last items finishing may leave nothing to do: look again then.
                freed.clear()
                wake.append(freed)
            await wait_first(*wake, timeout_s=await self._poll_s(exit_when_idle))

    async def _idle(self) -> bool:
        # Capture first: what it has caught up with is queued by then, so the count sees it.
        if not await self.capture_caught_up():
            return False
        return await self.db.call(self.queue.pending, [self.pipeline]) == 0

    async def _poll_s(self, exit_when_idle: bool) -> float:
        poll_s = self.poll_interval_s * random.uniform(0.8, 1.2)
        if exit_when_idle and not len(self.in_flight):
            nxt = await self.db.call(self.queue.next_ready_s, [self.pipeline])
            if nxt is not None:
                poll_s = min(poll_s, max(0.01, nxt))
        return poll_s
