"""Several real `syncer run` processes on one database, killed and stopped by real signals."""

from __future__ import annotations

import random
import re
import signal
import subprocess
from typing import Any

import psycopg

from syncer.testing.fake_embedder import FakeEmbedderProcess
from tests.conftest import start_syncer, syncer, wait_for
from tests.test_pipeline import assert_synced, create_docs


def queue_len(db: psycopg.Connection[Any]) -> int:
    return int(db.execute("SELECT count(*) FROM syncer.queue").fetchone()[0])


def listening(db: psycopg.Connection[Any]) -> int:
    """Workers up and running: each holds one LISTEN connection."""
    sql = "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'syncer' AND query LIKE 'LISTEN%'"
    return int(db.execute(sql).fetchone()[0])


def stop_all(procs: list[subprocess.Popen[str]]) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait(10)


def test_three_workers_share_the_queue(
    db: psycopg.Connection[Any], make_config: Any, fake: FakeEmbedderProcess
) -> None:
    create_docs(db)
    config = make_config(concurrency=2)
    assert syncer(config, "install").returncode == 0
    fake.control(latency_ms=20)
    db.execute(
        "INSERT INTO docs SELECT g, 'title ' || g, 'body ' || g FROM generate_series(1, 5000) g"
    )
    procs = [start_syncer(config, "run", "--exit-when-idle") for _ in range(3)]
    shares = []
    try:
        for p in procs:
            _out, err = p.communicate(timeout=180)
            assert p.returncode == 0, err
            shares.append(int(re.search(r"pipeline docs: embedded (\d+)", err).group(1)))  # type: ignore[union-attr]
    finally:
        stop_all(procs)
    inputs = fake.inputs()
    assert len(inputs) == 5000 and len(set(inputs)) == 5000, "a text version was embedded twice"
    assert sum(shares) == 5000 and min(shares) > 0, f"the work was not shared: {shares}"
    assert assert_synced(db) == 5000
    assert queue_len(db) == 0


def test_killed_worker_items_come_back_after_the_lease(
    db: psycopg.Connection[Any], make_config: Any, fake: FakeEmbedderProcess
) -> None:
    create_docs(db)
    config = make_config(concurrency=2, worker={"lease_s": 2})
    assert syncer(config, "install").returncode == 0
    db.execute("INSERT INTO docs SELECT g, 'title ' || g, NULL FROM generate_series(1, 300) g")
    fake.control(latency_ms=60_000)  # every request hangs: the worker is mid-batch when killed
    victim = start_syncer(config, "run")
    try:
        wait_for(lambda: fake.stats()["requests"] >= 2, 30, "requests in flight")
        leased = db.execute(
            "SELECT count(*) FROM syncer.queue WHERE leased_until > now()"
        ).fetchone()[0]
        assert leased > 0
        victim.send_signal(signal.SIGKILL)
        victim.wait(10)
    finally:
        stop_all([victim])
    fake.control(latency_ms=0)
    r = syncer(config, "run", "--exit-when-idle")
    assert r.returncode == 0, r.stderr
    assert assert_synced(db) == 300
    assert queue_len(db) == 0


def test_sigterm_stops_softly_and_loses_nothing(
    db: psycopg.Connection[Any], make_config: Any, fake: FakeEmbedderProcess
) -> None:
    create_docs(db)
    config = make_config(concurrency=2, worker={"lease_s": 600, "shutdown_timeout_s": 3})
    assert syncer(config, "install").returncode == 0
    fake.control(latency_ms=300)
    db.execute("INSERT INTO docs SELECT g, 'title ' || g, NULL FROM generate_series(1, 2000) g")
    proc = start_syncer(config, "run")
    try:
        wait_for(lambda: fake.stats()["ok"] >= 2, 30, "some batches done")
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=15)  # within the 3 s soft deadline plus start-up slack
        assert proc.returncode == 0, err
    finally:
        stop_all([proc])
    # Unfinished items were handed back at once, not left to a 10-minute lease.
    assert db.execute(
        "SELECT count(*) FROM syncer.queue WHERE leased_by IS NOT NULL"
    ).fetchone() == (0,)
    done = db.execute("SELECT count(*) FROM docs WHERE embedding IS NOT NULL").fetchone()[0]
    assert done + queue_len(db) >= 2000 and done > 0
    fake.control(latency_ms=0)
    r = syncer(config, "run", "--exit-when-idle")
    assert r.returncode == 0, r.stderr
    assert assert_synced(db) == 2000


def test_rapid_updates_with_two_workers_end_with_the_final_text(
    db: psycopg.Connection[Any], make_config: Any, fake: FakeEmbedderProcess
) -> None:
    create_docs(db)
    config = make_config(concurrency=2, worker={"poll_interval_s": 0.2})
    db.execute("INSERT INTO docs SELECT g, 'start ' || g, NULL FROM generate_series(1, 10) g")
    assert syncer(config, "install").returncode == 0
    fake.control(latency_ms=15, latency_jitter_ms=30)
    procs = [start_syncer(config, "run") for _ in range(2)]
    try:
        wait_for(lambda: listening(db) == 2, 30, "both workers to listen")
        rng = random.Random(7)
        for i in range(200):
            row = rng.randint(1, 10)
            db.execute("UPDATE docs SET body = %s WHERE id = %s", (f"version {i} of {row}", row))
        wait_for(lambda: queue_len(db) == 0, 60, "the queue to drain")
        assert_synced(db)
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            p.wait(20)
            assert p.returncode == 0
    assert assert_synced(db) == 10
