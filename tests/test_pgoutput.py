"""Unit tests for syncer.capture.pgoutput on hand-built pgoutput (protocol 1) messages:
no database, no slot."""

from __future__ import annotations

import struct
from typing import Any

import orjson
import pytest

from syncer.capture.pgoutput import UNCHANGED, Decoder
from syncer.config import PipelineConfig
from syncer.errors import SlotError
from syncer.targets.store import OWN_PREFIX

DOCS = 16384  # the relation id the messages use for public.docs
COLUMNS = ("id", "title", "body", "tag")
Value = str | bytes | None  # bytes: UNCHANGED (a TOASTed value the update left alone)


def pipeline(name: str = "docs", **fields: Any) -> PipelineConfig:
    return PipelineConfig(
        name=name,
        table="public.docs",
        text=("title", "body"),
        provider="fake",
        model="m",
        dimensions=8,
        **fields,
    )


def _cstring(s: str) -> bytes:
    return s.encode() + b"\0"


def relation(relid: int, columns: tuple[str, ...] = COLUMNS, table: str = "docs") -> bytes:
    out = b"R" + struct.pack("!i", relid) + _cstring("public") + _cstring(table) + b"d"
    out += struct.pack("!h", len(columns))
    for c in columns:
        out += b"\x01" + _cstring(c) + struct.pack("!ii", 25, -1)  # key flag, text, no typmod
    return out


def tuple_data(values: tuple[Value, ...]) -> bytes:
    out = struct.pack("!h", len(values))
    for v in values:
        if v is None:
            out += b"n"
        elif v is UNCHANGED:
            out += b"u"
        else:
            assert isinstance(v, str)
            out += b"t" + struct.pack("!i", len(v.encode())) + v.encode()
    return out


def begin(xid: int = 700) -> bytes:
    return b"B" + struct.pack("!QqI", 0x1000, 0, xid)


def commit(end_lsn: int) -> bytes:
    return b"C" + b"\0" + struct.pack("!QQq", end_lsn - 8, end_lsn, 0)


def insert(*new: Value, relid: int = DOCS) -> bytes:
    return b"I" + struct.pack("!i", relid) + b"N" + tuple_data(new)


def update(
    new: tuple[Value, ...], old: tuple[Value, ...] | None = None, kind: bytes = b"K"
) -> bytes:
    before = kind + tuple_data(old) if old is not None else b""
    return b"U" + struct.pack("!i", DOCS) + before + b"N" + tuple_data(new)


def delete(*old: Value) -> bytes:
    return b"D" + struct.pack("!i", DOCS) + b"K" + tuple_data(old)


def message(prefix: str, transactional: bool = True) -> bytes:
    flags = b"\x01" if transactional else b"\x00"
    return b"M" + flags + struct.pack("!Q", 0x1000) + _cstring(prefix) + struct.pack("!i", 0)


def decoder(*pipelines: PipelineConfig) -> Decoder:
    dec = Decoder(pipelines or (pipeline(),), {p.name: ("id",) for p in pipelines or (pipeline(),)})
    dec.feed(relation(DOCS))
    return dec


def txn(dec: Decoder, *changes: bytes, end_lsn: int = 0x2000) -> dict[str, list[int]]:
    """Feed one transaction; the ids it queued, by pipeline."""
    for msg in (begin(), *changes, commit(end_lsn)):
        dec.feed(msg)
    taken = dec.take()
    keys_by_pipeline, xids = taken.keys, taken.xids
    assert xids == ({700} if keys_by_pipeline else set())  # what the reader waits to see
    return {
        name: sorted(int(orjson.loads(k)["id"]) for k in keys)
        for name, keys in keys_by_pipeline.items()
    }


def test_insert_queues_rows_with_text_and_confirms_up_to_the_commit() -> None:
    dec = decoder()
    got = txn(
        dec,
        insert("1", "a", None, "x"),
        insert("2", None, None, "y"),  # no text: nothing to embed
        insert("4", "", "", "z"),
        insert("5", "five", None, None, relid=DOCS + 1),  # a relation nobody watches
        end_lsn=0x2A00,
    )
    assert got == {"docs": [1]}
    assert dec.last_commit_end == 0x2A00 and not dec.in_txn and dec.pending == 0


def test_key_values_are_queued_as_the_triggers_write_them() -> None:
    dec = decoder()
    for msg in (begin(), insert("7", "a", None, None), commit(0x2000)):
        dec.feed(msg)
    assert dec.pending == 1
    taken = dec.take()
    assert (taken.keys, taken.xids) == ({"docs": ['{"id":"7"}']}, {700})


def test_update_queues_text_changes_and_both_keys_of_a_moved_row() -> None:
    dec = decoder()
    assert txn(dec, update(("1", "new", None, "x"))) == {"docs": [1]}
    # An unrelated column: the text columns are TOASTed values left alone.
    assert txn(dec, update(("1", UNCHANGED, UNCHANGED, "y"))) == {}
    # The key moved: 'K' carries the old key (the other columns are NULL in it).
    assert txn(dec, update(("3", "a", None, "x"), old=("1", None, None, None))) == {"docs": [1, 3]}


def test_update_with_the_whole_old_row_skips_an_unchanged_text() -> None:
    """REPLICA IDENTITY FULL: 'O' sends the old row on every update; a text equal to the
    old one (or TOASTed and left alone) is not queued."""
    dec = decoder()
    old = ("1", "a", "long body", "x")
    assert txn(dec, update(("1", "a", UNCHANGED, "y"), old=old, kind=b"O")) == {}
    assert txn(dec, update(("1", "a", "long body", "y"), old=old, kind=b"O")) == {}
    assert txn(dec, update(("1", "b", UNCHANGED, "y"), old=old, kind=b"O")) == {"docs": [1]}


def test_delete_is_queued_only_for_a_target_that_must_hear_of_it() -> None:
    column = pipeline("docs")
    side = pipeline("docs_side", target="table", target_table="public.docs_vectors")
    dec = decoder(column, side)
    assert txn(dec, delete("9", None, None, None)) == {"docs_side": [9]}


def test_changes_of_a_marked_transaction_are_dropped() -> None:
    dec = decoder()
    own = txn(dec, message(OWN_PREFIX), update(("1", "written by syncer", None, None)))
    assert own == {} and dec.last_commit_end == 0x2000
    # The mark lasts one transaction; other prefixes and untransactional ones mark nothing.
    assert txn(dec, update(("1", "by the user", None, None))) == {"docs": [1]}
    other = txn(
        dec,
        message("someone_else"),
        message(OWN_PREFIX, transactional=False),
        update(("2", "b", None, None)),
    )
    assert other == {"docs": [2]}


def test_a_change_without_its_key_is_skipped_and_logged(caplog: Any) -> None:
    dec = decoder()
    assert txn(dec, insert(None, "a", None, None), insert("2", "b", None, None)) == {"docs": [2]}
    assert any("without its key values" in r.getMessage() for r in caplog.records)


def test_relation_without_a_needed_column_is_a_clear_error() -> None:
    dec = Decoder((pipeline(),), {"docs": ("id",)})
    with pytest.raises(SlotError, match=r"lack columns \['body'\].*syncer install"):
        dec.feed(relation(DOCS, ("id", "title", "tag")))
    dec.feed(relation(DOCS + 1, ("id", "x"), table="other"))  # not watched: no error
    assert dec.relations[DOCS + 1] == []


def truncate(*relids: int) -> bytes:
    return (
        b"T" + struct.pack("!ib", len(relids), 1) + b"".join(struct.pack("!i", r) for r in relids)
    )


def test_truncate_drops_what_was_pending_before_it_and_keeps_what_follows() -> None:
    dec = decoder()
    for msg in (begin(), insert("1", "a", None, None), commit(0x2000)):
        dec.feed(msg)
    for msg in (begin(701), truncate(DOCS + 1, DOCS), insert("2", "b", None, None), commit(0x3000)):
        dec.feed(msg)
    taken = dec.take()
    assert taken.truncated == {"docs"} and taken.keys == {"docs": ['{"id":"2"}']}
    assert taken.xids == {700, 701} and bool(taken)
    # A truncate alone is still something to flush (the reader must act on it).
    for msg in (begin(702), truncate(DOCS), commit(0x4000)):
        dec.feed(msg)
    assert dec.pending == 1 and dec.take().truncated == {"docs"}
