"""claim_cost: the claim statement alone. A backlog of rows in one lane, then in both (every
key once live and once bulk, the worst case for the per-key checks), is claimed in the worker's busy
size (512) until empty, one claim after the other on one connection; the figure is
milliseconds per claim, best of the rounds (noise only slows a run down)."""

from __future__ import annotations

import time

from bench import backlog
from bench.harness import Harness, Pipeline
from bench.report import Result
from syncer import db
from syncer.capture.trigger import move_inbox
from syncer.config import load
from syncer.queue import Queue

PIPE = Pipeline(dimensions=256, batch_size=64, max_concurrency=8)
CLAIM = 512


async def _round(h: Harness, rows: int, seed: int, both: bool) -> float:
    b = await backlog.prepare(h, rows, PIPE, seed)
    cfg = load(b.config, env=h.env())
    pool = await db.create_pool(cfg.database.model_copy(update={"min_size": 1}))
    try:
        await move_inbox(pool)
        if both:
            await pool.execute(
                "INSERT INTO syncer.queue (pipeline, key, lane) "
                "SELECT pipeline, key, 1 FROM syncer.queue ON CONFLICT DO NOTHING"
            )
        await pool.execute("VACUUM ANALYZE syncer.queue")
        queue = Queue(pool, "bench", 60.0)
        claims, started = 0, time.perf_counter()
        while await queue.claim("docs", CLAIM, 0.25):
            claims += 1
            # Finish what was claimed, as writes do, so the next claim sees the next items.
            await pool.execute("DELETE FROM syncer.queue WHERE leased_by = 'bench'")
        return 1000 * (time.perf_counter() - started) / max(claims, 1)
    finally:
        await pool.close()
        h.drop_database(b.url)


async def run(h: Harness, quick: bool) -> Result:
    rows, rounds = (5_000, 2) if quick else (20_000, 3)
    result = Result("claim_cost")
    for both in (False, True):
        best = min([await _round(h, rows, 70 + i, both) for i in range(rounds)])
        lanes = "both lanes" if both else "the live lane"
        result.add(f"ms per claim of {CLAIM}, keys in {lanes}", best, "ms", f"best of {rounds}")
    return result
