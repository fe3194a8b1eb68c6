"""One input the provider always fails on (a 500 with no index, as some providers answer)
costs only itself: it is traced by splitting its batch, spends its own attempts and lands in
the dead-letter table, while its batch neighbours get their vectors."""

from __future__ import annotations

from typing import Any

import psycopg

from syncer.testing.fake_embedder import ALWAYS_500_MARKER, FakeEmbedderProcess
from tests.conftest import DEFAULT_PIPELINE, syncer
from tests.test_pipeline import assert_synced, create_docs

POISONED = (7, 130, 131, 260, 499)  # 130 and 131: two in one batch


def test_always_500_inputs_are_isolated(
    db: psycopg.Connection[Any], make_config: Any, fake: FakeEmbedderProcess
) -> None:
    create_docs(db)
    db.execute(
        "INSERT INTO docs SELECT g, 'title ' || g, 'body ' || g FROM generate_series(1, 500) g"
    )
    db.execute(
        "UPDATE docs SET body = %s WHERE id = ANY(%s)", (f"x {ALWAYS_500_MARKER}", list(POISONED))
    )
    # The provider's defaults otherwise: 5 failures open the breaker for 30 s.
    config = make_config({**DEFAULT_PIPELINE, "batch_size": 64}, worker={"max_attempts": 3})
    r = syncer(config, "install")
    assert r.returncode == 0, r.stderr
    r = syncer(config, "run", "--exit-when-idle", timeout_s=90)
    assert r.returncode == 0, r.stderr
    dead = db.execute(
        "SELECT (key->>'id')::int, error_class, attempts FROM syncer.dead_letters ORDER BY 1"
    ).fetchall()
    assert dead == [(i, "retryable", 3) for i in POISONED]
    assert db.execute("SELECT count(*) FROM syncer.queue").fetchone() == (0,)
    healthy = "SELECT title, body, embedding FROM docs WHERE NOT body LIKE '%%__FAKE_ALWAYS%%'"
    assert assert_synced(db, healthy) == 495
    # Each healthy text was embedded once; the tracing cost a bounded number of requests.
    inputs = [t for t in fake.inputs() if ALWAYS_500_MARKER not in t]
    assert len(inputs) == len(set(inputs)) == 495
    assert fake.stats()["requests"] < 150, fake.stats()
    assert "closed -> open" not in r.stderr, "the breaker opened for one input's sake"
