"""A row that cannot be embedded goes to the dead-letter table with its reason, without
stopping its neighbours; `replay-dlq` puts it back."""

from __future__ import annotations

import json
from typing import Any

import psycopg

from syncer.testing.fake_embedder import BAD_INPUT_MARKER, FakeEmbedderProcess
from tests.conftest import DEFAULT_PIPELINE, syncer
from tests.test_pipeline import assert_synced, create_docs, install_and_drain

BATCH64 = {**DEFAULT_PIPELINE, "batch_size": 64}


def dead(db: psycopg.Connection[Any]) -> list[tuple[Any, ...]]:
    return db.execute(
        "SELECT key->>'id', error_class, attempts FROM syncer.dead_letters ORDER BY id"
    ).fetchall()


def test_one_bad_input_in_a_batch_of_64(
    db: psycopg.Connection[Any], make_config: Any, fake: FakeEmbedderProcess
) -> None:
    create_docs(db)
    db.execute("INSERT INTO docs SELECT g, 'title ' || g, NULL FROM generate_series(1, 64) g")
    db.execute("UPDATE docs SET body = %s WHERE id = 17", (f"poison {BAD_INPUT_MARKER}",))
    config = make_config(BATCH64)
    install_and_drain(config)
    assert dead(db) == [("17", "invalid_input", 1)]  # at once, without retries
    error = db.execute("SELECT error FROM syncer.dead_letters").fetchone()[0]
    assert "HTTP 400" in error and "test-key-123" not in error
    assert db.execute("SELECT count(*) FROM docs WHERE embedding IS NOT NULL").fetchone() == (63,)
    assert db.execute("SELECT count(*) FROM syncer.queue").fetchone() == (0,)
    # The neighbours were not sent over and over: a few requests isolate the bad one.
    assert fake.stats()["requests"] <= 16


def test_dlq_list_and_replay(
    db: psycopg.Connection[Any], make_config: Any, fake: FakeEmbedderProcess
) -> None:
    create_docs(db)
    db.execute("INSERT INTO docs SELECT g, 'title ' || g, NULL FROM generate_series(1, 10) g")
    db.execute("UPDATE docs SET body = %s WHERE id IN (3, 4, 5)", (f"bad {BAD_INPUT_MARKER}",))
    config = make_config()
    install_and_drain(config)
    assert len(dead(db)) == 3

    r = syncer(config, "dlq", "list", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["counts"] == [
        {
            "pipeline": "docs",
            "error_class": "invalid_input",
            "n": 3,
            "newest": doc["counts"][0]["newest"],
        }
    ]
    assert sorted(e["key"]["id"] for e in doc["newest"]) == [3, 4, 5]
    assert "bad __FAKE" not in r.stdout  # never the row's text

    r = syncer(config, "replay-dlq", "--dry-run")
    assert r.returncode == 0 and "would replay 3 dead letters" in r.stdout
    assert len(dead(db)) == 3  # a dry run moves nothing

    # Fix one row, delete another, leave the third broken; replay one class only.
    db.execute("UPDATE docs SET body = 'fixed' WHERE id = 3")
    db.execute("DELETE FROM docs WHERE id = 4")
    r = syncer(config, "replay-dlq", "--error-class", "nope")
    assert r.returncode == 0 and "replayed 0 dead letters" in r.stdout
    r = syncer(config, "replay-dlq", "--pipeline", "docs", "--error-class", "invalid_input")
    assert r.returncode == 0 and "replayed 3 dead letters" in r.stdout, r.stderr
    r = syncer(config, "replay-dlq")
    assert r.returncode == 0 and "replayed 0 dead letters" in r.stdout  # twice does no harm
    r = syncer(config, "run", "--exit-when-idle")
    assert r.returncode == 0, r.stderr
    assert dead(db) == [("5", "invalid_input", 1)]
    assert_synced(db, "SELECT title, body, embedding FROM docs WHERE id <> 5")
    assert db.execute("SELECT count(*) FROM syncer.queue").fetchone() == (0,)


def test_replay_unknown_pipeline_is_an_error(db: psycopg.Connection[Any], make_config: Any) -> None:
    create_docs(db)
    config = make_config()
    assert syncer(config, "install").returncode == 0
    r = syncer(config, "replay-dlq", "--pipeline", "dcos")
    assert r.returncode == 2 and "no pipeline named 'dcos'" in r.stderr
