"""chaos: the long soak of syncer/testing/chaos.py in both capture modes (workers SIGKILLed
and replaced, a fast and an immediate database restart, 5 % API faults, a writer of every
kind of change, TRUNCATEs). Correctness must be perfect; duplicate inputs under 1 %.
Runs last: it restarts the benchmark's database server."""

from __future__ import annotations

import asyncio

import psycopg

from bench.harness import Harness, Pipeline
from bench.report import Result
from syncer.testing import chaos

PIPE = Pipeline(dimensions=64, batch_size=32, max_concurrency=4)


def _soak(h: Harness, mode: str, plan: chaos.Plan) -> chaos.Outcome:
    url = h.new_database()
    capture = {"mode": "logical", "slot": f"chaos_{mode}"} if mode == "logical" else None
    config = h.write_config(url, PIPE, capture=capture)
    text = config.read_text().replace('text = ["body"]', 'text = ["title", "body"]')
    text = text.replace(
        f"max_concurrency = {PIPE.max_concurrency}\n",
        f"max_concurrency = {PIPE.max_concurrency}\ntimeout_s = 1\n",
    )
    worker = "[worker]\nlease_s = 3\nmax_attempts = 20\n\n"
    config.write_text(text.replace("[[pipelines]]", worker + "[[pipelines]]", 1))
    h.set_latency(20)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE TABLE docs (id bigint PRIMARY KEY, title text, body text, tag text)")
        conn.execute(
            "INSERT INTO docs SELECT g, 'title ' || g, NULL FROM generate_series(1, %s) g",
            (plan.rows,),
        )
    h.install(config)
    try:
        return chaos.run(h.server, url, config, h.fake, h.env(), plan, PIPE.dimensions)
    finally:
        h.drop_database(url)


async def run(h: Harness, quick: bool) -> Result:
    plan = chaos.Plan(duration_s=20 if quick else 120, workers=2 if quick else 3, rows=1000)
    result = Result("chaos")
    for mode in ("trigger", "logical"):
        out = await asyncio.to_thread(_soak, h, mode, plan)
        note = f"{out.kills} kills, 2 restarts, {out.commits} commits, {out.rows} rows"
        result.at_most(f"rows missing or stale, {mode}", out.missing + out.stale, "rows", 0, note)
        result.at_most(f"dead letters, {mode}", out.dead_letters, "rows", 0)
        result.at_most(f"items left in the queue, {mode}", out.left_in_queue, "items", 0)
        result.at_most(f"worker exits not ours, {mode}", len(out.bad_exits), "exits", 0)
        share = f"{out.duplicates} of {out.inputs} inputs"
        result.at_most(f"duplicate inputs, {mode}", 100 * out.duplicate_share, "%", 1.0, share)
    return result
