"""Logical-mode capture: the source tables' changes come from a logical replication slot
(pgoutput over the replication protocol), not from triggers. The user's writes then pay
for nothing but the WAL they write anyway.

One reader per database holds the slot (PostgreSQL lets one connection stream a slot at a
time; the other workers stand by and retry). It queues the keys of every committed change
to a watched table, and only after that enqueue has committed does it confirm the slot
past those transactions: a crash in between means the changes are read and queued again,
never lost (queue items are idempotent).

The replication protocol needs psycopg2 (asyncpg and psycopg 3 cannot stream a slot), so
the stream is read in a thread; each batch of keys is queued on the event loop through the
worker's asyncpg pool, and the thread waits for that commit before it confirms.

The messages are decoded by syncer.capture.pgoutput (which also drops syncer's own
writes). Install makes the publication and the slot, and drops the capture triggers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import select
import threading
import time
from collections.abc import Callable, Mapping

import asyncpg
import psycopg2
import psycopg2.errors
import psycopg2.extras

from syncer.capture.base import CaptureSide, ident
from syncer.capture.notify import Control, start_listener, worker_handlers
from syncer.capture.pgoutput import Changes, Decoder
from syncer.capture.trigger import drop_triggers, move_inbox
from syncer.config import CaptureConfig, Config, PipelineConfig
from syncer.db import LOST, Database, retry_aborts
from syncer.errors import SchemaError, SlotError
from syncer.schema.catalog import key_columns
from syncer.schema.render import PipelineSQL
from syncer.sqlfiles import query

log = logging.getLogger("syncer.logical")

FLUSH_KEYS = 5000  # queue this many keys at most in one transaction
FLUSH_DELAY_S = 0.005  # while changes stream in, queue them at most this often
STANDBY_S = 2.0  # how often a standing-by worker tries to take the slot
IDLE_WAIT_S = 0.2  # the longest the reader sleeps between looks at the stop flag
VISIBLE_POLL_MAX_S = 0.05  # the longest wait between looks at a decoded commit's visibility
INVISIBLE_WARN_S = 1.0  # a decoded commit not visible for this long is worth a warning
XID_SPAN = 1 << 32


class SlotReader:
    """Streams the slot in a thread; queues keys on the event loop; confirms after."""

    def __init__(
        self,
        cfg: Config,
        pool: asyncpg.Pool,
        rendered: Mapping[str, PipelineSQL],
        wakeups: Mapping[str, asyncio.Event],
    ) -> None:
        self.cfg = cfg
        self.pool = pool
        self.rendered = rendered
        self.key_names = {name: r.keys for name, r in rendered.items()}
        self.wakeups = wakeups
        self.slot = cfg.capture.slot
        self.confirmed = 0  # the slot is confirmed up to here (by this process)
        self.streaming = False
        self.standing_by = False
        self._want_reply = threading.Event()

    async def run(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        halt = threading.Event()
        thread = asyncio.ensure_future(asyncio.to_thread(self._main, loop, halt))
        stopping = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait([thread, stopping], return_when=asyncio.FIRST_COMPLETED)
        finally:
            halt.set()
            stopping.cancel()
            # The thread may be waiting on this loop for an enqueue: let it finish.
            await asyncio.shield(thread)

    def state(self) -> str:
        """For /readyz: this replica reads the slot, stands by, or neither yet."""
        if self.streaming:
            return "reading"
        return "standing_by" if self.standing_by else "connecting to the slot"

    async def caught_up(self) -> bool:
        """Has this reader queued every change committed before now? (--exit-when-idle)"""
        if self.standing_by:
            return True  # another worker reads the slot: what it reads is its to queue
        if not self.streaming:
            return False
        flushed = await self.pool.fetchval(
            "SELECT (pg_current_wal_flush_lsn() - '0/0'::pg_lsn)::bigint"
        )
        if self.confirmed >= flushed:
            return True
        self._want_reply.set()  # ask the server where it stands
        return False

    # --- the thread ---------------------------------------------------------------------

    def _main(self, loop: asyncio.AbstractEventLoop, halt: threading.Event) -> None:
        delay_s = 0.5
        while not halt.is_set():
            try:
                self._stream(loop, halt)
                return
            except psycopg2.errors.ObjectInUse:
                if not self.standing_by:
                    log.info(
                        "another worker reads the slot; standing by", extra={"slot": self.slot}
                    )
                    self.standing_by = True
                halt.wait(STANDBY_S)
            except psycopg2.errors.UndefinedObject as err:
                raise SlotError(
                    f"capture.slot {self.slot!r}: {str(err).strip()}: run `syncer install`"
                ) from None
            except (psycopg2.Error, asyncpg.PostgresError, *LOST) as err:
                # The stream, or the pool connection queueing its keys (asyncpg's
                # InternalClientError when a restart cut it mid-statement): read again.
                log.warning(
                    "replication stream lost; reading again from the last confirmed change",
                    extra={"error": str(err).strip()},
                )
                halt.wait(delay_s)
                delay_s = min(delay_s * 2, 30.0)
            finally:
                self.streaming = False

    def _stream(self, loop: asyncio.AbstractEventLoop, halt: threading.Event) -> None:
        conn = psycopg2.connect(
            self.cfg.database.url,
            connection_factory=psycopg2.extras.LogicalReplicationConnection,
            application_name=f"syncer logical reader {os.getpid()}",
        )
        try:
            cur = conn.cursor()
            cur.start_replication(
                slot_name=self.slot,
                decode=False,
                options={
                    "proto_version": "1",
                    "publication_names": self.cfg.capture.publication,
                    "messages": "true",
                },
                status_interval=5,
            )
            dec = Decoder(self.cfg.pipelines, self.key_names)
            self.streaming, self.standing_by = True, False
            log.info("reading the slot", extra={"slot": self.slot})
            last_flush = 0.0
            while not halt.is_set():
                msg = cur.read_message()
                if msg is not None:
                    dec.feed(msg.payload)
                    if dec.pending >= FLUSH_KEYS:
                        self._flush(loop, dec, cur, halt)
                    continue
                # The socket is drained for now.
                wait_s = IDLE_WAIT_S
                if dec.pending:
                    # A lone change is queued at once; a stream, every FLUSH_DELAY_S, and
                    # gathers in the socket meanwhile (one wake-up a batch, not a message).
                    left = FLUSH_DELAY_S - (time.monotonic() - last_flush)
                    if left > 0:
                        halt.wait(left)
                    else:
                        self._flush(loop, dec, cur, halt)
                        last_flush = time.monotonic()
                    continue
                elif dec.last_commit_end > self.confirmed and not dec.in_txn:
                    self._confirm(cur, dec.last_commit_end)
                elif not dec.in_txn and cur.wal_end > self.confirmed:
                    # Nothing of ours in flight: everything the server has sent is done
                    # (pgoutput sends nothing for transactions on other tables).
                    self._confirm(cur, cur.wal_end)
                if self._want_reply.is_set():
                    self._want_reply.clear()
                    cur.send_feedback(reply=True)  # type: ignore[no-untyped-call]
                    wait_s = min(wait_s, 0.01)
                select.select([cur], [], [], wait_s)
        finally:
            with contextlib.suppress(psycopg2.Error):
                conn.close()

    def _flush(
        self,
        loop: asyncio.AbstractEventLoop,
        dec: Decoder,
        cur: psycopg2.extras.ReplicationCursor,
        halt: threading.Event,
    ) -> None:
        changes = dec.take()
        if changes:
            queued = asyncio.run_coroutine_threadsafe(self._enqueue(changes, halt), loop)
            if not queued.result():
                return  # stopping: nothing is confirmed, the next reader reads these again
        # Every transaction read in full is queued now; a partial one is read again.
        if dec.last_commit_end > self.confirmed:
            self._confirm(cur, dec.last_commit_end)

    def _confirm(self, cur: psycopg2.extras.ReplicationCursor, lsn: int) -> None:
        cur.send_feedback(flush_lsn=lsn, force=True)  # type: ignore[no-untyped-call]
        self.confirmed = lsn

    async def _enqueue(self, changes: Changes, halt: threading.Event) -> bool:
        """Queue the keys once their transactions are visible; False if stopping first."""
        if not await self._wait_visible(changes.xids, halt):
            return False
        keys = changes.keys
        await retry_aborts(self._enqueue_once, changes)
        for name in keys:
            event = self.wakeups.get(name)
            if event is not None:
                event.set()
        return True

    async def _enqueue_once(self, changes: Changes) -> None:
        keys = changes.keys
        async with self.pool.acquire() as conn, conn.transaction():
            for name in changes.truncated:
                await conn.execute(self.rendered[name]["pipeline_truncate"])
            for name, batch in keys.items():
                await conn.execute(self.rendered[name]["logical_enqueue"], batch)
                await conn.execute("SELECT pg_notify('syncer', $1)", name)

    async def _wait_visible(self, xids: set[int], halt: threading.Event) -> bool:
        """Wait until other sessions see these transactions; False if stopping first.

        A commit is decoded once its WAL is flushed, but other sessions see it only once
        its backend has left the ProcArray: a moment later (longer on a starved CPU), or
        not before a synchronous standby has it. A worker reading the row before then
        finds the old text, or no row, and finishes the item as unchanged or cleared:
        the change would be lost. Almost always the first look finds them visible.
        """
        start = time.monotonic()
        delay_s, warned = 0.0005, False
        while not self._visible_in(await self.pool.fetchval(query("snapshot_now")), xids):
            if halt.is_set():
                return False
            if not warned and time.monotonic() - start >= INVISIBLE_WARN_S:
                warned = True
                log.warning(
                    "committed transactions read from the slot are not visible yet (waiting "
                    "for a synchronous standby?): their changes are queued once they are",
                    extra={"slot": self.slot, "xids": sorted(xids)},
                )
            await asyncio.sleep(delay_s)
            delay_s = min(delay_s * 2, VISIBLE_POLL_MAX_S)
        return True

    @staticmethod
    def _visible_in(snapshot: str, xids: set[int]) -> bool:
        """Does a pg_snapshot ('xmin:xmax:xip,...') see these committed transactions,
        given by the low 32 bits of their xids (as pgoutput sends them)?"""
        xmin_s, xmax_s, xip_s = snapshot.split(":")
        xmax = int(xmax_s)
        running = {int(x) for x in xip_s.split(",") if x}
        for xid in xids:
            # The full xid is the one within 2^31 of xmax: no live xid is further away.
            full = xmax + (xid - xmax + XID_SPAN // 2) % XID_SPAN - XID_SPAN // 2
            if full >= xmax or (full >= int(xmin_s) and full in running):
                return False
        return True


class LogicalCapture:
    """Logical mode: a publication and a slot; one worker per database reads the slot."""

    # A vector write to a watched table (a column target) would come back through the
    # slot: the writer marks its transactions, and the decoder drops them.
    marks_own_writes = True

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg

    async def check(self, conn: asyncpg.Connection) -> None:
        await check_logical(conn, self.cfg.pipelines, self.cfg.capture)

    async def install(self, conn: asyncpg.Connection) -> list[str]:
        # Slot first, triggers last: a switch from trigger mode overlaps, never gaps.
        cap = self.cfg.capture
        await install_publication(conn, self.cfg.pipelines, cap)
        if await ensure_slot(conn, cap):
            return [f"created logical replication slot {cap.slot} (publication {cap.publication})"]
        return []

    async def install_pipeline(
        self, conn: asyncpg.Connection, p: PipelineConfig, rendered: PipelineSQL
    ) -> None:
        await drop_triggers(conn, p)  # those a trigger-mode install left

    async def installed(self, conn: asyncpg.Connection) -> None:
        # What the triggers captured before the switch: no inbox mover runs any more.
        await move_inbox(conn)

    async def uninstall(self, conn: asyncpg.Connection) -> list[str]:
        return await drop_logical(conn, self.cfg.capture)

    async def uninstall_pipeline(self, conn: asyncpg.Connection, p: PipelineConfig) -> None:
        await drop_triggers(conn, p)

    async def check_run(self, conn: asyncpg.Connection) -> None:
        await check_slot(conn, self.cfg.capture)

    def start(
        self,
        db: Database,
        wakeups: Mapping[str, asyncio.Event],
        stop: asyncio.Event,
        rendered: Mapping[str, PipelineSQL],
        control: Callable[[Control], None] | None = None,
    ) -> CaptureSide:
        handlers = worker_handlers(wakeups, control=control)
        listen_task = start_listener(self.cfg.database.url, handlers, stop)
        reader = SlotReader(self.cfg, db.pool, rendered, wakeups)
        return CaptureSide(
            listen_task,
            asyncio.create_task(reader.run(stop), name="slot-reader"),
            reader.caught_up,
            reader.state,
        )

    async def status(self, conn: asyncpg.Connection) -> asyncpg.Record | None:
        return await slot_lag(conn, self.cfg.capture)


# --- install, check, uninstall ---------------------------------------------------------------------------


async def check_logical(
    conn: asyncpg.Connection, pipelines: tuple[PipelineConfig, ...], cap: CaptureConfig
) -> None:
    """What logical capture needs of the server, the role and each source table."""
    level = await conn.fetchval("SHOW wal_level")
    if level != "logical":
        raise SchemaError(
            f"capture.mode = 'logical' needs wal_level = logical (the server has {level!r}): "
            "run ALTER SYSTEM SET wal_level = logical, then restart PostgreSQL"
        )
    row = await conn.fetchrow(
        "SELECT rolname, rolreplication OR rolsuper FROM pg_roles WHERE rolname = current_user"
    )
    assert row is not None
    role, allowed = row[0], row[1]
    if not allowed:
        raise SchemaError(
            f"capture.mode = 'logical': role {role!r} may not read a replication slot: "
            f"ALTER ROLE {ident(role)} REPLICATION"
        )
    slot = await conn.fetchrow(
        "SELECT plugin, database FROM pg_replication_slots WHERE slot_name = $1", cap.slot
    )
    here = await conn.fetchval("SELECT current_database()")
    if slot is not None and (slot["plugin"] != "pgoutput" or slot["database"] != here):
        raise SchemaError(
            f"capture.slot: a slot named {cap.slot!r} already exists for "
            f"{slot['plugin']} on database {slot['database']!r}: choose another name"
        )
    for p in pipelines:
        keys = [c.name for c in await key_columns(conn, p)]
        kind, identity = await replica_identity(conn, p.schema_name, p.table_name)
        if kind == "f" or (identity is not None and set(identity) == set(keys)):
            continue
        now = {
            "n": "NOTHING",
            "d": "DEFAULT, and it has no primary key",
            "i": f"the index on {identity}",
        }.get(kind, f"DEFAULT (primary key {identity})")
        raise SchemaError(
            f"pipeline {p.name!r} (key): logical capture needs the key {keys} to be the replica "
            f"identity of {p.table} (it is {now}): ALTER TABLE {ident(p.schema_name, p.table_name)} "
            "REPLICA IDENTITY USING INDEX <a unique index on the key>, or REPLICA IDENTITY FULL"
        )


async def replica_identity(
    conn: asyncpg.Connection, schema: str, table: str
) -> tuple[str, tuple[str, ...] | None]:
    """The table's replica identity ('d', 'i', 'f' or 'n') and the columns of its index."""
    row = await conn.fetchrow(
        """SELECT c.relreplident::text,
                  (SELECT array_agg(a.attname ORDER BY k.ord)
                   FROM pg_index i
                   CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
                   JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = k.attnum
                   WHERE i.indrelid = c.oid
                     AND CASE c.relreplident WHEN 'd' THEN i.indisprimary
                                             WHEN 'i' THEN i.indisreplident
                                             ELSE false END)
           FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
           WHERE n.nspname = $1 AND c.relname = $2""",
        schema,
        table,
    )
    assert row is not None
    return row[0], tuple(row[1]) if row[1] else None


async def install_publication(
    conn: asyncpg.Connection, pipelines: tuple[PipelineConfig, ...], cap: CaptureConfig
) -> None:
    """The publication of the source tables, each with only the columns syncer reads
    (key and text), so the slot carries nothing else."""
    columns: dict[tuple[str, str], list[str] | None] = {}
    for p in pipelines:
        table = (p.schema_name, p.table_name)
        kind, _ = await replica_identity(conn, *table)
        keys = [c.name for c in await key_columns(conn, p)]
        if kind == "f":  # a column list must hold the whole replica identity: every column
            columns[table] = None
        elif (have := columns.setdefault(table, [])) is not None:
            have += [c for c in (*keys, *p.watched_columns) if c not in have]
    entries = ", ".join(
        ident(*t) + (f" ({', '.join(ident(c) for c in cols)})" if cols else "")
        for t, cols in columns.items()
    )
    pub = ident(cap.publication)
    async with conn.transaction():
        if await conn.fetchval(
            "SELECT true FROM pg_publication WHERE pubname = $1", cap.publication
        ):
            await conn.execute(f"ALTER PUBLICATION {pub} SET TABLE {entries}")
            await conn.execute(
                f"ALTER PUBLICATION {pub} SET (publish = 'insert, update, delete, truncate', "
                "publish_via_partition_root = true)"
            )
        else:
            await conn.execute(
                f"CREATE PUBLICATION {pub} FOR TABLE {entries} WITH "
                "(publish = 'insert, update, delete, truncate', publish_via_partition_root = true)"
            )


async def ensure_slot(conn: asyncpg.Connection, cap: CaptureConfig) -> bool:
    """Create the slot unless it exists; True if it was created. From its creation on,
    every committed change is kept for the reader."""
    if await conn.fetchval("SELECT true FROM pg_replication_slots WHERE slot_name = $1", cap.slot):
        return False
    await conn.execute("SELECT pg_create_logical_replication_slot($1, 'pgoutput')", cap.slot)
    return True


async def drop_logical(conn: asyncpg.Connection, cap: CaptureConfig) -> list[str]:
    """Drop the slot and publication (a forgotten slot keeps WAL forever)."""
    done: list[str] = []
    here = await conn.fetchval("SELECT current_database()")
    slot = await conn.fetchrow(
        "SELECT active_pid, database FROM pg_replication_slots WHERE slot_name = $1", cap.slot
    )
    if slot is not None and slot["database"] == here:
        if slot["active_pid"] is not None:
            raise SchemaError(
                f"capture.slot {cap.slot!r} is being read by a running worker "
                f"(backend pid {slot['active_pid']}): stop the syncer workers first"
            )
        await conn.execute("SELECT pg_drop_replication_slot($1)", cap.slot)
        done.append(f"dropped logical replication slot {cap.slot}")
    if await conn.fetchval("SELECT true FROM pg_publication WHERE pubname = $1", cap.publication):
        await conn.execute(f"DROP PUBLICATION {ident(cap.publication)}")
        done.append(f"dropped publication {cap.publication}")
    return done


async def check_slot(conn: asyncpg.Connection, cap: CaptureConfig) -> None:
    """Before a logical-mode run: the slot and publication install makes are there."""
    if not await conn.fetchval(
        "SELECT true FROM pg_replication_slots WHERE slot_name = $1", cap.slot
    ):
        raise SchemaError(
            f"capture.mode = 'logical', but there is no replication slot {cap.slot!r}: "
            "run `syncer install`"
        )
    if not await conn.fetchval(
        "SELECT true FROM pg_publication WHERE pubname = $1", cap.publication
    ):
        raise SchemaError(
            f"capture.mode = 'logical', but there is no publication {cap.publication!r}: "
            "run `syncer install`"
        )


async def slot_lag(conn: asyncpg.Connection, cap: CaptureConfig) -> asyncpg.Record | None:
    """The slot's state for `status`: is a worker reading it, and how much WAL it holds."""
    return await conn.fetchrow(
        """SELECT active,
                  pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::bigint AS behind,
                  pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint AS retained
           FROM pg_replication_slots WHERE slot_name = $1""",
        cap.slot,
    )
