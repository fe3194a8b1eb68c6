"""Shared fixtures: one embedded PostgreSQL per session, one database per test (from a
template), the fake OpenAI server, and helpers to run the real `syncer` command."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from pgvector.psycopg import register_vector

from syncer.testing import embedded_pg
from syncer.testing.fake_embedder import FakeEmbedderProcess

TEMPLATE = "syncer_template"
LOGICAL_SETTINGS = {
    "wal_level": "logical",
    "max_replication_slots": "64",
    "max_wal_senders": "64",
    "wal_writer_delay": "10ms",
}
_counter = itertools.count()


@pytest.fixture(scope="session")
def pg() -> Iterator[embedded_pg.EmbeddedPostgres]:
    # wal_level = logical for the logical-mode tests; the WAL writer flushes often, because
    # with synchronous_commit = off a change reaches a slot only once its WAL is flushed.
    server = start_pg(LOGICAL_SETTINGS)
    yield server
    server.stop()


def start_pg(settings: dict[str, str]) -> embedded_pg.EmbeddedPostgres:
    """A server with these settings and the template database the `db_url` fixture copies."""
    server = embedded_pg.start(settings=settings)
    with psycopg.connect(server.url(), autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {TEMPLATE}")
    with psycopg.connect(server.url(TEMPLATE), autocommit=True) as conn:
        conn.execute("CREATE EXTENSION vector")
    return server


@pytest.fixture()
def db_url(pg: embedded_pg.EmbeddedPostgres) -> Iterator[str]:
    name = f"t{os.getpid()}_{next(_counter)}"
    with psycopg.connect(pg.url(), autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name} TEMPLATE {TEMPLATE}")
    yield pg.url(name)
    with psycopg.connect(pg.url(), autocommit=True) as conn:
        # A database with a logical slot cannot be dropped (terminate its readers first).
        conn.execute(
            "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots "
            "WHERE database = %s AND active_pid IS NOT NULL",
            (name,),
        )
        wait_for(
            lambda: (
                not conn.execute(
                    "SELECT 1 FROM pg_replication_slots WHERE database = %s AND active", (name,)
                ).fetchone()
            ),
            what="slot readers to go",
        )
        conn.execute(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
            "WHERE database = %s",
            (name,),
        )
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture()
def db(db_url: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(db_url, autocommit=True) as conn:
        register_vector(conn)
        yield conn


@pytest.fixture()
def logical(db: psycopg.Connection[Any]) -> dict[str, str]:
    """[capture] for logical mode in this test's database: slot names are per cluster."""
    name = db.execute("SELECT current_database()").fetchone()[0]  # type: ignore[index]
    return {"mode": "logical", "slot": f"s_{name}", "publication": "syncer"}


@pytest.fixture(scope="session")
def fake_server() -> Iterator[FakeEmbedderProcess]:
    with FakeEmbedderProcess(api_key="test-key-123") as server:
        yield server


@pytest.fixture()
def fake(fake_server: FakeEmbedderProcess) -> FakeEmbedderProcess:
    fake_server.reset()
    return fake_server


def pipeline_toml(**fields: Any) -> str:
    lines = ["[[pipelines]]"]
    for k, v in fields.items():
        if isinstance(v, bool):
            lines.append(f"{k} = {'true' if v else 'false'}")
        elif isinstance(v, (int, float)):
            lines.append(f"{k} = {v}")
        elif isinstance(v, (list, tuple)):
            lines.append(f"{k} = [{', '.join(_q(x) for x in v)}]")
        else:
            lines.append(f"{k} = {_q(v)}")
    return "\n".join(lines) + "\n"


def _q(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


TEST_WORKER = {"poll_interval_s": 0.5, "lease_s": 5, "retry_base_s": 0.05}


def base_toml(
    db_url: str, fake_url: str, concurrency: int = 4, worker: dict[str, Any] | None = None
) -> str:
    settings = {**TEST_WORKER, **(worker or {})}
    return (
        f"[database]\nurl = {_q(db_url)}\n\n"
        f'[providers.fake]\nkind = "openai"\nbase_url = {_q(fake_url)}\n'
        f'api_key_env = "FAKE_API_KEY"\nmax_concurrency = {concurrency}\ntimeout_s = 5\n\n'
        "[worker]\n" + "".join(f"{k} = {v}\n" for k, v in settings.items())
    )


DEFAULT_PIPELINE = {
    "name": "docs",
    "table": "public.docs",
    "text": ["title", "body"],
    "provider": "fake",
    "model": "text-embedding-3-small",
    "dimensions": 8,
    "batch_size": 16,
}


@pytest.fixture()
def make_config(tmp_path: Path, db_url: str, fake: FakeEmbedderProcess) -> Callable[..., Path]:
    def make(
        *pipelines: dict[str, Any],
        concurrency: int = 4,
        worker: dict[str, Any] | None = None,
        capture: dict[str, Any] | None = None,
    ) -> Path:
        body = base_toml(db_url, fake.url, concurrency, worker)
        if capture:
            body += "\n[capture]\n" + "".join(f"{k} = {_q(v)}\n" for k, v in capture.items())
        for p in pipelines or (DEFAULT_PIPELINE,):
            body += "\n" + pipeline_toml(**p)
        path = tmp_path / f"syncer-{next(_counter)}.toml"
        path.write_text(body)
        return path

    return make


def cli_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["FAKE_API_KEY"] = "test-key-123"
    env.pop("SYNCER_DATABASE_URL", None)
    env.update(extra)
    return env


def syncer(
    config: Path,
    *args: str,
    env: dict[str, str] | None = None,
    timeout_s: float = 120,
    input: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run the real command line in its own process."""
    return subprocess.run(
        [sys.executable, "-m", "syncer.cli", "-c", str(config), *args],
        capture_output=True,
        text=True,
        env=env or cli_env(),
        timeout=timeout_s,
        input=input,
    )


def start_syncer(
    config: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "syncer.cli", "-c", str(config), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env or cli_env(),
    )


def wait_for(cond: Callable[[], Any], timeout_s: float = 30, what: str = "condition") -> Any:
    """Poll a condition until it holds or the deadline passes."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(0.05)
