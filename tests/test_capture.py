"""Trigger capture: what reaches the inbox, when the triggers NOTIFY, and that skipping a
NOTIFY while a worker is awake never strands a change."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import asyncpg
import numpy as np
import psycopg

from syncer.capture.trigger import InboxMover
from syncer.db import Database
from syncer.sqlfiles import query
from syncer.testing.fake_embedder import FakeEmbedderProcess, fake_vector
from tests.conftest import start_syncer, syncer, wait_for
from tests.test_pipeline import DEFAULT_PIPELINE, assert_synced, create_docs
from tests.test_processes import stop_all

AWAKE = "SELECT setval('syncer.awake_until', extract(epoch FROM clock_timestamp())::bigint + %s)"


def captured(db: psycopg.Connection[Any]) -> list[tuple[str, str]]:
    return db.execute("SELECT pipeline, key->>'id' FROM syncer.inbox ORDER BY 2").fetchall()


def notifications(listener: psycopg.Connection[Any], within_s: float) -> list[str]:
    """The `syncer_inbox` payloads that arrive within `within_s` (the deadline of a check
    that nothing arrives, or of the wait for one)."""
    return [n.payload for n in listener.notifies(timeout=within_s, stop_after=1)]


def test_triggers_capture_text_and_key_changes_only(
    db: psycopg.Connection[Any], make_config: Any, fake: FakeEmbedderProcess
) -> None:
    create_docs(db)
    assert syncer(make_config(), "install").returncode == 0
    db.execute(
        "INSERT INTO docs VALUES (1, 'a', NULL, 'x'), (2, NULL, NULL, 'y'), (4, '', '', 'z')"
    )
    assert captured(db) == [("docs", "1")]  # rows 2 and 4 have no text
    db.execute("DELETE FROM syncer.inbox")
    db.execute("UPDATE docs SET tag = 'z'")  # not part of the text
    db.execute("UPDATE docs SET title = 'a' WHERE id = 1")  # the same text
    assert captured(db) == []
    db.execute("UPDATE docs SET body = 'b' WHERE id = 2")
    db.execute("UPDATE docs SET id = 3 WHERE id = 1")  # the key moved: both keys are work
    assert captured(db) == [("docs", "1"), ("docs", "2"), ("docs", "3")]


def test_key_change_moves_the_side_table_row(
    db: psycopg.Connection[Any], make_config: Any, fake: FakeEmbedderProcess
) -> None:
    create_docs(db)
    config = make_config(
        {**DEFAULT_PIPELINE, "target": "table", "target_table": "public.docs_vectors"}
    )
    db.execute("INSERT INTO docs VALUES (1, 'one', NULL, NULL), (2, 'two', NULL, NULL)")
    assert syncer(config, "install").returncode == 0
    assert syncer(config, "run", "--exit-when-idle").returncode == 0
    db.execute("UPDATE docs SET id = 10 WHERE id = 1")
    r = syncer(config, "run", "--exit-when-idle")
    assert r.returncode == 0, r.stderr
    assert db.execute("SELECT id FROM docs_vectors ORDER BY id").fetchall() == [(2,), (10,)]
    sql = "SELECT d.title, d.body, v.embedding FROM docs d LEFT JOIN docs_vectors v USING (id)"
    assert assert_synced(db, sql) == 2
    # The side table is keyed by the source key, so the moved row is embedded again.
    assert sorted(fake.inputs()) == ["one", "one", "two"]


def test_no_notify_while_a_worker_is_awake(
    db: psycopg.Connection[Any], db_url: str, make_config: Any, fake: FakeEmbedderProcess
) -> None:
    create_docs(db)
    assert syncer(make_config(), "install").returncode == 0
    with psycopg.connect(db_url, autocommit=True) as listener:
        listener.execute("LISTEN syncer_inbox")
        db.execute("INSERT INTO docs VALUES (1, 'a', NULL, NULL)")
        assert notifications(listener, 5) == ["docs"]  # nobody awake: wake them

        db.execute(AWAKE, (60,))
        db.execute("INSERT INTO docs VALUES (2, 'b', NULL, NULL)")
        db.execute("UPDATE docs SET title = 'c' WHERE id = 1")
        assert notifications(listener, 0.5) == []  # a worker is awake and will look anyway
        assert len(captured(db)) == 3  # captured all the same

        db.execute(AWAKE, (-1,))  # that worker's "awake" has run out (it crashed)
        db.execute("UPDATE docs SET title = 'd' WHERE id = 1")
        assert notifications(listener, 5) == ["docs"]


def test_change_committed_after_the_worker_fell_asleep_is_embedded(
    db: psycopg.Connection[Any], db_url: str, make_config: Any, fake: FakeEmbedderProcess
) -> None:
    """A transaction that saw the worker awake sends no NOTIFY. If it commits only after
    the worker went to sleep, the worker must still see it at once: not at its next poll."""
    create_docs(db)
    config = make_config(worker={"poll_interval_s": 120})  # a poll cannot explain success
    db.execute("INSERT INTO docs VALUES (1, 'first', NULL, NULL)")
    assert syncer(config, "install").returncode == 0
    proc = start_syncer(config, "run")
    stop_writing = threading.Event()

    def keep_worker_awake() -> None:
        with psycopg.connect(db_url, autocommit=True) as conn:
            i = 1000
            while not stop_writing.is_set():
                i += 1
                conn.execute("INSERT INTO docs VALUES (%s, 'filler', NULL, NULL)", (i,))
                time.sleep(0.01)  # a steady trickle of writes, not a synchronisation

    writer = threading.Thread(target=keep_worker_awake)
    try:
        wait_for(lambda: assert_fresh(db, 1), 60, "the first vector")
        writer.start()
        with psycopg.connect(db_url) as late:

            def update_while_awake() -> bool:
                late.execute("UPDATE docs SET title = 'late edit' WHERE id = 1")
                if awake_now(late):
                    return True
                late.rollback()
                return False

            wait_for(update_while_awake, 30, "an update made while the worker is awake")
            stop_writing.set()
            writer.join()
            # The worker falls asleep while this transaction is still open ...
            wait_for(lambda: not awake_now(db), 30, "the worker to go to sleep")
            late.commit()  # ... and only now does the edit become visible, with no NOTIFY.
        wait_for(lambda: text_of_vector(db, 1) == "late edit", 10, "the late edit's vector")
    finally:
        stop_writing.set()
        if writer.is_alive():
            writer.join()
        stop_all([proc])


def awake_now(db: psycopg.Connection[Any]) -> bool:
    row = db.execute(
        "SELECT coalesce(pg_sequence_last_value('syncer.awake_until'), 0)"
        " > extract(epoch FROM clock_timestamp())"
    ).fetchone()
    return bool(row and row[0])


def assert_fresh(db: psycopg.Connection[Any], key: int) -> bool:
    row = db.execute("SELECT embedding IS NOT NULL FROM docs WHERE id = %s", (key,)).fetchone()
    return bool(row and row[0])


def text_of_vector(db: psycopg.Connection[Any], key: int) -> str | None:
    """The title whose text the stored vector was computed from (None: no vector yet)."""
    title, emb = db.execute("SELECT title, embedding FROM docs WHERE id = %s", (key,)).fetchone()
    if emb is None:
        return None
    if np.allclose(np.asarray(emb.to_list()), fake_vector(title, 8), rtol=1e-6):
        return str(title)
    return None


def test_run_asks_for_install_after_an_upgrade(
    db: psycopg.Connection[Any], make_config: Any, fake: FakeEmbedderProcess
) -> None:
    create_docs(db)
    config = make_config()
    assert syncer(config, "install").returncode == 0
    db.execute("DELETE FROM syncer.schema_version; INSERT INTO syncer.schema_version VALUES (1)")
    r = syncer(config, "run", "--exit-when-idle")
    assert r.returncode != 0
    assert "version 1" in r.stderr and "run `syncer install` again" in r.stderr, r.stderr
    assert syncer(config, "install").returncode == 0
    db.execute("INSERT INTO docs VALUES (1, 'after the upgrade', NULL, NULL)")
    r = syncer(config, "run", "--exit-when-idle")
    assert r.returncode == 0, r.stderr
    assert assert_synced(db) == 1


async def test_the_mover_keeps_the_inbox_from_filling_with_dead_rows(
    db: psycopg.Connection[Any], db_url: str, make_config: Any
) -> None:
    """Each move scans the whole inbox, dead rows included: left to autovacuum (a minute
    away), a steady stream makes every move slower. The mover vacuums it as it goes."""
    create_docs(db)
    assert syncer(make_config(), "install").returncode == 0
    db.execute("ALTER TABLE syncer.inbox SET (autovacuum_enabled = off)")  # no help from it
    pool = await asyncpg.create_pool(db_url, min_size=1, max_size=2)
    try:
        mover = InboxMover(Database(pool), {}, asyncio.Event(), poll_s=1.0)
        mover.may_vacuum = bool(await pool.fetchval(query("inbox_may_vacuum")))
        assert mover.may_vacuum  # the test's role owns the inbox
        rows, per_move = 60_000, 500  # ~430 pages of inbox rows in all
        for start in range(0, rows, per_move):
            db.execute(
                "INSERT INTO syncer.inbox SELECT 'docs', jsonb_build_object('id', g) "
                "FROM generate_series(%s::int, %s::int) g",
                (start, start + per_move - 1),
            )
            assert await mover.move_all() == per_move
        pages = db.execute("SELECT pg_relation_size('syncer.inbox') / 8192").fetchone()
        queued = db.execute("SELECT count(*) FROM syncer.queue").fetchone()
    finally:
        await pool.close()
    assert queued == (rows,)
    assert pages is not None and pages[0] < 150, f"{pages[0]} pages of inbox for an empty inbox"


async def test_a_role_that_cannot_vacuum_the_inbox_is_told_and_still_moves(
    db: psycopg.Connection[Any], db_url: str, make_config: Any, caplog: Any
) -> None:
    create_docs(db)
    assert syncer(make_config(), "install").returncode == 0
    role = f"mover_{db.info.dbname}"
    db.execute(f"CREATE ROLE {role} LOGIN")
    db.execute(f"GRANT USAGE ON SCHEMA syncer TO {role}")
    db.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA syncer TO {role}")
    db.execute(f"GRANT USAGE, SELECT, UPDATE ON ALL SEQUENCES IN SCHEMA syncer TO {role}")
    db.execute("INSERT INTO syncer.inbox VALUES ('docs', '{\"id\": 1}')")
    pool = await asyncpg.create_pool(db_url, min_size=1, max_size=2, user=role)
    stop = asyncio.Event()
    try:
        mover = InboxMover(Database(pool), {}, asyncio.Event(), poll_s=0.05)
        task = asyncio.create_task(mover.run(stop))
        deadline = time.monotonic() + 10
        while db.execute("SELECT count(*) FROM syncer.queue").fetchone() != (1,):
            assert time.monotonic() < deadline, "the key never reached the queue"
            await asyncio.sleep(0.02)
        stop.set()
        await asyncio.wait_for(task, 10)
    finally:
        await pool.close()
        db.execute(f"DROP OWNED BY {role}")
        db.execute(f"DROP ROLE {role}")
    assert not mover.may_vacuum
    assert any("cannot VACUUM syncer.inbox" in r.getMessage() for r in caplog.records)
