"""Scenarios that drain a backlog: api_bound, db_bound, uvloop and memory."""

from __future__ import annotations

import itertools
import time

import numpy as np
from pgvector import Vector

from bench import backlog, profiling
from bench.backlog import Backlog, Drain
from bench.harness import Harness, Pipeline
from bench.proc import RSS_SAMPLE_S
from bench.report import Result

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


async def raw_copy_rows_s(h: Harness, rows: int, dimensions: int, tries: int) -> float:
    """The database's ceiling: a binary COPY of as many vectors into a plain table; the
    best of `tries` (a ceiling is what the database can do, not what it did once)."""
    url = h.new_database()
    conn = await h.connect(url)
    try:
        await conn.execute(f"CREATE TABLE raw (id bigint, embedding vector({dimensions}))")
        rng = np.random.default_rng(7)
        vectors = rng.standard_normal((rows, dimensions), dtype=np.float32)
        records = [(i, Vector(v)) for i, v in enumerate(vectors)]
        best = 0.0
        for _ in range(tries):
            await conn.execute("TRUNCATE raw")
            started = time.perf_counter()
            await conn.copy_records_to_table("raw", records=records)
            best = max(best, rows / (time.perf_counter() - started))
        return best
    finally:
        await conn.close()
        h.drop_database(url)


async def db_bound(h: Harness, quick: bool) -> Result:
    rows, tries = rows_for(quick), 1 if quick else 3
    d = await fresh_drain(h, rows, 0.0)
    copy = await raw_copy_rows_s(h, rows, API.dimensions, tries)
    result = Result("db_bound")
    result.add("rows/s, whole run", d.whole_rows_s, "rows/s")
    result.at_least("rows/s, steady", d.steady_rows_s, "rows/s", 4000, "middle 80 %")
    note = f"{rows:,} x {API.dimensions}-d vectors, best of {tries}"
    result.add("raw binary COPY", copy, "rows/s", note)
    result.at_least("steady / raw COPY", 100 * d.steady_rows_s / copy, "%", 40)
    add_costs(result, d)
    result.sections["profile of the syncer"] = await profile(h, rows)
    return result


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
