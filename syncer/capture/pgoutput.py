"""A pure decoder of pgoutput (protocol version 1): the messages syncer needs, turned into
the keys of pending work. It does no I/O; the slot reader (syncer.capture.logical) feeds it
the stream's messages and takes the keys.

syncer's own vector writes (a column target is a column of the watched table) would come
back through the slot: the writer marks its transactions with a transactional logical
message (OWN_PREFIX), and the decoder drops the changes of a marked transaction.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import orjson

from syncer import targets
from syncer.config import PipelineConfig
from syncer.errors import SlotError
from syncer.targets.store import OWN_PREFIX

log = logging.getLogger("syncer.logical")

_I16 = struct.Struct("!h")
_I32 = struct.Struct("!i")
_U32 = struct.Struct("!I")
_U64 = struct.Struct("!Q")


@dataclass(frozen=True)
class Watch:
    """One pipeline watching one relation, by the positions of its columns there."""

    pipeline: str
    key_idx: tuple[int, ...]
    text_idx: tuple[int, ...]
    deletes: bool  # a side-table target must hear of deleted rows; a column target need not
    watch_idx: tuple[int, ...] = ()  # the columns whose change is work (text, and more)


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


@dataclass(frozen=True)
class Changes:
    """What a flush queues: truncations first (keys read before them are dropped), then
    keys; once the xids are visible."""

    keys: dict[str, list[str]]
    truncated: set[str]
    xids: set[int]

    def __bool__(self) -> bool:
        return bool(self.keys or self.truncated)


@dataclass
class Decoder:
    """pgoutput protocol version 1: the messages syncer needs, turned into pending keys.

    Keys are gathered per pipeline as tuples of the key columns' text forms; `take()` hands
    them over, with the (32-bit) xids of the transactions they came from. Once they are
    queued, the slot may be confirmed up to `last_commit_end`.
    """

    pipelines: Sequence[PipelineConfig]
    key_names: Mapping[str, tuple[str, ...]]
    relations: dict[int, list[Watch]] = field(default_factory=dict)
    keys: dict[str, set[tuple[bytes, ...]]] = field(default_factory=dict)
    xids: set[int] = field(default_factory=set)  # the transactions the pending keys are from
    truncated: set[str] = field(default_factory=set)  # pipelines whose source was truncated
    pending: int = 0
    in_txn: bool = False
    xid: int = 0  # the transaction being read
    own_txn: bool = False
    last_commit_end: int = 0  # the end of the last transaction read in full

    def feed(self, msg: bytes) -> None:
        kind = msg[0]
        if kind == 0x42:  # 'B': final LSN, commit timestamp, xid
            self.in_txn, self.own_txn = True, False
            (self.xid,) = _U32.unpack_from(msg, 17)
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
        elif kind == 0x54:  # 'T': relation count, options, relation ids
            self._truncate(msg)
        elif kind == 0x4D:  # 'M': flags, LSN, prefix, length, content
            prefix, _ = _cstring(msg, 10)
            if msg[1] & 1 and prefix == OWN_PREFIX and self.in_txn:
                self.own_txn = True

    def take(self) -> Changes:
        """The pending keys as JSON objects of text values, by pipeline, the pipelines
        truncated before them, and the xids of their transactions; clears them."""
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
        xids, self.xids = self.xids, set()
        truncated, self.truncated = self.truncated, set()
        self.keys.clear()
        self.pending = 0
        return Changes(out, truncated, xids)

    def _truncate(self, msg: bytes) -> None:
        (n,) = _I32.unpack_from(msg, 1)
        for i in range(n):
            (relid,) = _I32.unpack_from(msg, 6 + 4 * i)
            for w in self.relations.get(relid, []):
                # What was pending for it is gone with the rows; keys read later are kept.
                self.pending -= len(self.keys.pop(w.pipeline, ()))
                self.truncated.add(w.pipeline)
                self.xids.add(self.xid)
                self.pending += 1

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
            missing = [c for c in (*keys, *p.watched_columns) if c not in index]
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
                    targets.for_pipeline(p).needs_deletes,
                    tuple(index[c] for c in p.watched_columns),
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
        self.xids.add(self.xid)  # even for a key already pending: this version must be seen
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
                for i in w.watch_idx
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
