"""Trigger-mode capture: the capture triggers and what they install, and the worker's inbox
mover, which moves captured keys from the inbox to the queue.

The triggers put keys in syncer.inbox inside the user's transaction, the cheapest durable
write there is. A NOTIFY only wakes workers early, so a lost one only delays; the triggers
even skip it while a worker says it is awake (syncer.awake_until), because NOTIFY
serialises the commits of every notifying transaction.

Skipping is safe because of the order in which a mover goes to sleep:
1. it clears syncer.awake_until: from then on every trigger notifies;
2. it takes a snapshot: every transaction that saw it awake has already inserted its keys
   (the trigger reads the flag after its insert), so it is either committed or in that
   snapshot's in-progress list;
3. it waits until those transactions have ended, moves the inbox once more, and sleeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import asyncpg

from syncer import targets
from syncer.aio import wait_first
from syncer.capture.base import CaptureSide, always_caught_up, ident
from syncer.capture.notify import Control, start_listener, worker_handlers
from syncer.config import Config, PipelineConfig
from syncer.db import LOST, Database
from syncer.schema.catalog import is_partitioned
from syncer.schema.render import PipelineSQL
from syncer.sqlfiles import query

log = logging.getLogger("syncer.capture")

MOVE_CHUNK = 5000  # inbox rows per move statement
AWAKE_POLL_S = 0.005  # while awake, the inbox is looked at this often
LINGER_S = 0.1  # awake this long after the last captured row, then to sleep
AWAKE_LEASE_S = 10.0  # a crashed worker's "awake" expires after this
PASSED_POLL_MAX_S = 0.2  # the longest wait between looks at step 3's transactions
# A move scans the whole inbox, dead rows included, and autovacuum may not come for a
# minute: the mover VACUUMs the inbox after this many moved rows (a 150-row move took
# 1 ms on a clean inbox and 8 ms after 450,000 moved rows; VACUUM keeps it at 1 ms).
VACUUM_ROWS = 10_000


class InboxMover:
    """Moves captured keys from syncer.inbox to syncer.queue and wakes the claimers.

    Awake, it polls the inbox every AWAKE_POLL_S, so a steady stream of writes costs no
    NOTIFY at all; LINGER_S after the last captured row it goes to sleep (in the order the
    module's docstring gives) until a NOTIFY, or poll_s at the latest.
    """

    def __init__(
        self,
        db: Database,
        wakeups: Mapping[str, asyncio.Event],
        kick: asyncio.Event,
        poll_s: float,
    ) -> None:
        self.db = db
        self.pool = db.pool
        self.wakeups = wakeups
        self.kick = kick
        self.poll_s = poll_s
        self.moved_since_vacuum = 0
        self.may_vacuum = False

    async def run(self, stop: asyncio.Event) -> None:
        self.may_vacuum = bool(await self._fetchval(query("inbox_may_vacuum")))
        if not self.may_vacuum:
            log.warning(
                "this role cannot VACUUM syncer.inbox: its dead rows wait for autovacuum, "
                "and moving captured keys slows down while they pile up (run as the table's "
                "owner, or GRANT MAINTAIN ON syncer.inbox to this role on PostgreSQL 17+)"
            )
        while not stop.is_set():
            # Woken by a poll, not a NOTIFY: one look, and back to sleep if it finds nothing.
            linger_s = LINGER_S if self.kick.is_set() else 0.0
            self.kick.clear()
            await self._set_awake(AWAKE_LEASE_S)
            await self._stay_awake(stop, linger_s)
            if stop.is_set():
                break
            await self._set_awake(0)
            snapshot = await self._fetchval(query("snapshot_now"))
            if not await self._wait_passed(stop, snapshot):
                continue  # kicked (or stopping) meanwhile: awake again
            self.kick.clear()
            if await self.move_all():
                continue
            await wait_first(stop, self.kick, timeout_s=self.poll_s)
        # Stopping: the triggers must notify again (the other workers may be asleep).
        with contextlib.suppress(asyncpg.PostgresError, *LOST):
            await self._set_awake(0)

    async def _stay_awake(self, stop: asyncio.Event, linger_s: float) -> None:
        last_rows = renewed = time.monotonic()
        while not stop.is_set():
            n = await self.move_all()
            now = time.monotonic()
            if n:
                last_rows, linger_s = now, LINGER_S
            elif now - last_rows >= linger_s:
                return
            if now - renewed >= AWAKE_LEASE_S / 3:
                await self._set_awake(AWAKE_LEASE_S)
                renewed = now
            self.kick.clear()
            await wait_first(stop, self.kick, timeout_s=AWAKE_POLL_S)

    async def _wait_passed(self, stop: asyncio.Event, snapshot: str) -> bool:
        """Wait until every transaction in progress at `snapshot` has ended; False if a
        NOTIFY or a stop came first."""
        delay_s = 0.001
        while not await self._fetchval(query("snapshot_passed"), snapshot):
            await wait_first(stop, self.kick, timeout_s=delay_s)
            if stop.is_set() or self.kick.is_set():
                return False
            delay_s = min(delay_s * 2, PASSED_POLL_MAX_S)
        return True

    async def _fetchval(self, sql: str, *args: object) -> Any:
        return await self.db.call(self.pool.fetchval, sql, *args)

    async def _set_awake(self, seconds: float) -> None:
        await self.db.call(self.pool.execute, query("awake_set"), seconds)

    async def move_all(self) -> int:
        """Move everything the inbox holds now; returns how many items were queued."""
        taken, queued = await self.db.call(move_inbox, self.pool, self.wakeups)
        self.moved_since_vacuum += taken
        if self.may_vacuum and self.moved_since_vacuum >= VACUUM_ROWS:
            self.moved_since_vacuum = 0
            # SKIP_LOCKED: never wait behind another worker's VACUUM of it.
            await self.db.call(self.pool.execute, "VACUUM (SKIP_LOCKED) syncer.inbox")
        return queued


async def move_inbox(
    db: asyncpg.Pool | asyncpg.Connection, wakeups: Mapping[str, asyncio.Event] | None = None
) -> tuple[int, int]:
    """Move everything the inbox holds now to the queue, waking the claimers of each
    pipeline that got items; returns how many inbox rows were taken, and how many items
    they made in the queue (duplicates folded)."""
    taken = queued = 0
    while True:
        rows = await db.fetch(query("inbox_move"), MOVE_CHUNK)
        for r in rows:
            queued += r["queued"]
            event = (wakeups or {}).get(r["pipeline"])
            if event is not None:
                event.set()
        taken += rows[0]["taken"] if rows else 0
        if not rows or rows[0]["taken"] < MOVE_CHUNK:
            return taken, queued


class TriggerCapture:
    """Trigger mode: statement-level triggers on each source table, and an inbox mover in
    every worker."""

    # The update trigger fires only when the text or the key changed: a vector write to
    # the source table is not captured.
    marks_own_writes = False

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg

    async def check(self, conn: asyncpg.Connection) -> None:
        return None  # the triggers need nothing beyond what install checks of a pipeline

    async def install(self, conn: asyncpg.Connection) -> list[str]:
        return await self.uninstall(conn)  # a slot left by logical mode keeps WAL forever

    async def install_pipeline(
        self, conn: asyncpg.Connection, p: PipelineConfig, rendered: PipelineSQL
    ) -> None:
        partitioned = await is_partitioned(conn, ident(p.schema_name, p.table_name))
        for step in capture_steps(p, partitioned):
            await conn.execute(rendered[step])

    async def installed(self, conn: asyncpg.Connection) -> None:
        return None

    async def uninstall(self, conn: asyncpg.Connection) -> list[str]:
        # Imported here: a trigger-mode worker never loads psycopg2.
        from syncer.capture.logical import drop_logical

        return await drop_logical(conn, self.cfg.capture)

    async def uninstall_pipeline(self, conn: asyncpg.Connection, p: PipelineConfig) -> None:
        await drop_triggers(conn, p)

    async def check_run(self, conn: asyncpg.Connection) -> None:
        return None

    def start(
        self,
        db: Database,
        wakeups: Mapping[str, asyncio.Event],
        stop: asyncio.Event,
        rendered: Mapping[str, PipelineSQL],
        control: Callable[[Control], None] | None = None,
    ) -> CaptureSide:
        """A capture NOTIFY wakes the mover through a shared event."""
        kick = asyncio.Event()
        handlers = worker_handlers(wakeups, kick, control)
        listen_task = start_listener(self.cfg.database.url, handlers, stop)
        mover = InboxMover(db, wakeups, kick, self.cfg.worker.poll_interval_s)
        return CaptureSide(
            listen_task, asyncio.create_task(mover.run(stop), name="inbox-mover"), always_caught_up
        )

    async def status(self, conn: asyncpg.Connection) -> asyncpg.Record | None:
        return None


def capture_steps(p: PipelineConfig, partitioned: bool) -> tuple[str, ...]:
    """The rendered statements that install the pipeline's capture triggers, in order."""
    steps: tuple[str, ...] = _COMMON_STEPS
    if targets.for_pipeline(p).needs_deletes:
        steps = _DELETE_STEPS
    if partitioned:
        steps = tuple(_ROW_LEVEL.get(step, step) for step in steps)
    return steps


_COMMON_STEPS = (
    "capture_insert_function",
    "capture_update_function",
    "capture_insert_trigger",
    "capture_update_trigger",
    "capture_truncate_function",
    "capture_truncate_trigger",
)
# A target that must hear of deleted rows (a side table) also gets the delete trigger.
_DELETE_STEPS = (*_COMMON_STEPS, "capture_delete_function", "capture_delete_trigger")


# A partitioned table's row movement fires only row-level INSERT and DELETE triggers.
_ROW_LEVEL = {
    "capture_insert_function": "capture_insert_row_function",
    "capture_insert_trigger": "capture_insert_row_trigger",
    "capture_delete_function": "capture_delete_row_function",
    "capture_delete_trigger": "capture_delete_row_trigger",
}


async def drop_triggers(conn: asyncpg.Connection, p: PipelineConfig) -> None:
    src = ident(p.schema_name, p.table_name)
    for kind in ("insert", "update", "delete", "truncate"):
        await conn.execute(f"DROP TRIGGER IF EXISTS {ident(f'syncer_{p.name}_{kind}')} ON {src}")
