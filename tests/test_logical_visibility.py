"""Logical mode: a commit can be read from the slot before other sessions can see it.

A committing backend flushes its commit record, then (with a synchronous standby) waits
for the standby, and only then leaves the ProcArray: from that moment on, new snapshots
see the transaction. A logical walsender decodes up to the flush pointer, so the reader may
hold a commit that a worker reading the row cannot see yet. Such a worker would find the
old text ("unchanged") or no row at all ("cleared"), finish the item, and the change would
be lost: no vector, no queue item, no dead letter.

This module's server names a synchronous standby that never comes, so a commit made with
synchronous_commit = on is flushed, decodable and invisible until its wait is cancelled.
syncer's own sessions commit with the server's default (off) and never wait.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import pytest

from syncer.capture.logical import SlotReader
from tests.conftest import LOGICAL_SETTINGS, start_pg, syncer, wait_for
from tests.test_pipeline import DIM, composed, create_docs, fake_vector
from tests.test_resilience import Background, background, dead, one, queued, until

__all__ = ["background"]  # a fixture, used by name

STRESS_S = 10.0  # how long the writers write
WRITERS = 2
HOGS = 2  # busy loops beside the writers' backends


@pytest.fixture(scope="module")
def pg() -> Iterator[Any]:
    server = start_pg({**LOGICAL_SETTINGS, "synchronous_standby_names": "nobody"})
    yield server
    server.stop()


def slot_confirmed_past(db: psycopg.Connection[Any], slot: str, lsn: str) -> bool:
    return bool(
        one(
            db,
            "SELECT coalesce(confirmed_flush_lsn >= %s::pg_lsn, false) "
            "FROM pg_replication_slots WHERE slot_name = %s",
            lsn,
            slot,
        )
    )


def flushed(db: psycopg.Connection[Any]) -> str:
    return str(one(db, "SELECT pg_current_wal_flush_lsn()::text"))


def items_made(db: psycopg.Connection[Any]) -> int:
    """How many queue items were ever made (the identity's last value)."""
    return int(
        one(
            db,
            "SELECT coalesce(last_value, 0) FROM pg_sequences "
            "WHERE schemaname = 'syncer' AND sequencename = 'queue_id_seq'",
        )
    )


def stale(db: psycopg.Connection[Any]) -> list[tuple[int, str]]:
    """The rows (id, text) whose vector is missing or not that of their current text."""
    out = []
    for id_, title, body, emb in db.execute("SELECT id, title, body, embedding FROM docs"):
        text = composed(title, body) or ""
        if emb is None or not np.allclose(emb.to_numpy(), fake_vector(text, DIM), rtol=1e-6):
            out.append((id_, text))
    return sorted(out)


def settle(db: psycopg.Connection[Any], bg: Background, slot: str) -> None:
    """Wait until the reader has queued every change flushed so far and the worker has
    finished every item: what is not embedded then never will be."""
    end = flushed(db)
    until(
        bg,
        lambda: slot_confirmed_past(db, slot, end) and queued(db) == 0,
        timeout_s=60,
        what="the slot read to the end and the queue empty",
    )
    assert dead(db) == []


@pytest.fixture()
def start(
    db: psycopg.Connection[Any],
    make_config: Callable[..., Path],
    logical: dict[str, str],
    background: Callable[..., Background],
) -> Callable[[str], Background]:
    """Fill docs with a statement, install logical mode, and run syncer until every row
    is embedded."""

    def start(fill: str) -> Background:
        create_docs(db)
        db.execute(fill)
        config = make_config(capture=logical)
        assert syncer(config, "install").returncode == 0
        bg = background(config)
        until(
            bg,
            lambda: one(db, "SELECT count(*) FROM docs WHERE embedding IS NULL") == 0,
            timeout_s=60,
            what="the rows embedded",
        )
        return bg

    return start


def test_a_commit_read_before_it_is_visible_is_not_lost(
    db: psycopg.Connection[Any],
    db_url: str,
    logical: dict[str, str],
    start: Callable[[str], Background],
) -> None:
    bg = start("INSERT INTO docs VALUES (1, 'Old', 'text', 'a')")
    before = items_made(db)

    # One transaction, both symptoms: an update of an embedded row and an insert.
    writer = psycopg.connect(db_url)
    writer.execute("SET synchronous_commit = on")
    writer.execute("UPDATE docs SET body = 'new text' WHERE id = 1")
    writer.execute("INSERT INTO docs VALUES (2, 'Inserted', 'row', 'b') ON CONFLICT DO NOTHING")
    commit = threading.Thread(target=writer.commit)
    commit.start()
    try:
        pid = writer.info.backend_pid
        wait_for(
            lambda: one(
                db, "SELECT wait_event = 'SyncRep' FROM pg_stat_activity WHERE pid = %s", pid
            ),
            what="the commit flushed and waiting for the standby",
        )
        # Held back by the reader (the fix), or queued and finished while invisible (the bug).
        until(
            bg,
            lambda: (
                "not visible yet" in bg.stderr() or (items_made(db) > before and queued(db) == 0)
            ),
            timeout_s=30,
            what="the reader to hold the commit back, or its items to be finished",
        )
        db.execute("SELECT pg_cancel_backend(%s)", (pid,))  # the commit completes locally
        commit.join(timeout=10)
        assert not commit.is_alive()
    finally:
        writer.close()
    settle(db, bg, logical["slot"])
    assert stale(db) == []
    assert bg.stop() == 0


class Hogs:
    """Busy loops on CPU 0, where the writers' backends are."""

    def __init__(self) -> None:
        code = "import os; os.sched_setaffinity(0, {0})\nwhile True: pass"
        self.procs = [subprocess.Popen([sys.executable, "-c", code]) for _ in range(HOGS)]

    def stop(self) -> None:
        for p in self.procs:
            p.kill()
            p.wait(10)


def write_single_rows(db_url: str, writer: int, for_s: float) -> int:
    """Single-row commits (text updates of embedded rows, inserts) from a starved backend,
    each flushed by the backend itself (synchronous_commit = local); returns how many."""
    rng = random.Random(writer)
    with psycopg.connect(db_url, autocommit=True) as w:
        w.execute("SET synchronous_commit = local")
        os.sched_setscheduler(w.info.backend_pid, os.SCHED_IDLE, os.sched_param(0))
        os.sched_setaffinity(w.info.backend_pid, {0})
        n, next_id = 0, 1_000_000 * (writer + 1)
        deadline = time.monotonic() + for_s
        while time.monotonic() < deadline:
            if n % 2:
                w.execute(
                    "INSERT INTO docs VALUES (%s, 'New', 'row', 'x') ON CONFLICT DO NOTHING",
                    (next_id,),
                )
                next_id += 1
            else:
                w.execute(
                    "UPDATE docs SET body = %s WHERE id = %s", (f"v{n}", rng.randint(1, 1000))
                )
            n += 1
        return n


def test_many_single_row_commits_under_cpu_pressure(
    db: psycopg.Connection[Any],
    db_url: str,
    logical: dict[str, str],
    start: Callable[[str], Background],
) -> None:
    """The same race, unforced: two writers' backends (SCHED_IDLE: any other task runs
    first), the walsender and two busy loops share CPU 0. A writer's WAL flush wakes the
    walsender, which may take the CPU before the writer leaves the ProcArray; the writer
    then waits behind the busy loops while its change travels to the worker. Before the
    fix this lost one or two of ~3,000 commits in about one run of four here; the test
    above fails every time."""
    slot = logical["slot"]
    bg = start(
        "INSERT INTO docs SELECT g, 'Row', 'body ' || g, 'x' FROM generate_series(1, 1000) g"
    )
    walsender = wait_for(
        lambda: one(db, "SELECT active_pid FROM pg_replication_slots WHERE slot_name = %s", slot),
        what="the reader streaming the slot",
    )
    os.sched_setaffinity(walsender, {0})
    hogs = Hogs()
    try:
        with ThreadPoolExecutor(WRITERS) as pool:
            runs = [pool.submit(write_single_rows, db_url, i, STRESS_S) for i in range(WRITERS)]
            commits = sum(r.result() for r in runs)
    finally:
        hogs.stop()
    settle(db, bg, slot)
    lost = stale(db)
    assert lost == [], f"{len(lost)} of {commits} commits lost: {lost[:5]}"
    assert bg.stop() == 0


def test_visibility_of_32_bit_xids_in_a_snapshot() -> None:
    visible = SlotReader._visible_in
    assert visible("100:105:102,104", {99, 101, 103})
    assert not visible("100:105:102,104", {101, 102})  # still in progress
    assert not visible("100:105:", {105})  # at or past xmax: not yet completed
    epoch = 1 << 32  # the second epoch: the low 32 bits wrapped around
    snap = f"{epoch - 10}:{epoch + 5}:{epoch + 2}"
    assert visible(snap, {(epoch - 20) % epoch, epoch - 3, 1})  # both sides of the wrap
    assert not visible(snap, {2}) and not visible(snap, {7})
