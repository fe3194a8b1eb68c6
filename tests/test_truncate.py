"""TRUNCATE of a source table, in both capture modes and for both targets: a side table is
emptied with it, queued work for the gone rows is dropped, and rows inserted after it get
their vectors. Also a TRUNCATE … CASCADE over two tables."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest

from syncer.testing.fake_embedder import FakeEmbedderProcess
from tests.conftest import DEFAULT_PIPELINE, syncer
from tests.test_pipeline import assert_synced, create_docs


def drain(config: Any) -> None:
    r = syncer(config, "run", "--exit-when-idle")
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("mode", ["trigger", "logical"])
@pytest.mark.parametrize("target", ["column", "table"])
def test_truncate(
    db: psycopg.Connection[Any],
    make_config: Any,
    fake: FakeEmbedderProcess,
    logical: dict[str, str],
    mode: str,
    target: str,
) -> None:
    create_docs(db)
    db.execute("INSERT INTO docs SELECT g, 'title ' || g, NULL FROM generate_series(1, 50) g")
    side = {"target": "table", "target_table": "public.docs_vectors"} if target == "table" else {}
    config = make_config(
        {**DEFAULT_PIPELINE, **side}, capture=logical if mode == "logical" else None
    )
    assert syncer(config, "install").returncode == 0
    drain(config)
    # Work queued, then the table truncated and refilled in one transaction.
    db.execute("UPDATE docs SET body = 'queued, then gone' WHERE id <= 10")
    with db.transaction():
        db.execute("TRUNCATE docs")
        db.execute("INSERT INTO docs VALUES (100, 'after', 'the truncate', NULL)")
    drain(config)
    if target == "table":
        keys = db.execute("SELECT id FROM docs_vectors ORDER BY id").fetchall()
        assert keys == [(100,)]
    else:
        assert assert_synced(db) == 1
    assert db.execute("SELECT count(*) FROM syncer.queue").fetchone() == (0,)
    assert db.execute("SELECT count(*) FROM syncer.dead_letters").fetchone() == (0,)
    assert "queued, then gone" not in " ".join(fake.inputs())


@pytest.mark.parametrize("mode", ["trigger", "logical"])
def test_truncate_cascade_over_two_tables(
    db: psycopg.Connection[Any],
    make_config: Any,
    fake: FakeEmbedderProcess,
    logical: dict[str, str],
    mode: str,
) -> None:
    create_docs(db)
    db.execute(
        "CREATE TABLE notes (id bigint PRIMARY KEY, doc bigint REFERENCES docs, title text, body text)"
    )
    db.execute("INSERT INTO docs SELECT g, 'doc ' || g, NULL FROM generate_series(1, 20) g")
    db.execute("INSERT INTO notes SELECT g, g, 'note ' || g, NULL FROM generate_series(1, 20) g")
    pipelines = [
        {**DEFAULT_PIPELINE, "target": "table", "target_table": "public.docs_vectors"},
        {
            **DEFAULT_PIPELINE,
            "name": "notes",
            "table": "public.notes",
            "target": "table",
            "target_table": "public.notes_vectors",
        },
    ]
    config = make_config(*pipelines, capture=logical if mode == "logical" else None)
    assert syncer(config, "install").returncode == 0
    drain(config)
    assert db.execute("SELECT count(*) FROM notes_vectors").fetchone() == (20,)
    db.execute("TRUNCATE docs CASCADE")
    drain(config)
    for table in ("docs_vectors", "notes_vectors"):
        assert db.execute(f"SELECT count(*) FROM {table}").fetchone() == (0,), table
