"""`backfill` queues missing or stale rows page by page; `status` shows the backlog."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import psycopg

from syncer.testing.fake_embedder import FakeEmbedderProcess
from tests.conftest import syncer
from tests.test_pipeline import assert_synced, create_docs


def queued(db: psycopg.Connection[Any]) -> int:
    return int(db.execute("SELECT count(*) FROM syncer.queue").fetchone()[0])


def test_backfill_queues_only_missing_or_stale_rows(
    db: psycopg.Connection[Any], make_config: Any, fake: FakeEmbedderProcess
) -> None:
    create_docs(db)
    db.execute("INSERT INTO docs SELECT g, 'title ' || g, NULL FROM generate_series(1, 12000) g")
    db.execute("INSERT INTO docs VALUES (0, NULL, NULL, NULL)")  # no text: nothing to queue
    config = make_config()
    r = syncer(config, "install", "--no-backfill")
    assert r.returncode == 0, r.stderr
    assert queued(db) == 0
    r = syncer(config, "backfill")
    assert r.returncode == 0 and "12000 rows queued" in r.stdout, r.stdout + r.stderr
    r = syncer(config, "status")
    assert r.returncode == 0
    line = next(x for x in r.stdout.splitlines() if x.startswith("docs"))
    assert line.split()[2] == "12000"  # pipeline, state, queued
    assert syncer(config, "run", "--exit-when-idle").returncode == 0
    assert assert_synced(db) == 12001

    # Nothing is stale now: a second backfill queues nothing and costs nothing.
    r = syncer(config, "backfill", "--pipeline", "docs")
    assert r.returncode == 0 and "0 rows queued" in r.stdout
    # A vector damaged behind syncer's back (hash no longer matches) is found again.
    db.execute("UPDATE docs SET embedding_hash = NULL WHERE id <= 5")
    r = syncer(config, "backfill")
    assert "5 rows queued" in r.stdout
    # --all queues every row, e.g. to re-embed after a provider-side model update; the 5
    # already waiting are not queued twice.
    r = syncer(config, "backfill", "--all")
    assert "11996 rows queued" in r.stdout
    assert queued(db) == 12001
    fake.reset()
    assert syncer(config, "run", "--exit-when-idle").returncode == 0
    # Rows whose stored hash already matches are not sent again, even when queued.
    assert len(fake.inputs()) == 5
    assert queued(db) == 0


def test_backfill_on_composite_keys_pages_correctly(
    db: psycopg.Connection[Any], make_config: Any, fake: FakeEmbedderProcess
) -> None:
    db.execute("CREATE TABLE docs (a int, b text, title text, body text, PRIMARY KEY (a, b))")
    # 3 x 4,000 rows, so pages of 5,000 cut through the first key column.
    db.execute(
        "INSERT INTO docs SELECT g % 3, 'k' || g, 't' || g, NULL FROM generate_series(1, 12000) g"
    )
    config = make_config()
    r = syncer(config, "install")
    assert r.returncode == 0 and "12000 existing rows queued" in r.stdout, r.stdout + r.stderr
    keys = db.execute("SELECT count(DISTINCT key) FROM syncer.queue").fetchone()[0]
    assert keys == 12000
    assert syncer(config, "run", "--exit-when-idle").returncode == 0
    assert len(set(fake.inputs())) == 12000


def test_install_then_backfill_queues_each_key_once(
    db: psycopg.Connection[Any], db_url: str, make_config: Any, fake: FakeEmbedderProcess
) -> None:
    """At most one waiting item per key and lane: install's backfill, a backfill, a second
    backfill and a live edit of a waiting row leave one bulk item per key, and one live."""
    create_docs(db)
    db.execute("INSERT INTO docs SELECT g, 'title ' || g, NULL FROM generate_series(1, 500) g")
    config = make_config()
    assert syncer(config, "install").returncode == 0
    for _ in range(2):
        r = syncer(config, "backfill", "--all")
        assert r.returncode == 0 and "0 rows queued" in r.stdout, r.stdout + r.stderr
    db.execute("UPDATE docs SET body = 'edited' WHERE id <= 10")
    db.execute("UPDATE docs SET body = 'edited again' WHERE id <= 10")
    # The inbox is moved by a worker; one pass of it, then the counts.
    from syncer.capture.trigger import move_inbox

    asyncio.run(_move(db_url, move_inbox))
    lanes = db.execute(
        "SELECT lane, count(*), count(DISTINCT key) FROM syncer.queue GROUP BY lane ORDER BY 1"
    ).fetchall()
    assert lanes == [(0, 10, 10), (1, 500, 500)]
    assert syncer(config, "run", "--exit-when-idle").returncode == 0
    assert assert_synced(db) == 500
    assert len(fake.inputs()) == len(set(fake.inputs())) == 500  # each text paid once


async def _move(url: str, move_inbox: Any) -> None:
    conn = await asyncpg.connect(url)
    try:
        await move_inbox(conn)
    finally:
        await conn.close()
