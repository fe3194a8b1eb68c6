"""A backlog of rows to embed, and one syncer process draining it.

Completion times come from the database afterwards: each row's vector was written by a
transaction whose commit timestamp PostgreSQL kept. Nothing watches the run while it
happens, so the measuring costs the syncer nothing.
"""

from __future__ import annotations

import asyncio
import sys
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import asyncpg

from bench.harness import Harness, Pipeline
from bench.proc import (
    CpuUse,
    ProcessUsage,
    Watched,
    backend_count,
    backends_settled,
    cpu_snapshot,
    cpu_use,
)
from bench.texts import texts

DRAIN_TIMEOUT_S = 900.0
STEADY = (0.1, 0.9)  # steady state: the middle 80 % of rows by completion time


@dataclass(frozen=True)
class Backlog:
    url: str
    config: Path
    rows: int


@dataclass(frozen=True)
class Drain:
    rows: int
    usage: ProcessUsage
    cpu: CpuUse
    whole_rows_s: float  # all rows over launch → last commit, start-up included
    steady_rows_s: float
    first_vector_s: float  # launch → first commit: start-up and the first round trip
    last_vector_s: float  # launch → last commit
    api_requests: int
    api_inputs: int
    steady_cpu_ms_per_row: float  # the syncer's, over the middle 80 % (no start-up)

    @property
    def cpu_ms_per_row(self) -> float:
        return 1000 * self.usage.cpu_s / self.rows


async def prepare(h: Harness, rows: int, p: Pipeline, seed: int) -> Backlog:
    """A fresh database with `rows` rows captured by the triggers (in syncer.inbox, where
    writes made while no worker runs wait), nothing embedded."""
    url = h.new_database()
    config = h.write_config(url, p)
    conn = await h.connect(url)
    try:
        await conn.execute("CREATE TABLE docs (id bigint PRIMARY KEY, body text NOT NULL)")
        await asyncio.to_thread(h.install, config)
        records = [(i + 1, body) for i, body in enumerate(texts(rows, seed))]
        await conn.copy_records_to_table("docs", records=records, columns=["id", "body"])
        captured = await conn.fetchval("SELECT count(*) FROM syncer.inbox")
        if captured != rows:
            raise RuntimeError(f"capture took {captured} keys for {rows} rows")
        for table in ("docs", "syncer.inbox", "syncer.queue"):
            await conn.execute(f"VACUUM ANALYZE {table}")
    finally:
        await conn.close()
    return Backlog(url, config, rows)


def cli_command(h: Harness, backlog: Backlog) -> list[str]:
    return h.syncer_command(backlog.config, "run", "--exit-when-idle")


def child_command(backlog: Backlog, loop: str) -> list[str]:
    """The worker through bench.child, on the event loop `loop` (asyncio or uvloop)."""
    return [sys.executable, "-m", "bench.child", "-c", str(backlog.config), "--loop", loop]


async def drain(h: Harness, backlog: Backlog, command: list[str]) -> Drain:
    """Run `command` (a syncer that exits when idle) over the backlog and measure it."""
    conn = await h.connect(backlog.url)
    try:
        launched = await conn.fetchval("SELECT clock_timestamp()")
        backends, before = backend_count(h.postmaster_pid), cpu_snapshot(h)
        proc = Watched(command, h.env(), h.workdir / "syncer.log").start()
        usage = await asyncio.to_thread(proc.wait, DRAIN_TIMEOUT_S)
        await asyncio.to_thread(backends_settled, h.postmaster_pid, backends)
        cpu = cpu_use(before, cpu_snapshot(h), usage.cpu_s)
        if usage.returncode != 0:
            raise RuntimeError(f"syncer exited with {usage.returncode}:\n{proc.log_tail()}")
        done = await completion_times(conn, launched)
    finally:
        await conn.close()
    if len(done) != backlog.rows:
        raise RuntimeError(f"{len(done)} of {backlog.rows} rows embedded:\n{proc.log_tail()}")
    stats = h.fake.stats()
    whole, steady = rates(done)
    api = (stats["ok"], stats["inputs"])
    lo, hi = steady_span(done)
    at = launched.timestamp()
    steady_cpu = proc.cpu_between(at + done[lo], at + done[hi]) / (hi - lo)
    return Drain(
        backlog.rows, usage, cpu, whole, steady, done[0], done[-1], *api, 1000 * steady_cpu
    )


async def completion_times(conn: asyncpg.Connection, since: datetime) -> list[float]:
    """Seconds from `since` to the commit that wrote each embedded row's vector, sorted."""
    rows = await conn.fetch(
        """SELECT extract(epoch FROM pg_xact_commit_timestamp(xmin) - $1)::float8
           FROM docs WHERE embedding_hash IS NOT NULL ORDER BY 1""",
        since,
    )
    return [r[0] for r in rows]


def steady_span(done: list[float]) -> tuple[int, int]:
    """The indexes of the first and last completion of the steady state."""
    n = len(done)
    return int(n * STEADY[0]), int(n * STEADY[1]) - 1


def rates(done: list[float]) -> tuple[float, float]:
    """(rows/s over the whole run, rows/s over the middle 80 % of completions)."""
    n = len(done)
    lo, hi = steady_span(done)
    span = done[hi] - done[lo]
    steady = (hi - lo) / span if span > 0 else float("inf")
    return n / done[-1], steady
