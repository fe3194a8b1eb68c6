"""Reads the current text and hash of source rows; writes vectors under the hash guard.

The statements and what they mean are the pipeline's target's (column.py, table.py); this
is the part every target shares: the batch, the transaction and its settings, the retries.

One batch of results is one transaction: vectors, side-table deletes and the removal of
the finished queue items commit together.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import asyncpg
from pgvector import HalfVector, Vector

from syncer.observe import current_trace
from syncer.queue import Queue
from syncer.targets.base import Target

if TYPE_CHECKING:
    from syncer.schema.render import PipelineSQL
    from syncer.targets.chunks import ChunkDoc

OWN_PREFIX = "syncer"  # the logical message that marks syncer's own writes (syncer.logical)

WRITE_ATTEMPTS = 5


@dataclass(frozen=True)
class SourceRow:
    key: str
    present: bool
    text: str | None
    hash: bytes | None
    stored_hash: bytes | None
    extra: str | None = None  # a chunk template's columns, as a JSON object of their text


def _traces() -> list[str]:
    trace_id = current_trace()
    return [trace_id] if trace_id else []


@dataclass
class WriteBatch:
    keys: list[str] = field(default_factory=list)
    vectors: list[Any] = field(default_factory=list)  # numpy arrays; None clears (column)
    hashes: list[bytes | None] = field(default_factory=list)
    delete_keys: list[str] = field(default_factory=list)
    done_ids: list[int] = field(default_factory=list)
    outcomes: Counter[str] = field(default_factory=Counter)  # for events: item counts by outcome
    # ((key, hash), ids): items that may still join a vector of this batch until it is
    # written (the worker's in-flight deduplication); finished right after the write.
    joins: list[tuple[tuple[str, bytes], list[int]]] = field(default_factory=list)
    docs: list[ChunkDoc] = field(default_factory=list)  # the chunks target's whole documents
    traces: list[str] = field(default_factory=_traces)  # the claimed batches' ids

    def add_vector(self, key: str, vector: Any, hash_: bytes | None) -> None:
        self.keys.append(key)
        self.vectors.append(vector)
        self.hashes.append(hash_)

    def extend(self, other: WriteBatch) -> None:
        self.keys += other.keys
        self.vectors += other.vectors
        self.hashes += other.hashes
        self.delete_keys += other.delete_keys
        self.done_ids += other.done_ids
        self.outcomes.update(other.outcomes)
        self.joins += other.joins
        self.docs += other.docs
        self.traces += [t for t in other.traces if t not in self.traces]

    def __len__(self) -> int:
        return len(self.done_ids)


class VectorStore:
    def __init__(
        self,
        pool: asyncpg.Pool,
        rendered: PipelineSQL,
        target: Target,
        vector_type: str,
        mark_own: bool = False,
    ) -> None:
        self.pool = pool
        # A batch is a few hundred keys: probing the key index per key is always right. On a
        # table of some ten thousand rows the planner prefers a merge join instead, reading
        # the whole table and sorting the vectors on disk for every batch (twice the CPU).
        # Logical mode, a target that writes the watched table: mark the write so the slot
        # reader skips it.
        # The commit is durable (at least locally, even where the server's default is off):
        # the worker remembers the texts it wrote and skips items for them, so a write lost
        # in a server crash would leave its stale vector for good (tests/test_outage.py).
        self.begin = (
            "SELECT set_config('synchronous_commit', 'local', true) "
            "WHERE current_setting('synchronous_commit') = 'off'; "
            "SET LOCAL syncer.writing = 'on'; "
            "SET LOCAL enable_mergejoin = off; SET LOCAL enable_hashjoin = off"
        ) + (
            f"; SELECT pg_logical_emit_message(true, '{OWN_PREFIX}', '')"
            if mark_own and target.writes_source
            else ""
        )
        self.vector_type = vector_type
        self.sql = rendered
        self.target = target

    async def fetch(self, keys: Sequence[str]) -> list[SourceRow]:
        rows = await self.pool.fetch(self.sql["rows_fetch"], list(keys))
        return [SourceRow(r[0], r[1], r[2], r[3], r[4], r[5]) for r in rows]

    def clear(self, batch: WriteBatch, row: SourceRow) -> None:
        """The row is gone or has no text: its vector must go too (what that means is the
        target's)."""
        self.target.clear(batch, row)

    async def write(self, batch: WriteBatch) -> int:
        """Returns how many vectors were written (rows whose text changed meanwhile are not).

        Two writers may lock the same rows in different orders (a key queued twice lands in
        two batches); Postgres then aborts one of them, which simply runs again.
        """
        for attempt in range(WRITE_ATTEMPTS):
            try:
                return await self._write_once(batch)
            except (asyncpg.DeadlockDetectedError, asyncpg.SerializationError):
                if attempt == WRITE_ATTEMPTS - 1:
                    raise
        raise AssertionError("unreachable")

    async def _write_once(self, batch: WriteBatch) -> int:
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(self.begin)
            # asyncpg would read a list of arrays as a 2-d array: wrap each vector.
            wrap = Vector if self.vector_type == "vector" else HalfVector
            vectors = [None if v is None else wrap(v) for v in batch.vectors]
            written = await self.target.write(conn, self.sql, batch, vectors)
            await Queue.complete(conn, batch.done_ids)
        return written
