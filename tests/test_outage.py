"""Workers ride through database restarts and outages: no exit, nothing lost, one log line
when the outage starts and one when it ends. A server of this module's own, restarted for
real (`pg_ctl restart -m fast|immediate`, or stopped for a while)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from syncer.testing.fake_embedder import FakeEmbedderProcess
from tests.conftest import LOGICAL_SETTINGS, start_pg, syncer, wait_for
from tests.test_pipeline import assert_synced, create_docs
from tests.test_resilience import Background, background

__all__ = ["background"]  # a fixture, used by name

ROWS = 300


@pytest.fixture(scope="module")
def pg() -> Iterator[Any]:
    server = start_pg(LOGICAL_SETTINGS)
    yield server
    server.stop()


def query(url: str, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    """On a connection of its own: the test's connections do not survive a restart."""
    with psycopg.connect(url, autocommit=True) as conn:
        from pgvector.psycopg import register_vector

        register_vector(conn)
        return conn.execute(sql, args or None).fetchall()


def synced(url: str) -> bool:
    """Every row has the vector of its current text, and nothing is left in the queue."""
    try:
        with psycopg.connect(url, autocommit=True) as conn:
            from pgvector.psycopg import register_vector

            register_vector(conn)
            left = conn.execute(
                "SELECT (SELECT count(*) FROM syncer.queue) + (SELECT count(*) FROM syncer.inbox)"
            ).fetchone()
            if left != (0,):
                return False
            assert_synced(conn)
    except (psycopg.OperationalError, AssertionError):
        return False
    return True


class Writer(threading.Thread):
    """Inserts and updates rows while the server goes away and comes back; a statement that
    fails on a restart is simply tried again on a new connection."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.halt = threading.Event()
        self.commits = 0

    def run(self) -> None:
        n = 0
        while not self.halt.is_set():
            try:
                with psycopg.connect(self.url, autocommit=True, connect_timeout=2) as conn:
                    while not self.halt.is_set():
                        n += 1
                        conn.execute(
                            "INSERT INTO docs VALUES (%s, %s, 'new') "
                            "ON CONFLICT (id) DO UPDATE SET body = EXCLUDED.title",
                            (ROWS + n % 200, f"title {n}"),
                        )
                        conn.execute("UPDATE docs SET body = %s WHERE id = %s", (f"b{n}", n % ROWS))
                        self.commits += 1
                        self.halt.wait(0.005)
            except psycopg.OperationalError:
                self.halt.wait(0.05)


@pytest.mark.parametrize("mode", ["trigger", "logical"])
def test_workers_ride_through_restarts(
    pg: Any,
    db: psycopg.Connection[Any],
    db_url: str,
    make_config: Any,
    fake: FakeEmbedderProcess,
    background: Any,
    logical: dict[str, str],
    mode: str,
) -> None:
    create_docs(db)
    db.execute(
        "INSERT INTO docs SELECT g, 'title ' || g, 'body ' || g FROM generate_series(1, %s) g",
        (ROWS,),
    )
    fake.control(latency_ms=20)
    config = make_config(capture=logical if mode == "logical" else None)
    r = syncer(config, "install")
    assert r.returncode == 0, r.stderr
    workers: list[Background] = [background(config), background(config)]
    writer = Writer(db_url)
    writer.start()
    try:
        for restart in ("fast", "immediate"):
            seen = writer.commits
            wait_for(lambda s=seen: writer.commits > s + 50, 30, "writes before the restart")
            pg.restart(restart)
            seen = writer.commits
            wait_for(lambda s=seen: writer.commits > s + 50, 30, "writes after the restart")
            assert all(w.alive() for w in workers)
    finally:
        writer.halt.set()
        writer.join(10)
    wait_for(lambda: all(w.alive() for w in workers) and synced(db_url), 90, "every row synced")
    for w in workers:
        assert w.stop() == 0, w.stderr()[-3000:]
    logs = "".join(w.stderr() for w in workers)
    assert "Traceback" not in logs and "never retrieved" not in logs, logs[-3000:]
    # A restart between two statements is absorbed by the pool's reconnect; one that cuts a
    # statement is waited out, and then its end is said too.
    assert logs.count("database unavailable; waiting for it") == logs.count("database is back")


def test_start_up_while_the_database_is_down(
    pg: Any,
    db: psycopg.Connection[Any],
    db_url: str,
    make_config: Any,
    fake: FakeEmbedderProcess,
    background: Any,
) -> None:
    create_docs(db)
    db.execute("INSERT INTO docs SELECT g, 'title ' || g, NULL FROM generate_series(1, 50) g")
    config = make_config()
    r = syncer(config, "install")
    assert r.returncode == 0, r.stderr
    db.close()
    pg.shut_down("fast")
    try:
        worker = background(config)
        wait_for(
            lambda: worker.alive() and "database unavailable at start" in worker.stderr(),
            30,
            "the worker to wait for the database",
        )
    finally:
        pg.start_again()
    wait_for(lambda: worker.alive() and synced(db_url), 60, "the rows synced once it is up")
    assert worker.stop() == 0, worker.stderr()[-3000:]
    assert "Traceback" not in worker.stderr()


def test_a_pool_of_two_does_not_deadlock(
    db: psycopg.Connection[Any], db_url: str, make_config: Any, fake: FakeEmbedderProcess
) -> None:
    create_docs(db)
    db.execute(
        "INSERT INTO docs SELECT g, 'title ' || g, 'body ' || g FROM generate_series(1, 2000) g"
    )
    config = make_config(concurrency=8)
    text = config.read_text().replace("[database]\n", "[database]\nmin_size = 1\nmax_size = 2\n", 1)
    config.write_text(text)
    r = syncer(config, "install")
    assert r.returncode == 0, r.stderr
    r = syncer(config, "run", "--exit-when-idle", timeout_s=120)
    assert r.returncode == 0, r.stderr
    assert synced(db_url)
    assert query(db_url, "SELECT count(*) FROM docs WHERE embedding IS NULL") == [(0,)]
