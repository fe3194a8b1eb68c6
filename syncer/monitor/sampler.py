"""One cheap query every few seconds per process for the gauges that live in the
database (queue depth and lag, dead letters, the schema version, the slot's lag), so that a
scrape costs the database nothing however often it comes."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import asyncpg

from syncer.db import Database
from syncer.monitor.health import Health
from syncer.observe import Event, ProcessSampled, QueueSampled
from syncer.providers import Embedder, GuardedClient
from syncer.schema.migrations import installed_version
from syncer.sqlfiles import query

log = logging.getLogger("syncer.monitor")

SAMPLE_S = 2.0  # a lost database shows in /readyz within this and the probe's first try
SAMPLE_TIMEOUT_S = 5.0

SlotLag = Callable[[asyncpg.Connection], Awaitable[asyncpg.Record | None]]


class Sampler:
    def __init__(
        self,
        db: Database,
        health: Health,
        embedders: Mapping[str, Embedder],
        emit: Callable[[Event], None],
        slot_lag: SlotLag | None = None,
    ) -> None:
        self.db = db
        self.health = health
        self.embedders = embedders
        self.emit = emit
        self.slot_lag = slot_lag

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

    async def sample(self) -> None:
        async with self.db.pool.acquire(timeout=SAMPLE_TIMEOUT_S) as conn:
            self.health.schema_version = await installed_version(conn)  # type: ignore[arg-type]
            rows = await conn.fetch(query("queue_gauges"))
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
    )
