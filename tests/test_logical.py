"""Logical mode: changes come from a replication slot, with no trigger on the user's table."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest

from syncer.app import checked_pipeline
from syncer.capture.logical import SlotReader
from syncer.config import load
from syncer.db import create_pool
from syncer.testing import embedded_pg
from syncer.testing.fake_embedder import FakeEmbedderProcess
from tests.conftest import DEFAULT_PIPELINE, start_syncer, syncer, wait_for
from tests.test_pipeline import assert_synced, create_docs

SIDE = {**DEFAULT_PIPELINE, "target": "table", "target_table": "public.docs_vectors"}


def triggers(db: psycopg.Connection[Any]) -> list[str]:
    rows = db.execute(
        "SELECT tgname FROM pg_trigger WHERE tgrelid = 'docs'::regclass AND NOT tgisinternal"
    ).fetchall()
    return sorted(r[0] for r in rows)


def slot_exists(db: psycopg.Connection[Any], slot: str) -> bool:
    return bool(
        db.execute("SELECT 1 FROM pg_replication_slots WHERE slot_name = %s", (slot,)).fetchone()
    )


def stats_line(stderr: str) -> str:
    return next(line for line in stderr.splitlines() if "pipeline docs:" in line)


def test_install_run_and_no_feedback_loop(
    db: psycopg.Connection[Any],
    make_config: Callable[..., Path],
    fake: FakeEmbedderProcess,
    logical: dict[str, str],
) -> None:
    create_docs(db)
    db.execute("INSERT INTO docs VALUES (1, 'Old', 'row', 'a')")
    config = make_config(capture=logical)
    r = syncer(config, "install")
    assert r.returncode == 0, r.stderr
    assert f"created logical replication slot {logical['slot']}" in r.stdout
    assert triggers(db) == []  # nothing runs inside the user's transactions
    db.execute("INSERT INTO docs VALUES (2, 'Hello', 'world', 'b'), (3, NULL, NULL, 'c')")
    db.execute("UPDATE docs SET body = 'row, changed' WHERE id = 1")

    r = syncer(config, "run", "--exit-when-idle")
    assert r.returncode == 0, r.stderr
    assert assert_synced(db) == 3
    assert sorted(fake.inputs()) == ["Hello\n\nworld", "Old\n\nrow, changed"]

    # syncer's own vector writes went through the slot too: they must not come back as work.
    fake.reset()
    db.execute("UPDATE docs SET tag = 'unrelated' WHERE id = 2")
    r = syncer(config, "run", "--exit-when-idle")
    assert r.returncode == 0, r.stderr
    line = stats_line(r.stderr)
    assert "embedded 0," in line and "unchanged 1," in line, line  # the tag update alone
    assert fake.inputs() == []

    r = syncer(config, "status")
    assert r.returncode == 0, r.stderr
    assert f"logical slot {logical['slot']}: NOT READ by any worker" in r.stdout


def test_live_changes_key_moves_and_deletes_on_a_side_table(
    db: psycopg.Connection[Any],
    make_config: Callable[..., Path],
    fake: FakeEmbedderProcess,
    logical: dict[str, str],
) -> None:
    create_docs(db)
    config = make_config(SIDE, capture=logical)
    assert syncer(config, "install").returncode == 0
    proc = start_syncer(config, "run")
    try:

        def side() -> dict[int, bytes]:
            rows = db.execute("SELECT id, content_hash FROM docs_vectors").fetchall()
            return {r[0]: r[1] for r in rows}

        db.execute("INSERT INTO docs VALUES (1, 'One', 'a', 'x'), (2, 'Two', 'b', 'x')")
        wait_for(lambda: set(side()) == {1, 2}, what="both rows embedded")
        before = side()[1]
        db.execute("UPDATE docs SET body = 'changed' WHERE id = 1")
        wait_for(lambda: side().get(1) not in (None, before), what="the new text embedded")
        db.execute("UPDATE docs SET id = 10 WHERE id = 2")
        wait_for(lambda: set(side()) == {1, 10}, what="the vector to follow the key")
        db.execute("DELETE FROM docs WHERE id = 1")
        wait_for(lambda: set(side()) == {10}, what="the deleted row's vector gone")
        assert sorted(fake.inputs()) == ["One\n\na", "One\n\nchanged", "Two\n\nb", "Two\n\nb"]
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, proc.stderr.read() if proc.stderr else ""


def test_killed_reader_loses_nothing_and_a_standby_takes_over(
    db: psycopg.Connection[Any],
    make_config: Callable[..., Path],
    logical: dict[str, str],
) -> None:
    create_docs(db)
    config = make_config(capture=logical)
    assert syncer(config, "install").returncode == 0
    first, second = start_syncer(config, "run"), start_syncer(config, "run")
    procs = {first.pid: first, second.pid: second}
    try:

        def holder() -> int | None:
            # The reader names its connection after its process.
            row = db.execute(
                "SELECT a.application_name FROM pg_replication_slots s "
                "JOIN pg_stat_activity a ON a.pid = s.active_pid WHERE s.slot_name = %s",
                (logical["slot"],),
            ).fetchone()
            return int(row[0].rsplit(" ", 1)[1]) if row else None

        wait_for(holder, what="one worker reading the slot")
        for i in range(400):
            db.execute(
                "INSERT INTO docs SELECT g, 't' || g, 'b', 'x' FROM generate_series(%s::int, %s::int) g",
                (i * 10, i * 10 + 9),
            )
            if i == 200:  # kill the reader mid-stream, with writes going on
                killed = procs.pop(wait_for(holder, what="the reader"))
                killed.send_signal(signal.SIGKILL)
                killed.wait(timeout=10)
        standby = next(iter(procs))
        wait_for(lambda: holder() == standby, what="the standby to take the slot")
        wait_for(
            lambda: (
                db.execute("SELECT count(*) FROM docs WHERE embedding IS NULL").fetchone()[0]  # type: ignore[index]
                == 0
            ),
            timeout_s=60,
            what="every row embedded by the standby",
        )
        assert db.execute("SELECT count(*) FROM docs").fetchone()[0] == 4000  # type: ignore[index]
        assert assert_synced(db) == 4000
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                p.wait(timeout=30)


def test_switching_modes_moves_pending_work_and_drops_the_slot(
    db: psycopg.Connection[Any],
    make_config: Callable[..., Path],
    fake: FakeEmbedderProcess,
    logical: dict[str, str],
) -> None:
    create_docs(db)
    trigger_config = make_config(capture={**logical, "mode": "trigger"})
    logical_config = make_config(capture=logical)
    assert syncer(trigger_config, "install").returncode == 0
    db.execute("INSERT INTO docs VALUES (1, 'Captured', 'by a trigger', 'a')")  # in the inbox

    r = syncer(logical_config, "install", "--no-backfill")
    assert r.returncode == 0, r.stderr
    assert triggers(db) == [] and slot_exists(db, logical["slot"])
    db.execute("INSERT INTO docs VALUES (2, 'Read', 'from the slot', 'b')")
    r = syncer(logical_config, "run", "--exit-when-idle")
    assert r.returncode == 0, r.stderr
    assert sorted(fake.inputs()) == ["Captured\n\nby a trigger", "Read\n\nfrom the slot"]

    r = syncer(trigger_config, "install", "--no-backfill")
    assert r.returncode == 0, r.stderr
    assert f"dropped logical replication slot {logical['slot']}" in r.stdout
    assert not slot_exists(db, logical["slot"])
    assert len(triggers(db)) == 3  # insert, update, truncate (a column target: no delete)

    assert syncer(logical_config, "install").returncode == 0
    r = syncer(logical_config, "uninstall", "--yes")
    assert r.returncode == 0, r.stderr
    assert not slot_exists(db, logical["slot"])
    assert not db.execute("SELECT 1 FROM pg_publication WHERE pubname = 'syncer'").fetchone()


def test_install_refuses_what_logical_mode_cannot_work_with(
    db: psycopg.Connection[Any],
    make_config: Callable[..., Path],
    logical: dict[str, str],
) -> None:
    # A key that is unique but not the replica identity: deletes would not carry it.
    db.execute("CREATE TABLE docs (id bigint NOT NULL UNIQUE, title text, body text, tag text)")
    config = make_config({**DEFAULT_PIPELINE, "key": ["id"]}, capture=logical)
    r = syncer(config, "install")
    assert r.returncode == 1
    assert "replica identity" in r.stderr and "REPLICA IDENTITY USING INDEX" in r.stderr
    assert not slot_exists(db, logical["slot"])  # nothing was created
    assert not db.execute("SELECT to_regclass('syncer.queue')").fetchone()[0]  # type: ignore[index]
    db.execute("ALTER TABLE docs REPLICA IDENTITY USING INDEX docs_id_key")
    assert syncer(config, "install").returncode == 0

    # A role without REPLICATION.
    role = f"app_{logical['slot']}"  # roles belong to the whole cluster
    db.execute(f"CREATE ROLE {role} LOGIN")
    db.execute(f"GRANT ALL ON SCHEMA public TO {role}")
    db.execute(f"ALTER TABLE docs OWNER TO {role}")
    bad = make_config({**DEFAULT_PIPELINE, "key": ["id"]}, capture={**logical, "slot": "other"})
    bad.write_text(bad.read_text().replace("postgresql://postgres@", f"postgresql://{role}@"))
    r = syncer(bad, "install")
    assert r.returncode == 1, r.stderr
    assert f'ALTER ROLE "{role}" REPLICATION' in r.stderr

    # A typo in the mode, a slot name PostgreSQL would not take.
    typo = make_config(capture={**logical, "mode": "logcal"})
    r = syncer(typo, "install")
    assert r.returncode == 2 and "capture.mode" in r.stderr
    r = syncer(make_config(capture={**logical, "slot": "My-Slot"}), "install")
    assert r.returncode == 2 and "capture.slot" in r.stderr


def test_install_says_how_to_enable_logical_replication(
    tmp_path: Path, fake: FakeEmbedderProcess
) -> None:
    server = embedded_pg.start()  # wal_level = replica, the default
    try:
        with psycopg.connect(server.url(), autocommit=True) as conn:
            conn.execute("CREATE EXTENSION vector")
            create_docs(conn)
        config = tmp_path / "syncer.toml"
        config.write_text(
            f'[database]\nurl = "{server.url()}"\n[capture]\nmode = "logical"\n'
            f'[providers.fake]\nbase_url = "{fake.url}"\napi_key_env = "FAKE_API_KEY"\n'
            '[[pipelines]]\nname = "docs"\ntable = "docs"\ntext = ["title", "body"]\n'
            'provider = "fake"\nmodel = "m"\ndimensions = 8\n'
        )
        r = syncer(config, "install")
        assert r.returncode == 1
        assert "wal_level = logical" in r.stderr and "'replica'" in r.stderr
        assert "ALTER SYSTEM SET wal_level = logical" in r.stderr
    finally:
        server.stop()


def test_run_without_the_slot_says_to_install(
    db: psycopg.Connection[Any], make_config: Callable[..., Path], logical: dict[str, str]
) -> None:
    create_docs(db)
    assert syncer(make_config(), "install").returncode == 0
    r = syncer(make_config(capture=logical), "run", "--exit-when-idle")
    assert r.returncode == 1
    assert f"no replication slot {logical['slot']!r}: run `syncer install`" in r.stderr


def test_exit_when_idle_beside_the_slot_reader(
    db: psycopg.Connection[Any],
    make_config: Callable[..., Path],
    fake: FakeEmbedderProcess,
    logical: dict[str, str],
) -> None:
    """A second worker stands by; with --exit-when-idle it drains the queue and goes."""
    create_docs(db)
    config = make_config(capture=logical)
    assert syncer(config, "install").returncode == 0
    reader = start_syncer(config, "run")
    try:
        wait_for(
            lambda: db.execute(
                "SELECT active FROM pg_replication_slots WHERE slot_name = %s", (logical["slot"],)
            ).fetchone()[0],  # type: ignore[index]
            what="the first worker reading the slot",
        )
        db.execute("INSERT INTO docs VALUES (1, 'A', 'b', 'c')")
        r = syncer(config, "run", "--exit-when-idle", timeout_s=60)
        assert r.returncode == 0, r.stderr
        assert "standing by" in r.stderr
        wait_for(
            lambda: db.execute("SELECT embedding IS NOT NULL FROM docs").fetchone()[0],  # type: ignore[index]
            what="the row embedded",
        )
        assert assert_synced(db) == 1
    finally:
        reader.send_signal(signal.SIGTERM)
        assert reader.wait(timeout=30) == 0


def test_replica_identity_full_and_untouched_large_text(
    db: psycopg.Connection[Any],
    make_config: Callable[..., Path],
    fake: FakeEmbedderProcess,
    logical: dict[str, str],
) -> None:
    """A table keyed by a unique index works with REPLICA IDENTITY FULL, which also tells
    an untouched text apart; with an index identity, a text stored out of line (TOASTed)
    that the update left alone does too. Neither kind of update is even queued."""
    db.execute("CREATE TABLE docs (id bigint NOT NULL UNIQUE, title text, body text, tag text)")
    db.execute("ALTER TABLE docs REPLICA IDENTITY FULL")
    db.execute("ALTER TABLE docs ALTER body SET STORAGE EXTERNAL")  # out of line over ~2 KB
    pipeline = {**DEFAULT_PIPELINE, "key": ["id"], "text": ["body"]}
    config = make_config(pipeline, capture=logical)
    assert syncer(config, "install").returncode == 0
    big = " ".join(f"w{i}" for i in range(1000))  # ~5 KB
    db.execute("INSERT INTO docs VALUES (1, 't', %s, 'a'), (2, 't', 'small', 'a')", (big,))
    r = syncer(config, "run", "--exit-when-idle")
    assert r.returncode == 0, r.stderr
    assert sorted(fake.inputs()) == sorted([big, "small"])

    fake.reset()
    db.execute("UPDATE docs SET tag = 'unrelated', title = 'not embedded' WHERE id = 2")
    db.execute("UPDATE docs SET id = 20 WHERE id = 1")  # the big row moves
    db.execute("ALTER TABLE docs REPLICA IDENTITY USING INDEX docs_id_key")
    db.execute("UPDATE docs SET tag = 'unrelated' WHERE id = 20")
    r = syncer(config, "run", "--exit-when-idle")
    assert r.returncode == 0, r.stderr
    line = stats_line(r.stderr)
    # Only the key move: key 20 (its text came along: unchanged) and key 1 (gone).
    assert "embedded 0, unchanged 1, cleared 1," in line, line
    assert fake.inputs() == []


async def test_a_connection_broken_while_queueing_is_read_again(
    db: psycopg.Connection[Any],
    make_config: Callable[..., Path],
    logical: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A restart can cut the pool connection that queues what the reader read; asyncpg then
    raises InternalClientError, not a PostgresError. The reader must read those changes
    again from the last confirmed position, not die (a chaos soak saw a worker exit 1)."""
    create_docs(db)
    config = make_config(capture=logical)
    assert syncer(config, "install").returncode == 0
    cfg = load(config)
    pool = await create_pool(cfg.database)
    try:
        async with pool.acquire() as conn:
            rendered = {p.name: await checked_pipeline(conn, p) for p in cfg.pipelines}
        reader = SlotReader(cfg, pool, rendered, {p.name: asyncio.Event() for p in cfg.pipelines})
        real = SlotReader._enqueue_once
        cuts = []

        async def cut_once(self: SlotReader, changes: Any) -> None:
            if not cuts:
                cuts.append(changes)
                raise asyncpg.InternalClientError(
                    "cannot switch to state 12; another operation (2) is in progress"
                )
            await real(self, changes)

        monkeypatch.setattr(SlotReader, "_enqueue_once", cut_once)
        stop = asyncio.Event()
        run = asyncio.create_task(reader.run(stop))
        db.execute("INSERT INTO docs VALUES (1, 'Hello', 'world', 'a')")
        deadline = asyncio.get_running_loop().time() + 30
        while db.execute("SELECT count(*) FROM syncer.queue").fetchone() != (1,):
            assert not run.done(), run.exception()
            assert asyncio.get_running_loop().time() < deadline, "the change was never queued"
            await asyncio.sleep(0.05)
        assert cuts, "the fault was not injected"
        assert "replication stream lost" in caplog.text
        stop.set()
        await asyncio.wait_for(run, 30)
    finally:
        await pool.close()
