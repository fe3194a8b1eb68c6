"""A long backfill, interrupted by SIGTERM and resumed: every row is embedded exactly once."""

from __future__ import annotations

import signal
from typing import Any

import psycopg

from syncer.testing.fake_embedder import FakeEmbedderProcess
from tests.conftest import DEFAULT_PIPELINE, start_syncer, syncer, wait_for
from tests.test_pipeline import create_docs

ROWS = 50_000


def embedded(db: psycopg.Connection[Any]) -> int:
    return int(db.execute("SELECT count(embedding) FROM docs").fetchone()[0])  # type: ignore[index]


def test_interrupted_backfill_embeds_each_row_once(
    db: psycopg.Connection[Any], make_config: Any, fake: FakeEmbedderProcess
) -> None:
    create_docs(db)
    db.execute(
        "INSERT INTO docs SELECT g, 'title ' || g, 'body ' || g FROM generate_series(1, %s) g",
        (ROWS,),
    )
    config = make_config({**DEFAULT_PIPELINE, "batch_size": 64}, concurrency=4)
    r = syncer(config, "install")  # queues the 50,000 existing rows (bulk lane)
    assert r.returncode == 0, r.stderr
    assert f"{ROWS} existing rows queued" in r.stdout
    fake.control(latency_ms=30)  # long enough to stop it midway
    worker = start_syncer(config, "run")
    try:
        wait_for(lambda: embedded(db) >= ROWS // 5, timeout_s=120, what="a fifth embedded")
    finally:
        worker.send_signal(signal.SIGTERM)
        code = worker.wait(timeout=60)
    assert code == 0, worker.stderr.read() if worker.stderr else ""
    done_at_stop = embedded(db)
    assert done_at_stop < ROWS, "the backfill finished before it could be interrupted"
    # Nothing is left leased by the stopped worker: its unfinished items went back.
    assert db.execute(
        "SELECT count(*) FROM syncer.queue WHERE leased_by IS NOT NULL"
    ).fetchone() == (0,)

    fake.control(latency_ms=0)
    r = syncer(config, "run", "--exit-when-idle", timeout_s=300)
    assert r.returncode == 0, r.stderr
    assert embedded(db) == ROWS
    inputs = fake.inputs()
    assert len(inputs) == ROWS, f"{len(inputs) - ROWS} inputs beyond one per row"
    assert len(set(inputs)) == ROWS
    assert db.execute("SELECT count(*) FROM syncer.queue").fetchone() == (0,)
