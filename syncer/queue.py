"""The durable queue: claim with a lease, complete, retry, dead-letter, release."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import asyncpg

from syncer.sqlfiles import query


@dataclass(frozen=True)
class Item:
    id: int
    key: str  # the key as canonical jsonb text; opaque to Python
    attempts: int  # counted at claim time
    age_s: float = 0.0  # since it was queued, at claim time


@dataclass(frozen=True)
class Failure:
    id: int
    error_class: str
    error: str
    delay_s: float = 0.0
    counts: bool = True  # False: the failure was not the item's (does not spend an attempt)


class Queue:
    """Every operation on syncer.queue and syncer.dead_letters, for one worker."""

    def __init__(self, pool: asyncpg.Pool, worker_id: str, lease_s: float) -> None:
        self.pool = pool
        self.worker_id = worker_id
        self.lease_s = lease_s

    async def claim(self, pipeline: str, limit: int) -> list[Item]:
        rows = await self.pool.fetch(
            query("queue_claim"), pipeline, limit, self.lease_s, self.worker_id
        )
        return sorted((Item(r[0], r[1], r[2], r[3]) for r in rows), key=lambda i: i.id)

    @staticmethod
    async def complete(
        conn: asyncpg.Connection | asyncpg.pool.PoolConnectionProxy, ids: Sequence[int]
    ) -> None:
        """Inside the caller's write transaction, so the vector and the removal commit together."""
        if ids:
            await conn.execute(query("queue_complete"), list(ids))

    async def release(self, ids: Sequence[int]) -> None:
        if ids:
            await self.pool.execute(query("queue_release"), list(ids), self.worker_id)

    async def extend(self, ids: Sequence[int]) -> None:
        if ids:
            await self.pool.execute(query("queue_extend"), list(ids), self.worker_id, self.lease_s)

    async def retry(self, failures: Sequence[Failure]) -> None:
        if failures:
            await self.pool.execute(
                query("queue_retry"),
                [f.id for f in failures],
                [f.delay_s for f in failures],
                [f"{f.error_class}: {f.error}" for f in failures],
                [f.counts for f in failures],
            )

    async def dead_letter(self, failures: Sequence[Failure]) -> None:
        if failures:
            await self.pool.execute(
                query("dead_letter_insert"),
                [f.id for f in failures],
                [f.error_class for f in failures],
                [f.error for f in failures],
            )

    async def pending(self, pipelines: Sequence[str]) -> int:
        return int(await self.pool.fetchval(query("queue_pending"), list(pipelines)))

    async def next_ready_s(self, pipelines: Sequence[str]) -> float | None:
        v = await self.pool.fetchval(query("queue_next_ready"), list(pipelines))
        return None if v is None else float(v)
