"""`backfill` queues missing or stale rows page by page; `status` shows the backlog."""

from __future__ import annotations

from typing import Any

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
    assert line.split()[1] == "12000"
    assert syncer(config, "run", "--exit-when-idle").returncode == 0
    assert assert_synced(db) == 12001

    # Nothing is stale now: a second backfill queues nothing and costs nothing.
    r = syncer(config, "backfill", "--pipeline", "docs")
    assert r.returncode == 0 and "0 rows queued" in r.stdout
    # A vector damaged behind syncer's back (hash no longer matches) is found again.
    db.execute("UPDATE docs SET embedding_hash = NULL WHERE id <= 5")
    r = syncer(config, "backfill")
    assert "5 rows queued" in r.stdout
    # --all queues every row, e.g. to re-embed after a provider-side model update.
    r = syncer(config, "backfill", "--all")
    assert "12001 rows queued" in r.stdout
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
