"""End to end, trigger mode: the real command line, a real database, the fake API."""

from __future__ import annotations

import signal
from typing import Any

import numpy as np
import psycopg
import pytest

from syncer.providers.tokens import truncate_to_tokens
from syncer.testing.fake_embedder import FakeEmbedderProcess, fake_vector
from tests.conftest import DEFAULT_PIPELINE, start_syncer, syncer, wait_for

DIM = 8
ODD = '"My Schema"."Odd ""Table"""'  # needs quoting: a space, mixed case, a quote


def create_docs(db: psycopg.Connection[Any], table: str = "docs") -> None:
    db.execute(f"CREATE TABLE {table} (id bigint PRIMARY KEY, title text, body text, tag text)")


def composed(*parts: str | None) -> str | None:
    kept = [p for p in parts if p]
    return "\n\n".join(kept) if kept else None


def assert_synced(
    db: psycopg.Connection[Any], sql: str = "SELECT title, body, embedding FROM docs"
) -> int:
    n = 0
    for title, body, emb in db.execute(sql).fetchall():
        text = composed(title, body)
        if text is None:
            assert emb is None
        else:
            assert emb is not None, f"no vector for {text[:40]!r}"
            np.testing.assert_allclose(np.asarray(emb.to_list()), fake_vector(text, DIM), rtol=1e-6)
        n += 1
    return n


def install_and_drain(config: Any) -> None:
    r = syncer(config, "install")
    assert r.returncode == 0, r.stderr
    r = syncer(config, "run", "--exit-when-idle")
    assert r.returncode == 0, r.stderr


def test_insert_update_and_noop_update(
    db: psycopg.Connection[Any], make_config: Any, fake: FakeEmbedderProcess
) -> None:
    create_docs(db)
    config = make_config()
    db.execute("INSERT INTO docs VALUES (1, 'Hello', 'world', 'a'), (2, 'Second', NULL, 'b')")
    install_and_drain(config)
    assert assert_synced(db) == 2
    assert sorted(fake.inputs()) == ["Hello\n\nworld", "Second"]

    fake.reset()
    db.execute("UPDATE docs SET body = 'changed' WHERE id = 1")
    db.execute("UPDATE docs SET tag = 'zzz'")  # not a text column: no work
    db.execute("UPDATE docs SET title = title")  # same text: no work
    r = syncer(config, "run", "--exit-when-idle")
    assert r.returncode == 0, r.stderr
    assert fake.inputs() == ["Hello\n\nchanged"]
    assert_synced(db)


def test_text_changed_back_costs_no_call(
    db: psycopg.Connection[Any], make_config: Any, fake: FakeEmbedderProcess
) -> None:
    create_docs(db)
    config = make_config()
    db.execute("INSERT INTO docs VALUES (1, 'A', 'x', NULL)")
    install_and_drain(config)
    fake.reset()
    db.execute("UPDATE docs SET body = 'y' WHERE id = 1")
    db.execute("UPDATE docs SET body = 'x' WHERE id = 1")  # back to the embedded text
    r = syncer(config, "run", "--exit-when-idle")
    assert r.returncode == 0, r.stderr
    assert fake.inputs() == []
    assert_synced(db)
    assert db.execute("SELECT count(*) FROM syncer.queue").fetchone() == (0,)


def test_null_and_empty_text(
    db: psycopg.Connection[Any], make_config: Any, fake: FakeEmbedderProcess
) -> None:
    create_docs(db)
    config = make_config()
    db.execute(
        "INSERT INTO docs VALUES (1, NULL, NULL, NULL), (2, '', '', NULL), (3, '', 'only body', NULL)"
    )
    install_and_drain(config)
    assert fake.inputs() == ["only body"]
    assert_synced(db)
    rows = db.execute("SELECT id, embedding_hash IS NULL FROM docs ORDER BY id").fetchall()
    assert rows == [(1, True), (2, True), (3, False)]
    # Text removed: the vector and its hash become NULL, with no API call.
    fake.reset()
    db.execute("UPDATE docs SET body = NULL WHERE id = 3")
    r = syncer(config, "run", "--exit-when-idle")
    assert r.returncode == 0, r.stderr
    assert fake.inputs() == []
    assert db.execute("SELECT embedding, embedding_hash FROM docs WHERE id = 3").fetchone() == (
        None,
        None,
    )


def test_unicode_quotes_and_large_text(
    db: psycopg.Connection[Any], make_config: Any, fake: FakeEmbedderProcess
) -> None:
    create_docs(db)
    config = make_config()
    big = "παράδειγμα 例子 \"quoted\" 'single' \\ back\\slash; DROP TABLE docs; -- " * 1400
    assert len(big.encode()) > 100_000
    rows = [
        (1, "emoji 🚀🔥", "naïve café — “curly”"),
        (2, "it's", 'say "hi"'),
        (3, "big", big),
        (4, "tab\there", "\n\nnewlines\n"),
    ]
    with db.cursor() as cur:
        cur.executemany("INSERT INTO docs (id, title, body) VALUES (%s, %s, %s)", rows)
    install_and_drain(config)
    assert assert_synced(db, "SELECT title, body, embedding FROM docs WHERE id <> 3") == 3
    # Over the model's 8,191-token input limit: cut to fit (the default), not failed.
    sent = truncate_to_tokens(composed("big", big) or "", 8191)
    assert 10_000 < len(sent) < len(big)
    assert sorted(fake.inputs()) == sorted([*(composed(t, b) for i, t, b in rows if i != 3), sent])
    emb = db.execute("SELECT embedding FROM docs WHERE id = 3").fetchone()[0]
    np.testing.assert_allclose(np.asarray(emb.to_list()), fake_vector(sent, DIM), rtol=1e-6)
    # The stored hash is the full text's, so the row is not re-queued as stale.
    r = syncer(config, "backfill")
    assert "0 rows queued" in r.stdout


def test_too_long_text_can_be_dead_lettered(
    db: psycopg.Connection[Any], make_config: Any, fake: FakeEmbedderProcess
) -> None:
    create_docs(db)
    config = make_config({**DEFAULT_PIPELINE, "on_too_long": "dead_letter"})
    db.execute(
        "INSERT INTO docs VALUES (1, 'short', NULL, NULL), (2, repeat('long text ', 20000), NULL, NULL)"
    )
    install_and_drain(config)
    assert fake.inputs() == ["short"]
    assert db.execute(
        "SELECT key->>'id', error_class, attempts FROM syncer.dead_letters"
    ).fetchall() == [("2", "input_too_long", 1)]


def test_side_table_target_and_delete(
    db: psycopg.Connection[Any], make_config: Any, fake: FakeEmbedderProcess
) -> None:
    create_docs(db)
    config = make_config(
        {**DEFAULT_PIPELINE, "target": "table", "target_table": "public.docs_vectors"}
    )
    db.execute(
        "INSERT INTO docs VALUES (1, 'one', NULL, NULL), (2, 'two', NULL, NULL), (3, NULL, NULL, NULL)"
    )
    install_and_drain(config)
    sql = "SELECT d.title, d.body, v.embedding FROM docs d LEFT JOIN docs_vectors v USING (id)"
    assert assert_synced(db, sql) == 3
    assert db.execute("SELECT count(*) FROM docs_vectors").fetchone() == (2,)
    # The source table itself is untouched: no vector column was added to it.
    cols = [
        r[0]
        for r in db.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_name = 'docs'"
        )
    ]
    assert "embedding" not in cols
    db.execute("DELETE FROM docs WHERE id = 1")
    db.execute("UPDATE docs SET title = NULL WHERE id = 2")
    db.execute("UPDATE docs SET title = 'three' WHERE id = 3")
    r = syncer(config, "run", "--exit-when-idle")
    assert r.returncode == 0, r.stderr
    assert db.execute("SELECT id FROM docs_vectors ORDER BY id").fetchall() == [(3,)]
    assert_synced(db, sql)


@pytest.mark.parametrize("mode", ["trigger", "logical"])
def test_composite_key_halfvec_and_odd_names(
    db: psycopg.Connection[Any],
    make_config: Any,
    fake: FakeEmbedderProcess,
    mode: str,
    request: pytest.FixtureRequest,
) -> None:
    db.execute('CREATE SCHEMA "My Schema"')
    db.execute(
        f'CREATE TABLE {ODD} (tenant text, "Doc Id" int, "Title Col" text, '
        '"bo""dy" text, PRIMARY KEY (tenant, "Doc Id"))'
    )
    config = make_config(
        {
            **DEFAULT_PIPELINE,
            "table": ODD,
            "text": ["Title Col", 'bo"dy'],
            "column": "Vec Col",
            "vector_type": "halfvec",
        },
        capture=request.getfixturevalue("logical") if mode == "logical" else None,
    )
    db.execute(
        f"INSERT INTO {ODD} VALUES ('a', 1, 'x', 'y'), ('b', 1, 'x', 'z'), ('a', 2, 'w', NULL)"
    )
    install_and_drain(config)
    rows = db.execute(f'SELECT "Title Col", "bo""dy", "Vec Col" FROM {ODD}').fetchall()
    assert len(rows) == 3
    for title, body, vec in rows:
        expected = fake_vector(composed(title, body) or "", DIM).astype(np.float16)
        np.testing.assert_allclose(np.asarray(vec.to_list(), dtype=np.float16), expected, rtol=1e-3)
    db.execute(f"""UPDATE {ODD} SET "bo""dy" = 'new' WHERE tenant = 'b'""")
    db.execute(f"""INSERT INTO {ODD} VALUES ('it''s', 3, 'q', 'r')""")  # a quote in the key
    fake.reset()
    r = syncer(config, "run", "--exit-when-idle")
    assert r.returncode == 0, r.stderr
    assert sorted(fake.inputs()) == ["q\n\nr", "x\n\nnew"]


def test_bulk_insert_embeds_each_row_once(
    db: psycopg.Connection[Any], make_config: Any, fake: FakeEmbedderProcess
) -> None:
    create_docs(db)
    config = make_config(concurrency=8)
    assert syncer(config, "install").returncode == 0
    db.execute(
        "INSERT INTO docs SELECT g, 'title ' || g, 'body ' || g FROM generate_series(1, 10000) g"
    )
    # One statement: the inbox got the rows in one insert, not 10,000 trigger calls.
    assert db.execute("SELECT count(*) FROM syncer.inbox").fetchone() == (10000,)
    r = syncer(config, "run", "--exit-when-idle")
    assert r.returncode == 0, r.stderr
    inputs = fake.inputs()
    assert len(inputs) == 10000 and len(set(inputs)) == 10000
    assert assert_synced(db) == 10000
    assert db.execute("SELECT count(*) FROM syncer.queue").fetchone() == (0,)
    assert db.execute("SELECT count(*) FROM syncer.inbox").fetchone() == (0,)


def test_model_change_makes_vectors_stale(
    db: psycopg.Connection[Any], make_config: Any, fake: FakeEmbedderProcess
) -> None:
    create_docs(db)
    db.execute("INSERT INTO docs VALUES (1, 'a', 'b', NULL), (2, 'c', NULL, NULL)")
    install_and_drain(make_config())
    changed = make_config({**DEFAULT_PIPELINE, "model": "text-embedding-3-large"})
    r = syncer(changed, "run", "--exit-when-idle")
    assert r.returncode != 0 and "configuration changed since install" in r.stderr
    fake.reset()
    install_and_drain(changed)  # install re-queues every row embedded with the old model
    assert sorted(fake.inputs()) == ["a\n\nb", "c"]
    assert {r["model"] for r in fake.requests()} == {"text-embedding-3-large"}


def test_bulk_update_after_a_single_row_update_stays_linear(
    db: psycopg.Connection[Any], make_config: Any, fake: FakeEmbedderProcess
) -> None:
    """A single-row UPDATE, then one of every row: each row captured once, in linear time."""
    create_docs(db)
    db.execute("INSERT INTO docs SELECT g, 't' || g, NULL FROM generate_series(1, 20000) g")
    assert syncer(make_config(), "install", "--no-backfill").returncode == 0
    db.execute("UPDATE docs SET title = 'one' WHERE id = 1")
    db.execute("DELETE FROM syncer.inbox")
    db.execute("SET statement_timeout = '20s'")  # quadratic takes minutes; linear well under 1 s
    db.execute("UPDATE docs SET title = title || '!'")
    assert db.execute("SELECT count(DISTINCT key) FROM syncer.inbox").fetchone() == (20000,)
    assert db.execute("SELECT count(*) FROM syncer.inbox").fetchone() == (20000,)


def test_row_deleted_before_it_was_processed(
    db: psycopg.Connection[Any], make_config: Any, fake: FakeEmbedderProcess
) -> None:
    create_docs(db)
    config = make_config()
    assert syncer(config, "install").returncode == 0
    db.execute("INSERT INTO docs VALUES (1, 'gone soon', NULL, NULL), (2, 'stays', NULL, NULL)")
    db.execute("DELETE FROM docs WHERE id = 1")
    r = syncer(config, "run", "--exit-when-idle")
    assert r.returncode == 0, r.stderr
    assert fake.inputs() == ["stays"]  # nothing to embed for the deleted row, and no error
    assert db.execute("SELECT count(*) FROM syncer.dead_letters").fetchone() == (0,)
    assert db.execute("SELECT count(*) FROM syncer.queue").fetchone() == (0,)
    assert_synced(db)


def test_same_text_queued_again_while_in_flight_costs_one_call(
    db: psycopg.Connection[Any], make_config: Any, fake: FakeEmbedderProcess
) -> None:
    create_docs(db)
    config = make_config()
    assert syncer(config, "install").returncode == 0
    fake.control(latency_ms=1500)
    proc = start_syncer(config, "run")
    try:
        db.execute("INSERT INTO docs VALUES (1, 'Same', 'text', 'a')")
        wait_for(lambda: fake.stats()["requests"] >= 1, what="the first request in flight")
        r = syncer(config, "backfill", "--all")  # the same row, the same text, queued again
        assert r.returncode == 0, r.stderr

        def done() -> bool:
            row = db.execute(
                "SELECT (SELECT count(*) FROM syncer.queue), embedding IS NOT NULL FROM docs"
            ).fetchone()
            return row is not None and row[0] == 0 and row[1]

        wait_for(done, what="the vector written and both items finished")
        assert fake.inputs() == ["Same\n\ntext"]
        assert assert_synced(db) == 1
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0


@pytest.mark.parametrize("mode", ["trigger", "logical"])
@pytest.mark.parametrize("target", ["column", "table"])
def test_partitioned_table_and_a_row_moving_partition(
    db: psycopg.Connection[Any],
    make_config: Any,
    fake: FakeEmbedderProcess,
    mode: str,
    target: str,
    request: pytest.FixtureRequest,
) -> None:
    """An UPDATE that moves a row to another partition fires neither UPDATE row triggers
    nor statement-level INSERT/DELETE ones: its new key must be captured all the same."""
    db.execute(
        "CREATE TABLE docs (id bigint PRIMARY KEY, title text, body text, tag text)"
        " PARTITION BY RANGE (id)"
    )
    db.execute("CREATE TABLE docs_low PARTITION OF docs FOR VALUES FROM (0) TO (100)")
    db.execute("CREATE TABLE docs_high PARTITION OF docs FOR VALUES FROM (100) TO (200)")
    side = {"target": "table", "target_table": "public.docs_vectors"} if target == "table" else {}
    config = make_config(
        {**DEFAULT_PIPELINE, **side},
        capture=request.getfixturevalue("logical") if mode == "logical" else None,
    )
    assert syncer(config, "install").returncode == 0
    db.execute("INSERT INTO docs VALUES (1, 'a', 'b', 'x'), (150, 'c', 'd', 'y')")
    db.execute("UPDATE docs SET body = 'changed' WHERE id = 1")
    db.execute("UPDATE docs SET id = 120 WHERE id = 1")  # moves to docs_high
    r = syncer(config, "run", "--exit-when-idle")
    assert r.returncode == 0, r.stderr
    if target == "column":
        assert assert_synced(db) == 2
    else:
        keys = db.execute("SELECT id FROM docs_vectors ORDER BY id").fetchall()
        assert [k[0] for k in keys] == [120, 150]
    assert sorted(fake.inputs()) == ["a\n\nchanged", "c\n\nd"]
