"""Trigger-mode capture, worker side: LISTEN for wake-ups, and move captured keys from the
inbox to the queue.

The triggers (installed by syncer.schema) put keys in syncer.inbox inside the user's
transaction, the cheapest durable write there is. A NOTIFY only wakes workers early, so a
lost one only delays; the triggers even skip it while a worker says it is awake
(syncer.awake_until), because NOTIFY serialises the commits of every notifying transaction.

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
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import asyncpg

from syncer.config import Config
from syncer.db import connect_kwargs
from syncer.schema.render import PipelineSQL
from syncer.sqlfiles import query

log = logging.getLogger("syncer.capture")
CHANNEL = "syncer"  # payload: a pipeline whose queue has new items
INBOX_CHANNEL = "syncer_inbox"  # payload: a pipeline whose rows were captured

MOVE_CHUNK = 5000  # inbox rows per move statement
AWAKE_POLL_S = 0.005  # while awake, the inbox is looked at this often
LINGER_S = 0.1  # awake this long after the last captured row, then to sleep
AWAKE_LEASE_S = 10.0  # a crashed worker's "awake" expires after this
PASSED_POLL_MAX_S = 0.2  # the longest wait between looks at step 3's transactions
# A move scans the whole inbox, dead rows included, and autovacuum may not come for a
# minute: the mover VACUUMs the inbox after this many moved rows (a 150-row move took
# 1 ms on a clean inbox and 8 ms after 450,000 moved rows; VACUUM keeps it at 1 ms).
VACUUM_ROWS = 10_000


class Listener:
    """One dedicated connection LISTENing on syncer's channels; reconnects when lost."""

    def __init__(
        self,
        dsn: str,
        wakeups: Mapping[str, asyncio.Event],
        kick: asyncio.Event,
        connect_kwargs: dict[str, Any],
    ) -> None:
        self.dsn = dsn
        self.wakeups = wakeups
        self.kick = kick
        self.connect_kwargs = connect_kwargs

    def _on_notify(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        event = self.wakeups.get(payload)
        if event is not None:
            event.set()

    def _on_capture(self, _conn: Any, _pid: int, _channel: str, _payload: str) -> None:
        self.kick.set()

    def _wake_all(self) -> None:
        self.kick.set()
        for event in self.wakeups.values():
            event.set()

    async def run(self, stop: asyncio.Event) -> None:
        delay_s = 0.5
        while not stop.is_set():
            lost = asyncio.Event()
            try:
                conn = await asyncpg.connect(self.dsn, **self.connect_kwargs)
            except (OSError, asyncpg.PostgresError) as err:
                log.warning("listener cannot connect, retrying", extra={"error": str(err)})
                await wait_first(stop, timeout_s=delay_s)
                delay_s = min(delay_s * 2, 30.0)
                continue
            delay_s = 0.5
            try:
                conn.add_termination_listener(lambda _c, lost=lost: lost.set())
                await conn.add_listener(CHANNEL, self._on_notify)
                await conn.add_listener(INBOX_CHANNEL, self._on_capture)
                # Notifications sent while we were not listening are lost: look once now.
                self._wake_all()
                await wait_first(stop, lost)
            finally:
                if not conn.is_closed():
                    await conn.close(timeout=5)


class InboxMover:
    """Moves captured keys from syncer.inbox to syncer.queue and wakes the claimers.

    Awake, it polls the inbox every AWAKE_POLL_S, so a steady stream of writes costs no
    NOTIFY at all; LINGER_S after the last captured row it goes to sleep (in the order the
    module's docstring gives) until a NOTIFY, or poll_s at the latest.
    """

    def __init__(
        self,
        pool: asyncpg.Pool,
        wakeups: Mapping[str, asyncio.Event],
        kick: asyncio.Event,
        poll_s: float,
    ) -> None:
        self.pool = pool
        self.wakeups = wakeups
        self.kick = kick
        self.poll_s = poll_s
        self.moved_since_vacuum = 0
        self.may_vacuum = False

    async def run(self, stop: asyncio.Event) -> None:
        self.may_vacuum = bool(await self.pool.fetchval(query("inbox_may_vacuum")))
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
            snapshot = await self.pool.fetchval(query("snapshot_now"))
            if not await self._wait_passed(stop, snapshot):
                continue  # kicked (or stopping) meanwhile: awake again
            self.kick.clear()
            if await self.move_all():
                continue
            await wait_first(stop, self.kick, timeout_s=self.poll_s)
        # Stopping: the triggers must notify again (the other workers may be asleep).
        with contextlib.suppress(OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
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
        while not await self.pool.fetchval(query("snapshot_passed"), snapshot):
            await wait_first(stop, self.kick, timeout_s=delay_s)
            if stop.is_set() or self.kick.is_set():
                return False
            delay_s = min(delay_s * 2, PASSED_POLL_MAX_S)
        return True

    async def _set_awake(self, seconds: float) -> None:
        await self.pool.execute(query("awake_set"), seconds)

    async def move_all(self) -> int:
        """Move everything the inbox holds now; returns how many items were queued."""
        taken, queued = await move_inbox(self.pool, self.wakeups)
        self.moved_since_vacuum += taken
        if self.may_vacuum and self.moved_since_vacuum >= VACUUM_ROWS:
            self.moved_since_vacuum = 0
            # SKIP_LOCKED: never wait behind another worker's VACUUM of it.
            await self.pool.execute("VACUUM (SKIP_LOCKED) syncer.inbox")
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


@dataclass
class CaptureSide:
    """A process's capture side: the LISTEN connection, and what brings captured keys to
    the queue (the inbox mover, or in logical mode the slot reader)."""

    listener: asyncio.Task[None]
    feeder: asyncio.Task[None]
    caught_up: Callable[[], Awaitable[bool]]  # has everything captured so far been queued?


async def always_caught_up() -> bool:
    return True  # trigger mode: the inbox is counted with the queue


def start_capture_side(
    cfg: Config,
    pool: asyncpg.Pool,
    wakeups: Mapping[str, asyncio.Event],
    stop: asyncio.Event,
    rendered: Mapping[str, PipelineSQL],
) -> CaptureSide:
    """Start the capture side; a capture NOTIFY wakes the mover through a shared event."""
    kick = asyncio.Event()
    listener = Listener(cfg.database.url, wakeups, kick, connect_kwargs())
    listen_task = asyncio.create_task(listener.run(stop), name="listener")
    if cfg.capture.mode == "logical":
        from syncer.logical import SlotReader

        reader = SlotReader(cfg, pool, rendered, wakeups)
        return CaptureSide(
            listen_task, asyncio.create_task(reader.run(stop), name="slot-reader"), reader.caught_up
        )
    mover = InboxMover(pool, wakeups, kick, cfg.worker.poll_interval_s)
    return CaptureSide(
        listen_task, asyncio.create_task(mover.run(stop), name="inbox-mover"), always_caught_up
    )


async def wait_first(*events: asyncio.Event, timeout_s: float | None = None) -> None:
    """Return when any event is set, or after timeout_s."""
    waits = [asyncio.create_task(e.wait()) for e in events]
    try:
        await asyncio.wait(waits, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in waits:
            t.cancel()
