"""The writer stage: coalesce finished work into one transaction per batch, then finish
the items that joined a vector while it was being written."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable

from syncer.db import Database
from syncer.observe import Events, Finished, Written
from syncer.targets.store import VectorStore, WriteBatch
from syncer.worker.inflight import InFlight

MAX_WRITE_ROWS = 256


class Writer:
    def __init__(
        self,
        pipeline: str,
        store: VectorStore,
        db: Database,
        in_flight: InFlight,
        events: Events,
        write_q: asyncio.Queue[WriteBatch],
    ) -> None:
        self.pipeline = pipeline
        self.store = store
        self.db = db
        self.in_flight = in_flight
        self.events = events
        self.write_q = write_q

    async def run(self) -> None:
        while True:
            batch = await self.write_q.get()
            while not self.write_q.empty() and len(batch) < MAX_WRITE_ROWS:
                batch.extend(self.write_q.get_nowait())
            started = time.perf_counter()
            written = await self.db.call(self.store.write, batch)
            elapsed_s = time.perf_counter() - started
            ages_s = self.in_flight.ages_s(batch.done_ids)
            traces = tuple(batch.traces)
            self.events.emit(Written(self.pipeline, written, elapsed_s, ages_s, traces))
            # Vectors the hash guard refused: the text changed and a newer item follows.
            batch.outcomes["stale"] += max(0, len(batch.keys) - written)
            if written == len(batch.keys):  # else which were refused is not known
                texts = zip(batch.keys, batch.hashes, strict=True)
                self.in_flight.wrote((k, h) for k, h in texts if h)
            self._finished(batch.outcomes.items())
            self.in_flight.finish(batch.done_ids)
            late: list[int] = []
            for text, ids in batch.joins:
                self.in_flight.forget(text, ids)
                late += ids
            if late:  # items that joined while their vector was being written: it is now
                await self.db.call(self.store.write, WriteBatch(done_ids=late))
                self._finished([("unchanged", len(late))])
                self.in_flight.finish(late)

    def _finished(self, outcomes: Iterable[tuple[str, int]]) -> None:
        for outcome, n in outcomes:
            if n:
                self.events.emit(Finished(self.pipeline, outcome, n))
