"""/readyz follows the database: 503 within 5 s of it going away, 200 within 5 s of its
return, and nothing lost meanwhile. A server of this module's own, stopped for real."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from syncer.testing.fake_embedder import FakeEmbedderProcess
from tests.conftest import LOGICAL_SETTINGS, start_pg, syncer, wait_for
from tests.test_monitor import free_port, get, with_listen
from tests.test_outage import query, synced
from tests.test_pipeline import create_docs
from tests.test_resilience import background

__all__ = ["background"]  # a fixture, used by name

WITHIN_S = 5.0


@pytest.fixture(scope="module")
def pg() -> Iterator[Any]:
    server = start_pg(LOGICAL_SETTINGS)
    yield server
    server.stop()


@pytest.mark.parametrize("mode", ["trigger", "logical"])
def test_readyz_follows_the_database(
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
    db.execute("INSERT INTO docs SELECT g, 'title ' || g, 'b' FROM generate_series(1, 50) g")
    port = free_port()
    config = with_listen(make_config(capture=logical if mode == "logical" else None), port)
    assert syncer(config, "install").returncode == 0
    worker = background(config)
    base = f"http://127.0.0.1:{port}"
    wait_for(lambda: worker.alive() and get(base + "/readyz")[0] == 200, 30, "ready")
    wait_for(lambda: synced(db_url), 30, "the rows synced")
    db.close()
    pg.shut_down("fast")
    try:
        _, body = wait_for(
            lambda: (r := get(base + "/readyz"))[0] == 503 and r, WITHIN_S, "unready"
        )
        assert json.loads(body) == {"ready": False, "reasons": ["the database does not answer"]}
        assert get(base + "/healthz")[0] == 200, "alive all the same: nothing to restart"
    finally:
        pg.start_again()
    wait_for(lambda: get(base + "/readyz")[0] == 200, WITHIN_S, "ready again")
    query(db_url, "INSERT INTO docs VALUES (51, 'after', 'the outage') RETURNING id")
    wait_for(lambda: worker.alive() and synced(db_url), 30, "every row synced, none lost")
    assert query(db_url, "SELECT count(*) FROM docs WHERE embedding IS NOT NULL") == [(51,)]
    assert worker.stop() == 0, worker.stderr()[-3000:]
