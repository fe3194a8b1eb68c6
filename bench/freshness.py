"""freshness: live edits during a backfill. A table is backfilled (bulk lane) through a
300 ms API, once alone and once while 20 edits a second arrive (live lane). Goals: an
edit's change-to-vector p99 within the API latency + 0.5 s, and the backfill keeping at
least 70 % of its solo rate."""

from __future__ import annotations

import asyncio
import random
import subprocess
import time
from pathlib import Path

import asyncpg

from bench.harness import Harness, Pipeline
from bench.proc import Watched
from bench.report import Result
from bench.texts import texts

PIPE = Pipeline(dimensions=256, batch_size=64, max_concurrency=8)
API_LATENCY_MS = 300.0
EDITS_PER_S = 20
POLL_S = 0.02


async def _prepare(h: Harness, rows: int) -> tuple[str, Path]:
    """Rows first, then `install`: its backfill puts every row in the bulk lane."""
    url = h.new_database()
    config = h.write_config(url, PIPE)
    conn = await h.connect(url)
    try:
        await conn.execute("CREATE TABLE docs (id bigint PRIMARY KEY, body text NOT NULL)")
        records = [(i + 1, body) for i, body in enumerate(texts(rows, 91))]
        await conn.copy_records_to_table("docs", records=records, columns=["id", "body"])
    finally:
        await conn.close()
    command = h.syncer_command(config, "install")
    done = await asyncio.to_thread(subprocess.run, command, env=h.env(), capture_output=True)
    if done.returncode:
        raise RuntimeError(f"install failed: {done.stderr.decode()[-500:]}")
    return url, config


async def _bulk_left(conn: asyncpg.Connection) -> int:
    return int(await conn.fetchval("SELECT count(*) FROM syncer.queue WHERE lane = 1"))


async def _run(h: Harness, rows: int, edits: bool) -> tuple[float, list[float]]:
    """(backfill rows/s, change-to-vector seconds of each edit)."""
    url, config = await _prepare(h, rows)
    h.set_latency(API_LATENCY_MS)
    log = h.workdir / "freshness.log"
    proc = Watched(h.syncer_command(config, "run"), h.env(), log).start()
    conn, watch = await h.connect(url), await h.connect(url)
    latencies: list[float] = []
    try:
        while await _bulk_left(watch) >= rows:  # noqa: ASYNC110 - another process's progress
            await asyncio.sleep(POLL_S)
        started, left0 = time.monotonic(), await _bulk_left(watch)
        pending: dict[int, float] = {}
        rng, n, next_edit = random.Random(5), 0, time.monotonic()
        while (left := await _bulk_left(watch)) > rows * 0.1:
            now = time.monotonic()
            if edits and now >= next_edit:
                n += 1
                key = rng.randrange(1, rows + 1)
                await conn.execute("UPDATE docs SET body = $2 WHERE id = $1", key, f"edit {n}")
                pending[key] = time.monotonic()
                next_edit += 1 / EDITS_PER_S
            if pending:
                done = await watch.fetch(
                    "SELECT id FROM docs WHERE id = ANY($1::bigint[]) "
                    "AND embedding_hash = syncer.docs__hash(docs)",
                    list(pending),
                )
                for r in done:
                    latencies.append(time.monotonic() - pending.pop(r["id"]))
            await asyncio.sleep(POLL_S)
        rate = (left0 - left) / (time.monotonic() - started)
    finally:
        await conn.close()
        await watch.close()
        proc.terminate()
        await asyncio.to_thread(proc.wait, 60.0)
        h.drop_database(url)
    return rate, latencies


async def run(h: Harness, quick: bool) -> Result:
    rows = 12_000 if quick else 100_000
    solo, _ = await _run(h, rows, edits=False)
    mixed, lat = await _run(h, rows, edits=True)
    result = Result("freshness")
    result.add("backfill rows/s, alone", solo, "rows/s", f"{rows:,} rows, 300 ms API")
    share = 100 * mixed / solo if solo else 0.0
    result.at_least(
        "backfill rate with 20 edits/s, vs alone", share, "%", 70, f"{mixed:,.0f} rows/s"
    )
    if lat:
        lat.sort()
        p50, p99 = lat[len(lat) // 2], lat[min(len(lat) - 1, int(len(lat) * 0.99))]
        note = f"{len(lat)} edits, p50 {p50 * 1000:.0f} ms, max {lat[-1] * 1000:.0f} ms"
        result.at_most("edit change-to-vector p99", p99 * 1000, "ms", API_LATENCY_MS + 500, note)
    return result
