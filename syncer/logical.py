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

syncer's own vector writes (a column target is a column of the watched table) would come
back through the slot: the writer marks its transactions with a transactional logical
message (OWN_PREFIX), and the reader drops the changes of a marked transaction.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import select
import struct
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import asyncpg
import orjson
import psycopg2
import psycopg2.errors
import psycopg2.extras

from syncer.config import Config, PipelineConfig
from syncer.errors import SlotError
from syncer.schema.render import PipelineSQL
from syncer.targets.store import OWN_PREFIX

log = logging.getLogger("syncer.logical")

FLUSH_KEYS = 5000  # queue this many keys at most in one transaction
FLUSH_DELAY_S = 0.005  # while changes stream in, queue them at most this often
STANDBY_S = 2.0  # how often a standing-by worker tries to take the slot
IDLE_WAIT_S = 0.2  # the longest the reader sleeps between looks at the stop flag

_I16 = struct.Struct("!h")
_I32 = struct.Struct("!i")
_U64 = struct.Struct("!Q")


@dataclass(frozen=True)
class Watch:
    """One pipeline watching one relation, by the positions of its columns there."""

    pipeline: str
    key_idx: tuple[int, ...]
    text_idx: tuple[int, ...]
    deletes: bool  # a side-table target must hear of deleted rows; a column target need not


# A tuple's columns: None for NULL, UNCHANGED for a TOASTed value the update left alone.
UNCHANGED = b"\x00unchanged"
Tuple = list[bytes | None]


def _tuple(buf: bytes, pos: int) -> tuple[Tuple, int]:
    (n,) = _I16.unpack_from(buf, pos)
    pos += 2
    out: Tuple = []
    for _ in range(n):
        kind = buf[pos]
        pos += 1
        if kind == 0x74 or kind == 0x62:  # 't' text, 'b' binary
            (length,) = _I32.unpack_from(buf, pos)
            pos += 4
            out.append(buf[pos : pos + length])
            pos += length
        elif kind == 0x75:  # 'u'
            out.append(UNCHANGED)
        else:  # 'n'
            out.append(None)
    return out, pos


def _cstring(buf: bytes, pos: int) -> tuple[str, int]:
    end = buf.index(0, pos)
    return buf[pos:end].decode(), end + 1


@dataclass
class Decoder:
    """pgoutput protocol version 1: the messages syncer needs, turned into pending keys.

    Keys are gathered per pipeline as tuples of the key columns' text forms; `take()` hands
    them over. Once they are queued, the slot may be confirmed up to `last_commit_end`.
    """

    pipelines: Sequence[PipelineConfig]
    key_names: Mapping[str, tuple[str, ...]]
    relations: dict[int, list[Watch]] = field(default_factory=dict)
    keys: dict[str, set[tuple[bytes, ...]]] = field(default_factory=dict)
    pending: int = 0
    in_txn: bool = False
    own_txn: bool = False
    last_commit_end: int = 0  # the end of the last transaction read in full

    def feed(self, msg: bytes) -> None:
        kind = msg[0]
        if kind == 0x42:  # 'B'
            self.in_txn, self.own_txn = True, False
        elif kind == 0x43:  # 'C': flags, commit LSN, end LSN, timestamp
            (self.last_commit_end,) = _U64.unpack_from(msg, 10)
            self.in_txn = False
        elif kind == 0x52:  # 'R', sent once a stream, in whichever transaction comes first
            self._relation(msg)
        elif self.own_txn:
            return
        elif kind == 0x49:  # 'I'
            self._insert(msg)
        elif kind == 0x55:  # 'U'
            self._update(msg)
        elif kind == 0x44:  # 'D'
            self._delete(msg)
        elif kind == 0x4D:  # 'M': flags, LSN, prefix, length, content
            prefix, _ = _cstring(msg, 10)
            if msg[1] & 1 and prefix == OWN_PREFIX and self.in_txn:
                self.own_txn = True

    def take(self) -> dict[str, list[str]]:
        """The pending keys as JSON objects of text values, by pipeline; clears them."""
        out = {
            name: [
                orjson.dumps(
                    {k: v.decode() for k, v in zip(self.key_names[name], key, strict=True)}
                ).decode()
                for key in keys
            ]
            for name, keys in self.keys.items()
            if keys
        }
        self.keys.clear()
        self.pending = 0
        return out

    def _relation(self, msg: bytes) -> None:
        (relid,) = _I32.unpack_from(msg, 1)
        schema, pos = _cstring(msg, 5)
        table, pos = _cstring(msg, pos)
        pos += 1  # replica identity
        (ncols,) = _I16.unpack_from(msg, pos)
        pos += 2
        names: list[str] = []
        for _ in range(ncols):
            name, pos = _cstring(msg, pos + 1)
            names.append(name)
            pos += 8  # type oid, type modifier
        index = {n: i for i, n in enumerate(names)}
        watches = []
        for p in self.pipelines:
            if (p.schema_name, p.table_name) != (schema or "pg_catalog", table):
                continue
            keys = self.key_names[p.name]
            missing = [c for c in (*keys, *p.text) if c not in index]
            if missing:
                # The publication was changed by hand: say so rather than lose changes.
                raise SlotError(
                    f"pipeline {p.name!r}: the slot's changes to {p.table} lack columns "
                    f"{missing}: run `syncer install` to set the publication's columns again"
                )
            watches.append(
                Watch(
                    p.name,
                    tuple(index[c] for c in keys),
                    tuple(index[c] for c in p.text),
                    p.target == "table",
                )
            )
        self.relations[relid] = watches

    def _add(self, w: Watch, row: Tuple) -> None:
        key = tuple(row[i] for i in w.key_idx)
        if any(v is None or v is UNCHANGED for v in key):
            log.error(
                "a change without its key values was skipped",
                extra={"pipeline": w.pipeline},
            )
            return
        bucket = self.keys.setdefault(w.pipeline, set())
        before = len(bucket)
        bucket.add(key)  # type: ignore[arg-type]
        self.pending += len(bucket) - before

    def _watches(self, msg: bytes) -> list[Watch]:
        (relid,) = _I32.unpack_from(msg, 1)
        return self.relations.get(relid, [])

    def _insert(self, msg: bytes) -> None:
        watches = self._watches(msg)
        if not watches:
            return
        row, _ = _tuple(msg, 6)
        for w in watches:
            # Like the insert trigger: a row with no text at all has nothing to embed.
            if any(row[i] for i in w.text_idx):
                self._add(w, row)

    def _update(self, msg: bytes) -> None:
        watches = self._watches(msg)
        if not watches:
            return
        old: Tuple | None = None
        pos = 5
        # 'K': the old key, sent when it changed; 'O': the whole old row (REPLICA IDENTITY
        # FULL), sent on every update.
        whole_old = msg[pos] == 0x4F
        if msg[pos] in (0x4B, 0x4F):
            old, pos = _tuple(msg, pos + 1)
        new, _ = _tuple(msg, pos + 1)
        for w in watches:
            key_moved = old is not None and any(old[i] != new[i] for i in w.key_idx)
            if not key_moved and all(
                new[i] is UNCHANGED or (whole_old and old is not None and old[i] == new[i])
                for i in w.text_idx
            ):
                continue  # the text is as it was: a TOASTed value left alone, or equal
            # Otherwise queued: the worker's hash check makes an unchanged text free.
            self._add(w, new)
            if key_moved and old is not None:
                self._add(w, old)

    def _delete(self, msg: bytes) -> None:
        watches = self._watches(msg)
        if not watches:
            return
        old, _ = _tuple(msg, 6)
        for w in watches:
            if w.deletes:
                self._add(w, old)


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
            except (psycopg2.Error, OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as err:
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
                        self._flush(loop, dec, cur)
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
                        self._flush(loop, dec, cur)
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
    ) -> None:
        keys = dec.take()
        if keys:
            asyncio.run_coroutine_threadsafe(self._enqueue(keys), loop).result()
        # Every transaction read in full is queued now; a partial one is read again.
        if dec.last_commit_end > self.confirmed:
            self._confirm(cur, dec.last_commit_end)

    def _confirm(self, cur: psycopg2.extras.ReplicationCursor, lsn: int) -> None:
        cur.send_feedback(flush_lsn=lsn, force=True)  # type: ignore[no-untyped-call]
        self.confirmed = lsn

    async def _enqueue(self, keys: dict[str, list[str]]) -> None:
        async with self.pool.acquire() as conn, conn.transaction():
            for name, batch in keys.items():
                await conn.execute(self.rendered[name]["logical_enqueue"], batch)
                await conn.execute("SELECT pg_notify('syncer', $1)", name)
        for name in keys:
            event = self.wakeups.get(name)
            if event is not None:
                event.set()
