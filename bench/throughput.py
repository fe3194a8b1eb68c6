"""Scenarios that drain a backlog: api_bound, db_bound, uvloop and memory."""

from __future__ import annotations

import asyncio
import itertools
import time

import numpy as np
import psutil
from pgvector import Vector

from bench import backlog, profiling
from bench.backlog import Backlog, Drain
from bench.harness import Harness, Pipeline
from bench.proc import RSS_SAMPLE_S, backend_count, backends_settled, postgres_cpu_s
from bench.report import Result
from syncer import app, config, db
from syncer.capture.trigger import move_inbox
from syncer.queue import Queue
from syncer.targets import WriteBatch, store_for
from syncer.worker import MAX_WRITE_ROWS, window

_seeds = itertools.count(1000)  # a new seed per backlog: texts the fake server never cached

API = Pipeline(dimensions=1536, batch_size=64, max_concurrency=8)
BUSY_CORES = 0.25  # CPU used by processes outside the benchmark, in cores: beyond, say so


def rows_for(quick: bool) -> int:
    return 3_000 if quick else 20_000


async def fresh_drain(h: Harness, rows: int, latency_ms: float, how: str = "cli") -> Drain:
    """Prepare a backlog, then drain it with the real CLI or with bench.child (`how` is
    "cli" or a loop name for bench.child)."""
    b = await backlog.prepare(h, rows, API, next(_seeds))
    h.set_latency(latency_ms)
    command = backlog.cli_command(h, b) if how == "cli" else backlog.child_command(b, how)
    try:
        return await backlog.drain(h, b, command)
    finally:
        h.drop_database(b.url)


def add_costs(result: Result, d: Drain) -> None:
    """Where the CPU went, in seconds and in cores over launch → last vector."""
    span = d.last_vector_s
    result.add("syncer CPU per row", d.cpu_ms_per_row, "ms")
    for who, seconds in (
        ("syncer", d.usage.cpu_s),
        ("postgres", d.cpu.postgres_s),
        ("fake server", d.cpu.fake_s),
        ("others on the machine", d.cpu.other_s),
    ):
        result.add(f"CPU {who}", seconds, "s", f"{seconds / span:.2f} cores over {span:.1f} s")
    if d.cpu.other_s / span > BUSY_CORES:
        result.add("BUSY MACHINE: figures suspect", d.cpu.other_s / span, "cores", "used by others")
    idle_exit_s = d.usage.wall_s - d.last_vector_s
    result.add("exit after the last vector", idle_exit_s, "s", "--exit-when-idle noticing")


async def api_bound(h: Harness, quick: bool) -> Result:
    latency_ms = 200.0
    limit = API.max_concurrency * API.batch_size / (latency_ms / 1000)
    d = await fresh_drain(h, rows_for(quick), latency_ms)
    result = Result("api_bound")
    whole_note = f"{d.whole_rows_s / limit:.1%} of the limit, {limit:,.0f}"
    result.add("rows/s, whole run", d.whole_rows_s, "rows/s", whole_note)
    steady_note = f"{d.steady_rows_s:,.0f} rows/s, middle 80 % of rows"
    result.at_least("steady share of limit", 100 * d.steady_rows_s / limit, "%", 95, steady_note)
    result.add("first vector after launch", d.first_vector_s, "s")
    per_request = d.api_inputs / max(1, d.api_requests)
    result.add("inputs per API request", per_request, "", f"{d.api_requests} requests")
    add_costs(result, d)
    return result


async def raw_copy_rows_s(
    h: Harness, rows: int, dimensions: int, tries: int
) -> tuple[float, float]:
    """The database's ceiling: a binary COPY of as many vectors into a plain table; the
    best of `tries` (a ceiling is what the database can do, not what it did once). Returns
    (rows/s, PostgreSQL's CPU µs per row in that try)."""
    url = h.new_database()
    conn = await h.connect(url)
    try:
        await conn.execute(f"CREATE TABLE raw (id bigint, embedding vector({dimensions}))")
        rng = np.random.default_rng(7)
        vectors = rng.standard_normal((rows, dimensions), dtype=np.float32)
        records = [(i, Vector(v)) for i, v in enumerate(vectors)]
        best = (0.0, 0.0)
        for _ in range(tries):
            await conn.execute("TRUNCATE raw")
            cpu_before = postgres_cpu_s(h.postmaster_pid)
            started = time.perf_counter()
            await conn.copy_records_to_table("raw", records=records)
            rate = rows / (time.perf_counter() - started)
            cpu_us = 1e6 * (postgres_cpu_s(h.postmaster_pid) - cpu_before) / rows
            best = max(best, (rate, cpu_us))
        return best
    finally:
        await conn.close()
        h.drop_database(url)


async def db_bound(h: Harness, quick: bool) -> Result:
    rows, tries = rows_for(quick), 1 if quick else 3
    d = await fresh_drain(h, rows, 0.0)
    copy, copy_pg_us = await raw_copy_rows_s(h, rows, API.dimensions, tries)
    result = Result("db_bound")
    result.add("rows/s, whole run", d.whole_rows_s, "rows/s")
    result.at_least("rows/s, steady", d.steady_rows_s, "rows/s", 4000, "middle 80 %")
    note = f"{rows:,} x {API.dimensions}-d vectors, best of {tries}"
    result.add("raw binary COPY", copy, "rows/s", note)
    result.at_least("steady / raw COPY", 100 * d.steady_rows_s / copy, "%", 40)
    add_costs(result, d)
    # The ceiling: the CPU every row needs from each process, against the machine's cores.
    sql_us = await statements_alone(h, rows)
    fake_us = 1e6 * d.cpu.fake_s / rows
    syncer_us = 1000 * d.steady_cpu_ms_per_row
    note = f"COPY: {copy_pg_us:.1f} µs/row, {sql_us / copy_pg_us:.1f}x"
    result.add("PostgreSQL CPU per row, syncer's SQL alone", sql_us, "µs", note)
    result.add("fake server CPU per row", fake_us, "µs")
    result.add("syncer CPU per row, steady", syncer_us, "µs", "middle 80 %, no start-up")
    cores = psutil.cpu_count() or 1
    for what, per_row in (
        ("ceiling, all three", sql_us + fake_us + syncer_us),
        ("ceiling, syncer free", sql_us + fake_us),
    ):
        ceiling = cores * 1e6 / per_row
        note = f"{100 * ceiling / copy:.1f} % of COPY; {cores} cores / {per_row:.0f} µs CPU a row"
        result.add(what, ceiling, "rows/s", note)
    result.sections["profile of the syncer"] = await profile(h, rows)
    return result


async def statements_alone(h: Harness, rows: int) -> float:
    """PostgreSQL's CPU per row for syncer's own statements on a backlog, run one after the
    other on one connection by syncer's own code, with ready vectors and no API: inbox move,
    claims and fetches the worker's size, hash-guarded writes with the queue items' removal.
    A floor for the database's share of a drain (the drain adds concurrency and start-up)."""
    b: Backlog = await backlog.prepare(h, rows, API, next(_seeds))
    cfg = config.load(b.config, env=h.env())
    p = cfg.pipelines[0]
    claim = window(p, cfg.providers[p.provider], cfg.worker)[2]  # the worker's, while busy
    rng = np.random.default_rng(3)
    vectors = rng.standard_normal((MAX_WRITE_ROWS, p.dimensions), dtype=np.float32)
    try:
        backends, before = backend_count(h.postmaster_pid), postgres_cpu_s(h.postmaster_pid)
        pool = await db.create_pool(cfg.database.model_copy(update={"min_size": 1}))
        try:
            async with pool.acquire() as pooled:
                rendered = await app.checked_pipeline(pooled, p)  # type: ignore[arg-type]
            queue = Queue(pool, "bench", 60.0)
            store = store_for(pool, p, rendered)
            await move_inbox(pool)
            while items := await queue.claim(p.name, claim):
                fetched = await store.fetch([i.key for i in items])
                for lo in range(0, len(items), MAX_WRITE_ROWS):
                    part = slice(lo, lo + MAX_WRITE_ROWS)
                    batch = WriteBatch(done_ids=[i.id for i in items[part]])
                    for row, vector in zip(fetched[part], vectors, strict=False):
                        batch.add_vector(row.key, vector, row.hash)
                    await store.write(batch)
        finally:
            await pool.close()
        await asyncio.to_thread(backends_settled, h.postmaster_pid, backends)
        used = postgres_cpu_s(h.postmaster_pid) - before
        check = await h.connect(b.url)
        try:
            written = await check.fetchval("SELECT count(*) FROM docs WHERE embedding IS NOT NULL")
        finally:
            await check.close()
        if written != rows:
            raise RuntimeError(f"syncer's statements wrote {written} of {rows} vectors")
    finally:
        h.drop_database(b.url)
    return 1e6 * used / rows


async def profile(h: Harness, rows: int) -> list[str]:
    """A separate drain of the real command under py-spy: the figures above stay unprofiled."""
    if profiling.py_spy() is None:
        return ["  (py-spy is not installed: pip install py-spy)"]
    b: Backlog = await backlog.prepare(h, rows, API, next(_seeds))
    h.set_latency(0.0)
    path = h.workdir / "db_bound.pyspy.txt"
    try:
        await backlog.drain(h, b, profiling.wrap(backlog.cli_command(h, b), path))
    finally:
        h.drop_database(b.url)
    return profiling.summarize(path)


async def event_loops(h: Harness, quick: bool) -> Result:
    """The db_bound drain under uvloop and under asyncio's own loop, interleaved."""
    rows, rounds = rows_for(quick), 1 if quick else 2
    rates: dict[str, list[float]] = {"uvloop": [], "asyncio": []}
    cpu: dict[str, list[float]] = {"uvloop": [], "asyncio": []}
    for _ in range(rounds):
        for loop in rates:
            d = await fresh_drain(h, rows, 0.0, how=loop)
            rates[loop].append(d.steady_rows_s)
            cpu[loop].append(d.cpu_ms_per_row)
    result = Result("uvloop")
    for loop in rates:
        note = f"{np.mean(cpu[loop]):.2f} ms CPU/row, {rounds} run(s)"
        result.add(f"rows/s, steady, {loop}", float(np.mean(rates[loop])), "rows/s", note)
    result.add("uvloop / asyncio", float(np.mean(rates["uvloop"]) / np.mean(rates["asyncio"])), "x")
    return result


async def memory(h: Harness, quick: bool) -> Result:
    """Peak RSS for a small and a ten times larger backlog: it must not grow with it."""
    small, large = (2_000, 20_000) if quick else (10_000, 100_000)
    result = Result("memory")
    peaks = {}
    for rows in (small, large):
        d = await fresh_drain(h, rows, 0.0)
        peaks[rows] = d.usage.peak_rss_mb
        note = f"sampled every {1000 * RSS_SAMPLE_S:.0f} ms"
        result.add(f"peak RSS, {rows:,} rows", peaks[rows], "MB", note)
        cpu_10k = 10_000 * d.usage.cpu_s / rows
        result.add(f"syncer CPU per 10,000 rows ({rows:,})", cpu_10k, "s")
    result.at_most(f"RSS {large:,} / {small:,}", peaks[large] / peaks[small], "x", 1.2)
    return result
