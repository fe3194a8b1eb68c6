"""`syncer pause` and `syncer resume` with two real `syncer run` replicas: within 2 s neither
claims nor sends anything, capture goes on, status and /metrics say so; after resume both
work again and every row gets its vector."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import orjson
import psycopg

from syncer.testing.fake_embedder import FakeEmbedderProcess
from tests.conftest import start_syncer, syncer, wait_for
from tests.test_monitor import free_port, get, sample, with_listen
from tests.test_pipeline import assert_synced, create_docs
from tests.test_processes import listening, stop_all

PAUSE_S = 2.0  # the promise: nothing new starts later than this after the pause


def leased(db: psycopg.Connection[Any]) -> int:
    sql = "SELECT count(*) FROM syncer.queue WHERE leased_until >= now()"
    return int(db.execute(sql).fetchone()[0])


def waiting(db: psycopg.Connection[Any]) -> int:
    """Captured keys not yet embedded: in the queue or still in the inbox."""
    sql = "SELECT (SELECT count(*) FROM syncer.queue) + (SELECT count(*) FROM syncer.inbox)"
    return int(db.execute(sql).fetchone()[0])


def paused_metric(port: int) -> float:
    body = get(f"http://127.0.0.1:{port}/metrics")[1]
    return sample(body, "syncer_pipeline_paused", pipeline="docs")


def holds_for(cond: Callable[[], bool], seconds: float, what: str) -> None:
    """The condition holds at every look for the whole window (a measurement, not a wait)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert cond(), what
        time.sleep(0.05)


def test_pause_stops_both_replicas_within_2s_and_resume_finishes_the_work(
    db: psycopg.Connection[Any], make_config: Any, fake: FakeEmbedderProcess
) -> None:
    create_docs(db)
    port = free_port()
    config = with_listen(make_config(concurrency=2), port)
    assert syncer(config, "install").returncode == 0
    fake.control(latency_ms=100)
    db.execute("INSERT INTO docs SELECT g, 'title ' || g, 'b' FROM generate_series(1, 10000) g")
    procs = [start_syncer(config, "run")]
    procs.append(start_syncer(config, "run", "--listen", f"127.0.0.1:{free_port()}"))
    try:
        wait_for(lambda: listening(db) == 2 and fake.stats()["requests"] >= 4, 60, "both running")
        r = syncer(config, "pause")
        paused_at = time.monotonic()
        assert r.returncode == 0 and r.stdout.strip() == "paused: docs", r.stderr
        # In-flight requests finish, unsent work goes back: nothing leased within 2 s.
        wait_for(lambda: leased(db) == 0, PAUSE_S, "every lease handed back")
        sent = fake.stats()["requests"]
        assert time.monotonic() - paused_at <= PAUSE_S + 0.5
        # Capture goes on while paused: the queue grows, nothing is claimed or sent.
        before = waiting(db)
        db.execute(
            "INSERT INTO docs SELECT g, 'new ' || g, 'b' FROM generate_series(10001, 10100) g"
        )
        holds_for(
            lambda: leased(db) == 0 and fake.stats()["requests"] == sent, 3.0, "work while paused"
        )
        assert before > 0 and waiting(db) >= before + 100, "the backlog was gone before the pause"
        st = orjson.loads(syncer(config, "status", "--json").stdout)
        assert st["pipelines"][0]["paused"] is True
        wait_for(lambda: paused_metric(port) == 1.0, 10, "syncer_pipeline_paused 1")
        assert "paused" in syncer(config, "status").stdout

        r = syncer(config, "resume", "--pipeline", "docs")
        assert r.returncode == 0 and r.stdout.strip() == "resumed: docs", r.stderr
        # Both replicas claim again.
        holders: set[str] = set()

        def both_claim() -> bool:
            sql = "SELECT DISTINCT leased_by FROM syncer.queue WHERE leased_until >= now()"
            holders.update(row[0] for row in db.execute(sql).fetchall())
            return len(holders) == 2

        wait_for(both_claim, 30, "both replicas claiming after resume")
        wait_for(lambda: waiting(db) == 0, 120, "the backlog embedded")
        wait_for(lambda: paused_metric(port) == 0.0, 10, "syncer_pipeline_paused 0")
        assert (
            orjson.loads(syncer(config, "status", "--json").stdout)["pipelines"][0]["paused"]
            is False
        )
    finally:
        stop_all(procs)
    assert assert_synced(db) == 10100
    inputs = fake.inputs()
    assert len(inputs) == len(set(inputs)) == 10100, "a text was embedded twice"


def test_pause_of_an_unknown_pipeline_lists_the_known_ones(
    db: psycopg.Connection[Any], make_config: Any
) -> None:
    create_docs(db)
    config = make_config()
    assert syncer(config, "install").returncode == 0
    for command in ("pause", "resume"):
        r = syncer(config, command, "--pipeline", "nope")
        assert r.returncode != 0
        assert r.stderr.strip() == "error: no pipeline named 'nope' (configured: docs)", r.stderr
    # Nothing was paused by the failed command.
    assert (
        db.execute("SELECT count(*) FROM syncer.pipelines WHERE paused_at IS NOT NULL").fetchone()[
            0
        ]
        == 0
    )


def test_a_pipeline_paused_before_the_start_claims_nothing(
    db: psycopg.Connection[Any], make_config: Any, fake: FakeEmbedderProcess
) -> None:
    create_docs(db)
    config = make_config()
    assert syncer(config, "install").returncode == 0
    assert syncer(config, "pause").returncode == 0
    db.execute("INSERT INTO docs SELECT g, 'title ' || g, 'b' FROM generate_series(1, 50) g")
    # --exit-when-idle: a paused pipeline is as idle as the run gets; nothing sent.
    r = syncer(config, "run", "--exit-when-idle")
    assert r.returncode == 0, r.stderr
    assert fake.stats()["requests"] == 0 and waiting(db) == 50
    assert syncer(config, "resume").returncode == 0
    assert syncer(config, "run", "--exit-when-idle").returncode == 0
    assert assert_synced(db) == 50
