"""One pipeline's stages, joined by bounded queues, and their supervision.

claimer -> dispatcher -> embed_q (bounded by the in-flight window) -> embedding tasks (the
provider's limiter bounds the requests in flight) -> write_q -> writers (each batch one
transaction), with a heartbeat that extends the leases of what is in flight. Stop is soft
(unsent batches go back at once, requests on their way get `shutdown_timeout_s`), then hard
(what is left is released).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from syncer.chunking import SplitPool
from syncer.config import PipelineConfig, ProviderConfig, WorkerConfig
from syncer.db import Database
from syncer.observe import Events, InFlightChanged
from syncer.providers import Embedder
from syncer.queue import Queue
from syncer.retry import RetryPolicy
from syncer.targets import for_pipeline
from syncer.targets.store import VectorStore, WriteBatch
from syncer.worker.chunks import ChunkDispatcher, ChunkResults, splitter_for
from syncer.worker.claimer import Claimer
from syncer.worker.dispatcher import Dispatcher
from syncer.worker.embedding import Embedding, Results
from syncer.worker.failures import FailureRouter
from syncer.worker.inflight import InFlight
from syncer.worker.jobs import JobQueue
from syncer.worker.writer import Writer

log = logging.getLogger("syncer.worker")

WRITERS = 2  # one transaction commits while the next batch is being sent
RELEASE_TIMEOUT_S = 5.0  # at stop, with the database away: leave the items to their lease
STOP_CLAIMER_S = 0.5  # a claim in flight finishes (never strand one); a blocked put does not


def window(p: PipelineConfig, provider: ProviderConfig, wcfg: WorkerConfig) -> tuple[int, int, int]:
    """(texts per API request, items in flight at most, items per claim while busy)."""
    request_inputs = min(p.batch_size, provider.max_inputs_per_request)
    inputs = provider.max_concurrency * request_inputs * wcfg.in_flight_batches
    capacity = max(request_inputs, inputs // for_pipeline(p).inputs_per_item)
    # While busy, claim in chunks of a quarter of the window: every claim costs a claim and
    # a fetch round trip, and 64-row claims cannot keep 8 requests busy.
    return request_inputs, capacity, max(request_inputs, capacity // 4)


class PipelineRunner:
    def __init__(
        self,
        p: PipelineConfig,
        wcfg: WorkerConfig,
        queue: Queue,
        db: Database,
        store: VectorStore,
        embedder: Embedder,
        provider_name: str,
        provider: ProviderConfig,
        events: Events,
        wakeup: asyncio.Event,
    ) -> None:
        self.p = p
        self.wcfg = wcfg
        self.queue = queue
        self.db = db
        self.n_embedders = provider.max_concurrency
        request_inputs, capacity, claim_min = window(p, provider, wcfg)
        self.in_flight = InFlight(lambda n: events.emit(InFlightChanged(p.name, n)))
        self.embed_q = JobQueue(request_inputs, provider.max_tokens_per_request)
        write_q: asyncio.Queue[WriteBatch] = asyncio.Queue(maxsize=self.n_embedders * 4)
        policy = RetryPolicy(wcfg, provider.breaker_reset_s)
        failures = FailureRouter(p.name, queue, db, policy, self.in_flight, events)
        self.splits: SplitPool | None = None
        results: Results | None = None
        dispatcher: Dispatcher | ChunkDispatcher
        stages = (p, provider, request_inputs, store, db, self.in_flight, failures, self.embed_q)
        if p.target == "chunks":
            self.splits = SplitPool(splitter_for(p, provider), wcfg.split_workers)
            results = chunk_results = ChunkResults(self.in_flight)
            dispatcher = ChunkDispatcher(
                *stages, write_q, self.splits, chunk_results, events=events
            )
        else:
            dispatcher = Dispatcher(*stages, write_q, events=events)
        self.claimer = Claimer(
            p.name,
            wcfg,
            (capacity, claim_min),
            queue,
            db,
            embedder,
            self.in_flight,
            dispatcher,
            events,
            wakeup,
        )
        self.embedding = Embedding(
            p,
            provider_name,
            embedder,
            policy,
            wcfg.item_deadline_s,
            self.in_flight,
            failures,
            events,
            self.embed_q,
            write_q,
            results,
        )
        self.writer = Writer(p.name, store, db, self.in_flight, events, write_q)

    async def run(self, stop: asyncio.Event, exit_when_idle: bool) -> None:
        """Run until stop is set (or, with exit_when_idle, until nothing is left)."""
        name = self.p.name
        tasks = [
            asyncio.create_task(self.embedding.run(), name=f"{name}-embed-{i}")
            for i in range(self.n_embedders)
        ]
        tasks += [
            asyncio.create_task(self.writer.run(), name=f"{name}-write-{i}") for i in range(WRITERS)
        ]
        tasks.append(asyncio.create_task(self._heartbeat(), name=f"{name}-heartbeat"))
        claimer = asyncio.create_task(self.claimer.run(stop, exit_when_idle), name=f"{name}-claim")
        tasks.append(asyncio.create_task(self._cancel_claimer_on_stop(claimer, stop)))
        try:
            try:
                await supervise(claimer, tasks)
            except asyncio.CancelledError:
                if not (stop.is_set() and claimer.cancelled()):
                    raise
            await supervise(asyncio.create_task(self._soft_stop()), tasks)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if self.splits is not None:
                self.splits.close()
            if len(self.in_flight):
                # Hard stop: hand unfinished items back now instead of at lease end.
                left = self.in_flight.ids()
                if await self._release(left):
                    log.warning(
                        "released unfinished items", extra={"pipeline": name, "n": len(left)}
                    )

    async def _cancel_claimer_on_stop(
        self, claimer: asyncio.Task[None], stop: asyncio.Event
    ) -> None:
        """The claimer may be blocked on a full write queue (a slow database) and not see
        the stop: cancel it. Its claimed items are in flight, so they are finished or
        released like the others."""
        await stop.wait()
        done, _ = await asyncio.wait([claimer], timeout=STOP_CLAIMER_S)
        if not done:
            claimer.cancel()

    async def _soft_stop(self) -> None:
        # Batches not yet sent go back at once (another replica may take them); the
        # deadline is for the requests already on their way.
        unsent = [i for job in self.embed_q.drain() for i in job.all_ids()]
        if unsent:
            await self._release(unsent)
            self.in_flight.finish(unsent)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.wcfg.shutdown_timeout_s):
                await self.in_flight.drained()

    async def _release(self, ids: list[int]) -> bool:
        """Hand items back at once, for another replica; if the database is away, they come
        back when their lease ends."""
        try:
            async with asyncio.timeout(RELEASE_TIMEOUT_S):
                await self.db.call(self.queue.release, ids)
        except TimeoutError:
            log.warning(
                "could not release unfinished items (database unavailable): they return to "
                "the queue when their lease ends",
                extra={"pipeline": self.p.name, "n": len(ids)},
            )
            return False
        return True

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self.wcfg.lease_s / 3)
            ids = self.in_flight.ids()
            await self.db.call(self.queue.extend, ids)


async def supervise(main: asyncio.Future[Any], helpers: list[asyncio.Task[None]]) -> None:
    """Wait for main; if a helper fails first, stop with its error instead of limping on."""
    pending = {main, *helpers}
    while main in pending:
        done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        for t in done:
            if t is not main and not t.cancelled() and t.exception() is not None:
                main.cancel()
                # A cancelled gather may still end with an exception: it is not this error.
                main.add_done_callback(_retrieve)
                t.result()  # raises the helper's error
    main.result()


def _retrieve(f: asyncio.Future[Any]) -> None:
    if not f.cancelled():
        f.exception()
