"""Backfill: queue the rows whose vector is missing or stale, a keyset page at a time.

A producer of work like the triggers: it puts keys into the queue (syncer.queue) and
nothing else (the worker does the rest).
"""

from __future__ import annotations

from collections.abc import Callable

import asyncpg

from syncer.schema.render import PipelineSQL


async def backfill(
    conn: asyncpg.Connection,
    rendered: PipelineSQL,
    everything: bool,
    page_size: int = 5000,
    progress: Callable[[int, int], None] | None = None,
) -> int:
    """Enqueue stale or missing rows page by page; each page commits on its own."""
    last: str | None = None
    enqueued = scanned = 0
    while True:
        stmt = rendered["backfill_first"] if last is None else rendered["backfill_next"]
        row = await conn.fetchrow(stmt, last, page_size, everything)
        assert row is not None
        n_enq, n_page, last = int(row[0]), int(row[1]), row[2]
        enqueued += n_enq
        scanned += n_page
        if n_enq:
            await conn.execute("SELECT pg_notify('syncer', $1)", rendered.name)
        if progress:
            progress(scanned, enqueued)
        if n_page < page_size:
            return enqueued
