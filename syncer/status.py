"""`syncer status`: each pipeline's queue, dead letters, coverage, last write, runners and
pause, gathered in a few statements, and the thresholds that make it a probe.

Coverage (how many rows with text have their current vector) reads the source table, hashing
each row's text: about 1 µs of hash and more of reading a row, so a full count of a large
table takes seconds to minutes. Above COVERAGE_EXACT_ROWS (by the planner's estimate) it reads
a TABLESAMPLE SYSTEM sample of COVERAGE_SAMPLE_ROWS rows' worth of pages and scales the counts
up; `coverage_exact` says which. Either way it is a plain MVCC read: no lock beyond ACCESS
SHARE, nothing waits on it, and a statement timeout bounds it.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

import asyncpg

from syncer.capture import source_for
from syncer.config import Config
from syncer.schema.render import PipelineSQL
from syncer.sqlfiles import query

COVERAGE_EXACT_ROWS = 200_000
COVERAGE_SAMPLE_ROWS = 100_000
COVERAGE_TIMEOUT_MS = 30_000


@dataclass
class PipelineStatus:
    name: str
    mode: str
    paused: bool
    queued: int
    in_progress: int
    delayed: int
    oldest_age_s: float
    dead_letters: dict[str, int]
    rows: int
    rows_current: int
    rows_missing: int
    rows_stale: int
    coverage: float | None  # rows_current / rows with text; None: no row has text
    coverage_exact: bool
    last_write_at: datetime | None
    runners: list[str]
    slot_lag_bytes: int | None = None  # logical mode only

    def doc(self) -> dict[str, Any]:
        d = asdict(self)
        if self.mode != "logical":
            d.pop("slot_lag_bytes")
        return d


@dataclass(frozen=True)
class Coverage:
    rows: int
    with_text: int
    current: int
    missing: int
    exact: bool


async def coverage(conn: asyncpg.Connection, rendered: PipelineSQL) -> Coverage:
    estimate = int(await conn.fetchval(rendered["coverage_estimate"]) or 0)
    percent = 100.0
    if estimate > COVERAGE_EXACT_ROWS:
        percent = max(0.01, 100.0 * COVERAGE_SAMPLE_ROWS / estimate)
    async with conn.transaction(readonly=True):
        await conn.execute(f"SET LOCAL statement_timeout = {COVERAGE_TIMEOUT_MS}")
        r = await conn.fetchrow(rendered["coverage"], percent)
    assert r is not None
    scale = 100.0 / percent
    rows, with_text, current, missing = (round(int(r[k]) * scale) for k in range(4))
    if percent < 100.0:
        rows = max(rows, estimate)
    return Coverage(rows, with_text, current, missing, percent >= 100.0)


async def gather(
    cfg: Config, conn: asyncpg.Connection, rendered: dict[str, PipelineSQL]
) -> list[PipelineStatus]:
    queue = {r["name"]: r for r in await conn.fetch(query("queue_gauges"))}
    meta = {r["name"]: r for r in await conn.fetch(query("status_pipelines"))}
    dead: dict[str, dict[str, int]] = defaultdict(dict)
    for r in await conn.fetch(query("dead_letter_counts")):
        dead[r["pipeline"]][r["error_class"]] = int(r["n"])
    slot = await source_for(cfg).status(conn)
    slot_lag = int(slot["behind"]) if slot is not None and slot["behind"] is not None else None
    out = []
    for p in cfg.pipelines:
        q, m = queue.get(p.name), meta.get(p.name)
        cov = await coverage(conn, rendered[p.name])
        out.append(
            PipelineStatus(
                name=p.name,
                mode=cfg.capture.mode,
                paused=bool(m and m["paused"]),
                queued=int(q["ready"]) if q else 0,
                in_progress=int(q["leased"]) if q else 0,
                delayed=int(q["delayed"]) if q else 0,
                oldest_age_s=round(float(q["oldest_s"]), 3) if q else 0.0,
                dead_letters=dead.get(p.name, {}),
                rows=cov.rows,
                rows_current=cov.current,
                rows_missing=cov.missing,
                rows_stale=max(0, cov.with_text - cov.current - cov.missing),
                coverage=round(cov.current / cov.with_text, 6) if cov.with_text else None,
                coverage_exact=cov.exact,
                last_write_at=m["last_write_at"] if m else None,
                runners=list(m["runners"]) if m else [],
                slot_lag_bytes=slot_lag,
            )
        )
    return out


@dataclass(frozen=True)
class Thresholds:
    max_lag_s: float | None = None
    max_dead_letters: int | None = None
    min_coverage: float | None = None
    require_runner: bool = False

    def passed(self, st: PipelineStatus) -> list[str]:
        """What is wrong with the pipeline, one phrase each (empty: all well)."""
        out = []
        if self.max_lag_s is not None and st.oldest_age_s > self.max_lag_s:
            out.append(f"lag {st.oldest_age_s:.1f}s over --max-lag-s {self.max_lag_s:g}")
        n_dead = sum(st.dead_letters.values())
        if self.max_dead_letters is not None and n_dead > self.max_dead_letters:
            out.append(f"{n_dead} dead letters over --max-dead-letters {self.max_dead_letters}")
        cov = st.coverage  # None: no row has text, so nothing is missing
        if self.min_coverage is not None and cov is not None and cov < self.min_coverage:
            out.append(f"coverage {cov:.4f} under --min-coverage {self.min_coverage:g}")
        if self.require_runner and not st.runners:
            out.append("no runner seen in the last 30 s (--require-runner)")
        return out
