"""One cheap query every few seconds per process for the gauges that live in the
database (queue depth and lag, dead letters, the schema version, the slot's lag), so that a
scrape costs the database nothing however often it comes."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from typing import Any

import asyncpg

from syncer.db import LOST, Database
from syncer.monitor.health import Health
from syncer.observe import CoverageSampled, Event, ProcessSampled, QueueSampled, Written
from syncer.providers import Embedder, GuardedClient
from syncer.schema.migrations import missing_versions
from syncer.schema.render import PipelineSQL
from syncer.sqlfiles import query

log = logging.getLogger("syncer.monitor")

SAMPLE_S = 2.0  # a lost database shows in /readyz within this and the probe's first try
SAMPLE_TIMEOUT_S = 5.0
# Coverage reads the source table (a sample of it above status.COVERAGE_EXACT_ROWS): once a
# minute per process is enough for an alert that waits 30 min.
COVERAGE_SAMPLE_S = 60.0

SlotLag = Callable[[asyncpg.Connection], Awaitable[asyncpg.Record | None]]


class Sampler:
    def __init__(
        self,
        db: Database,
        health: Health,
        embedders: Mapping[str, Embedder],
        emit: Callable[[Event], None],
        slot_lag: SlotLag | None = None,
        worker_id: str = "",
    ) -> None:
        self.db = db
        self.health = health
        self.embedders = embedders
        self.emit = emit
        self.slot_lag = slot_lag
        self.worker_id = worker_id
        self.last_writes: dict[str, datetime] = {}  # since the last sample, by pipeline
        self.rendered: Mapping[str, PipelineSQL] = {}  # the pipelines whose coverage it samples

    def written(self, event: Event) -> None:
        """A subscriber: note when each pipeline last committed, for the next sample."""
        if isinstance(event, Written) and event.n:
            self.last_writes[event.pipeline] = datetime.now(UTC)

    async def run(self) -> None:
        while True:
            try:
                async with asyncio.timeout(SAMPLE_TIMEOUT_S):
                    await self.db.call(self.sample)
            except TimeoutError:
                pass  # the database is slow or away: the gauges keep their last values
            except asyncpg.PostgresError as err:
                log.warning("queue sample failed", extra={"error": str(err)})
            await asyncio.sleep(SAMPLE_S)

    async def run_coverage(self) -> None:
        from syncer.status import coverage  # status reads what capture says of the slot

        while True:
            for name, rendered in self.rendered.items():
                try:
                    async with self.db.pool.acquire(timeout=SAMPLE_TIMEOUT_S) as conn:
                        cov = await coverage(conn, rendered)  # type: ignore[arg-type]
                except (TimeoutError, *LOST, asyncpg.PostgresError) as err:
                    log.warning(
                        "coverage sample failed", extra={"pipeline": name, "error": str(err)}
                    )
                    continue
                if cov.with_text:
                    self.emit(CoverageSampled(name, cov.current / cov.with_text))
            await asyncio.sleep(COVERAGE_SAMPLE_S)

    async def forget(self) -> None:
        """At stop: record the last writes, and this process no longer runs (status stops
        listing it at once)."""
        try:
            async with asyncio.timeout(2.0):
                await self._seen(self.db.pool, [])
                await self.db.pool.execute(query("runner_gone"), self.worker_id)
        except (TimeoutError, *LOST, asyncpg.PostgresError):
            pass  # it drops out of the 30 s window all the same

    async def _seen(self, conn: Any, pipelines: list[str]) -> None:
        writes, self.last_writes = self.last_writes, {}
        args = (self.worker_id, pipelines, list(writes), list(writes.values()))
        await conn.execute(query("runner_seen"), *args)

    async def sample(self) -> None:
        async with self.db.pool.acquire(timeout=SAMPLE_TIMEOUT_S) as conn:
            self.health.missing_migrations = await missing_versions(conn)  # type: ignore[arg-type]
            rows = await conn.fetch(query("queue_gauges"))
            await self._seen(conn, [r["name"] for r in rows])
            slot = await self.slot_lag(conn) if self.slot_lag is not None else None  # type: ignore[arg-type]
        for r in rows:
            self.emit(QueueSampled(*_queue_fields(r)))
        pool = self.db.pool
        idle = pool.get_idle_size()
        breakers = tuple(
            (name, e.breaker.state == "open")
            for name, e in sorted(self.embedders.items())
            if isinstance(e, GuardedClient)
        )
        lag = int(slot["behind"]) if slot is not None and slot["behind"] is not None else None
        self.emit(ProcessSampled(pool.get_size() - idle, idle, breakers, lag))


def _queue_fields(r: asyncpg.Record) -> tuple[Any, ...]:
    return (
        r["name"],
        int(r["ready"]),
        int(r["leased"]),
        int(r["delayed"]),
        float(r["oldest_s"]),
        int(r["dead_letters"]),
        bool(r["paused"]),
    )
