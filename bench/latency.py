"""latency: a caught-up pipeline; single-row UPDATEs of the text, one at a time (waiting for
each vector) and paced at 50 per second; commit → vector latency percentiles.

Both ends are commit timestamps from the database clock: the user's UPDATE (its xmin) and
the syncer's write of the vector (the row's next xmin). The poll that waits for a vector
only decides when to send the next UPDATE, so its interval never enters a figure.

Measured twice: trigger capture, then logical capture (a slot read by the worker). The
user's UPDATEs commit with synchronous_commit = on, PostgreSQL's default.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import asyncpg
import numpy as np

from bench import backlog
from bench.backlog import Backlog
from bench.harness import Harness, Pipeline
from bench.proc import Watched
from bench.report import Result
from bench.texts import texts

API_LATENCY_MS = 50.0
PACED_PER_S = 50.0
POLL_S = 0.005
VECTOR_TIMEOUT_S = 30.0
# syncer's defaults otherwise: a lost wake-up shows as a poll interval (5 s) in the p99.
PIPELINE = Pipeline(dimensions=1536, batch_size=64, max_concurrency=8)
UPDATE = "UPDATE docs SET body = $2 WHERE id = $1 RETURNING xmin::text"


@dataclass(frozen=True)
class Sizes:
    sequential: int
    paced_s: float

    @property
    def paced(self) -> int:
        return int(self.paced_s * PACED_PER_S)


async def run(h: Harness, quick: bool) -> Result:
    sizes = Sizes(30, 2.0) if quick else Sizes(300, 20.0)
    rows = sizes.sequential + sizes.paced + 100
    result = Result("latency")
    for mode in ("trigger", "logical"):
        h.set_latency(0.0)
        if mode == "trigger":
            b = await backlog.prepare(h, rows, PIPELINE, seed=77)
        else:
            b = await _prepare_logical(h, rows)
        log = h.workdir / f"latency-{mode}.log"
        proc = Watched(h.syncer_command(b.config, "run"), h.env(), log).start()
        try:
            _report(result, *await _measure(h, b, sizes), "" if mode == "trigger" else ", logical")
        finally:
            proc.terminate()
            await asyncio.to_thread(proc.wait, 30.0)
            h.drop_database(b.url)
    return result


async def _prepare_logical(h: Harness, rows: int) -> Backlog:
    """The same table and rows, captured through a logical replication slot."""
    url = h.new_database()
    capture = {"mode": "logical", "slot": "bench_latency", "publication": "bench_latency"}
    config = h.write_config(url, PIPELINE, capture=capture)
    conn = await h.connect(url)
    try:
        await conn.execute("CREATE TABLE docs (id bigint PRIMARY KEY, body text NOT NULL)")
        await asyncio.to_thread(h.install, config)
        records = [(i + 1, body) for i, body in enumerate(texts(rows, 77))]
        await conn.copy_records_to_table("docs", records=records, columns=["id", "body"])
    finally:
        await conn.close()
    return Backlog(url, config, rows)


async def _measure(
    h: Harness, b: Backlog, sizes: Sizes
) -> tuple[list[float], list[float], list[float]]:
    conn, watcher = await h.connect(b.url), await h.connect(b.url)
    # The user's writes commit as PostgreSQL's default has it (the embedded server's is
    # off): a logical slot sees a change once its WAL is flushed, at commit here.
    await conn.execute("SET synchronous_commit = on")
    try:
        await _wait_caught_up(watcher)
        h.set_latency(API_LATENCY_MS)
        new_texts = texts(sizes.sequential + sizes.paced, seed=78)
        ids = list(range(1, len(new_texts) + 1))
        split = sizes.sequential
        seq, polled = await _sequential(conn, watcher, ids[:split], new_texts[:split])
        paced = await _paced(conn, watcher, ids[split:], new_texts[split:])
    finally:
        await conn.close()
        await watcher.close()
    return seq, polled, paced


def _report(
    result: Result, seq: list[float], polled: list[float], paced: list[float], suffix: str
) -> None:
    ceiling = API_LATENCY_MS + 50
    for mode, ms in (("one at a time", seq), (f"{PACED_PER_S:.0f}/s", paced)):
        p50, p95, p99 = np.percentile(ms, [50, 95, 99])
        result.add(f"p50, {mode}{suffix}", p50, "ms", f"{len(ms)} updates")
        if ms is seq:  # a cross-check of the commit-timestamp method
            note = f"polled every {1000 * POLL_S:.0f} ms"
            result.add(f"p50 as the client saw it{suffix}", float(np.median(polled)), "ms", note)
        result.add(f"p95, {mode}{suffix}", p95, "ms")
        note = f"API latency {API_LATENCY_MS:.0f} ms"
        result.at_most(f"p99, {mode}{suffix}", p99, "ms", ceiling, note)


async def _wait_caught_up(conn: asyncpg.Connection) -> None:
    """Every row embedded and nothing left queued (or, logical mode, still to be read)."""
    deadline = time.monotonic() + 300
    while await conn.fetchval(
        "SELECT (SELECT count(*) FROM syncer.queue) + (SELECT count(*) FROM syncer.inbox)"
        " + (SELECT count(*) FROM docs WHERE embedding_hash IS NULL)"
    ):
        if time.monotonic() > deadline:
            raise RuntimeError("the syncer did not catch up with the backlog")
        await asyncio.sleep(0.05)


async def _sequential(
    conn: asyncpg.Connection, watcher: asyncpg.Connection, ids: list[int], bodies: list[str]
) -> tuple[list[float], list[float]]:
    """(latencies by the database clock, latencies as the polling client saw them), ms."""
    xids, polled = [], []
    for row_id, body in zip(ids, bodies, strict=True):
        xids.append(await conn.fetchval(UPDATE, row_id, body))
        committed = time.perf_counter()
        await _wait_written(watcher, [row_id], xids[-1:])
        polled.append(1000 * (time.perf_counter() - committed))
    return await _latencies_ms(watcher, ids, xids), polled


async def _paced(
    conn: asyncpg.Connection, watcher: asyncpg.Connection, ids: list[int], bodies: list[str]
) -> list[float]:
    started, xids = time.monotonic(), []
    for i, (row_id, body) in enumerate(zip(ids, bodies, strict=True)):
        await asyncio.sleep(max(0.0, started + i / PACED_PER_S - time.monotonic()))
        xids.append(await conn.fetchval(UPDATE, row_id, body))
    await _wait_written(watcher, ids, xids)
    return await _latencies_ms(watcher, ids, xids)


async def _wait_written(conn: asyncpg.Connection, ids: list[int], xids: list[str]) -> None:
    """Until no row still carries the user's transaction as its xmin."""
    deadline = time.monotonic() + VECTOR_TIMEOUT_S
    while await conn.fetchval(
        """SELECT count(*) FROM unnest($1::bigint[], $2::text[]) AS u(id, xid)
           JOIN docs d ON d.id = u.id WHERE d.xmin::text = u.xid""",
        ids,
        xids,
    ):
        if time.monotonic() > deadline:
            raise RuntimeError(f"no vector within {VECTOR_TIMEOUT_S} s of an update")
        await asyncio.sleep(POLL_S)


async def _latencies_ms(conn: asyncpg.Connection, ids: list[int], xids: list[str]) -> list[float]:
    rows = await conn.fetch(
        """SELECT 1000 * extract(epoch FROM pg_xact_commit_timestamp(d.xmin)
                                          - pg_xact_commit_timestamp(u.xid::xid))::float8
           FROM unnest($1::bigint[], $2::text[]) AS u(id, xid) JOIN docs d ON d.id = u.id""",
        ids,
        xids,
    )
    return [r[0] for r in rows]
