"""What every scenario stands on: the embedded PostgreSQL, the fake OpenAI server in its own
process, a fresh database per run, config files, and the real `syncer` command.

The server keeps commit timestamps (`track_commit_timestamp`), so a row's completion time
is read afterwards from the database clock instead of being watched while it happens.
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from urllib.parse import urlparse

import asyncpg
import psycopg
from pgvector.asyncpg import register_vector

from syncer.testing import embedded_pg
from syncer.testing.fake_embedder import FakeEmbedderProcess

REPO = Path(__file__).resolve().parent.parent
API_KEY_ENV = "BENCH_FAKE_API_KEY"
API_KEY = "bench-key"
TEMPLATE = "bench_template"
MODEL = "text-embedding-3-small"
SERVER_SETTINGS = {
    "track_commit_timestamp": "on",
    "max_wal_size": "4GB",
    # capture_cost's logical arms. With synchronous_commit = off a change reaches a slot
    # when the WAL writer flushes it: every 10 ms here, not the default 200 ms.
    "wal_level": "logical",
    "wal_writer_delay": "10ms",
}


@dataclass(frozen=True)
class Pipeline:
    """The knobs a scenario sets; everything else keeps syncer's defaults."""

    dimensions: int = 1536
    batch_size: int = 64
    max_concurrency: int = 8
    rpm: int | None = None  # the provider's limits (syncer's config); None: no limit
    tpm: int | None = None


class Harness:
    def __init__(self) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix="syncer-bench-"))
        self._ids = itertools.count(1)
        self.pg: embedded_pg.EmbeddedPostgres | None = None
        self.fake = FakeEmbedderProcess(api_key=API_KEY)

    def __enter__(self) -> Harness:
        self.pg = embedded_pg.start(settings=SERVER_SETTINGS)
        self.fake.start()
        self._sql("postgres", f"CREATE DATABASE {TEMPLATE}")
        self._sql(TEMPLATE, "CREATE EXTENSION vector")
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.fake.stop()
        if self.pg is not None:
            self.pg.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)

    @property
    def server(self) -> embedded_pg.EmbeddedPostgres:
        assert self.pg is not None, "use the harness as a context manager"
        return self.pg

    def _sql(self, database: str, statement: str) -> None:
        with psycopg.connect(self.server.url(database), autocommit=True) as conn:
            conn.execute(statement.encode())

    @property
    def bin_dir(self) -> Path:
        return Path(self.server.server.bin_path)

    @property
    def postmaster_pid(self) -> int:
        pid: int | None = self.server.server.get_pid()
        assert pid is not None, "the embedded PostgreSQL is not running"
        return pid

    def new_database(self) -> str:
        name = f"run{next(self._ids)}"
        self._sql("postgres", f"CREATE DATABASE {name} TEMPLATE {TEMPLATE}")
        return self.server.url(name)

    def drop_database(self, url: str) -> None:
        """Runs leave nothing behind that a later scenario's checkpoints would have to write."""
        name = urlparse(url).path.lstrip("/")
        # A database with a logical slot cannot be dropped.
        self._sql(
            "postgres",
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
            f"WHERE database = '{name}'",
        )
        self._sql("postgres", f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    async def connect(self, url: str) -> asyncpg.Connection:
        conn: asyncpg.Connection = await asyncpg.connect(url)
        await register_vector(conn)
        return conn

    def set_latency(self, latency_ms: float) -> None:
        """A clean fake server (empty request log) answering after `latency_ms`."""
        self.fake.reset()
        self.fake.control(latency_ms=latency_ms)

    def write_config(
        self,
        url: str,
        p: Pipeline,
        table: str = "public.docs",
        name: str = "docs",
        capture: dict[str, str] | None = None,
    ) -> Path:
        path = self.workdir / f"syncer-{next(self._ids)}.toml"
        limits = "".join(
            f"{key} = {value}\n" for key, value in (("rpm", p.rpm), ("tpm", p.tpm)) if value
        )
        path.write_text(
            f"[database]\nurl = {_q(url)}\n\n"
            f'[providers.fake]\nkind = "openai"\nbase_url = {_q(self.fake.url)}\n'
            f"api_key_env = {_q(API_KEY_ENV)}\nmax_concurrency = {p.max_concurrency}\n"
            f"{limits}\n"
            + ("[capture]\n" if capture else "")
            + "".join(f"{k} = {_q(v)}\n" for k, v in (capture or {}).items())
            + f'[[pipelines]]\nname = {_q(name)}\ntable = {_q(table)}\ntext = ["body"]\n'
            f'provider = "fake"\nmodel = {_q(MODEL)}\ndimensions = {p.dimensions}\n'
            f"batch_size = {p.batch_size}\n",
            encoding="utf-8",
        )
        return path

    def env(self) -> dict[str, str]:
        env = {**os.environ, API_KEY_ENV: API_KEY, "PYTHONPATH": str(REPO)}
        env.pop("SYNCER_DATABASE_URL", None)
        return env

    def syncer_command(self, config: Path, *args: str) -> list[str]:
        return [
            sys.executable,
            "-m",
            "syncer.cli",
            "-c",
            str(config),
            "--log-level",
            "warning",
            *args,
        ]

    def install(self, config: Path) -> None:
        """`syncer install --no-backfill`: the rows inserted afterwards reach the queue
        through the capture triggers, as a user's writes would."""
        command = self.syncer_command(config, "install", "--no-backfill")
        done = subprocess.run(command, env=self.env(), capture_output=True, text=True, cwd=REPO)
        if done.returncode != 0:
            raise RuntimeError(f"syncer install failed: {done.stderr.strip()}")


def _q(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
