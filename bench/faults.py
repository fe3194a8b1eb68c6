"""faults: the api-bound drain with 5 % of requests failing at random (HTTP 500 or a dropped
connection) against the same drain without faults, same latency and seed."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from bench import backlog
from bench.backlog import Drain
from bench.harness import Harness, Pipeline
from bench.report import Result

PIPE = Pipeline(dimensions=1536, batch_size=64, max_concurrency=8)
LATENCY_MS, JITTER_MS = 50.0, 150.0  # 50-200 ms, uniform
FAIL_RATE = 0.05
FAIL_KINDS = ["status500", "reset"]
SEED = 42

_seeds = itertools.count(7000)


@dataclass(frozen=True)
class Outcome:
    drain: Drain | None  # None: the drain left rows without a vector
    embedded: int
    dead_letters: int
    requests: int
    failed: int  # requests answered with an injected fault


async def _run(h: Harness, rows: int, fail_rate: float) -> Outcome:
    b = await backlog.prepare(h, rows, PIPE, next(_seeds))
    h.set_latency(LATENCY_MS)
    h.fake.control(latency_jitter_ms=JITTER_MS, seed=SEED)
    if fail_rate:
        h.fake.control(fail_rate=fail_rate, fail_kinds=FAIL_KINDS)
    try:
        try:
            d: Drain | None = await backlog.drain(h, b, backlog.cli_command(h, b))
        except RuntimeError:  # rows left without a vector: counted below
            d = None
        conn = await h.connect(b.url)
        try:
            embedded = await conn.fetchval(
                "SELECT count(*) FROM docs WHERE embedding_hash IS NOT NULL"
            )
            dead = await conn.fetchval("SELECT count(*) FROM syncer.dead_letters")
        finally:
            await conn.close()
    finally:
        h.drop_database(b.url)
    stats = h.fake.stats()
    failed = stats["requests"] - stats["ok"]
    return Outcome(d, embedded, dead, stats["requests"], failed)


async def run(h: Harness, quick: bool) -> Result:
    rows = 8_000 if quick else 40_000
    clean = await _run(h, rows, 0.0)
    faulty = await _run(h, rows, FAIL_RATE)
    result = Result("faults")
    limit = PIPE.max_concurrency * PIPE.batch_size / ((LATENCY_MS + JITTER_MS / 2) / 1000)
    for label, o in (("no faults", clean), ("5 % faults", faulty)):
        note = f"{o.requests} requests, {o.failed} failed (limit ~{limit:,.0f} rows/s)"
        if o.drain is not None:
            result.add(f"rows/s, steady, {label}", o.drain.steady_rows_s, "rows/s", note)
    result.at_least("rows embedded, 5 % faults", faulty.embedded, "rows", rows, f"of {rows:,}")
    result.at_most("dead letters, 5 % faults", faulty.dead_letters, "rows", 0)
    if clean.drain is None or faulty.drain is None:
        return result
    steady = 100 * faulty.drain.steady_rows_s / clean.drain.steady_rows_s
    whole = 100 * faulty.drain.whole_rows_s / clean.drain.whole_rows_s
    note = f"middle 80 % of rows; whole run {whole:.1f} %"
    result.at_least("steady throughput vs no faults", steady, "%", 90, note)
    return result
