"""quota: the syncer under a provider `rpm`, then a `tpm`, that the fake server enforces with
429s over the same sliding 60 s window.

The figures come from the fake server's request log. A sliding window lets the first minute
burst to the whole quota at once, so only a run past the first window shows whether the
syncer refills it as old requests age out: the full run drains ~1.5 windows of rows and
judges every 60 s window that fits between the first and the last request served; the quick
run stops the syncer after the first burst and judges that window only (indicative).
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
from dataclasses import replace
from typing import Any

import numpy as np

from bench import backlog
from bench.harness import Harness, Pipeline
from bench.proc import Watched
from bench.report import Result
from bench.texts import texts
from syncer.providers.tokens import estimate_tokens

WINDOW_S = 60.0
RPM = 600
TPM = 300_000  # the syncer's estimated tokens, and the fake server's own count
LATENCY_MS = 50.0
BASE = Pipeline(dimensions=256, batch_size=2, max_concurrency=8)  # ~320 requests/s at most
WINDOWS = 1.5  # rows for this many windows of quota
QUICK_RUN_S = 7.0  # launch → SIGTERM in the quick run: start-up and the first burst
STOP_GRACE_S = 3.0  # SIGTERM → SIGKILL in the quick run
STEP_S = 0.05  # window starts are tried every STEP_S seconds

_seeds = itertools.count(5000)


async def run(h: Harness, quick: bool) -> Result:
    result = Result("quota")
    for kind in ("rpm", "tpm"):
        await _limited(h, quick, kind, result)
    return result


async def _limited(h: Harness, quick: bool, kind: str, result: Result) -> None:
    seed = next(_seeds)
    limit = RPM if kind == "rpm" else TPM
    if kind == "rpm":
        rows = int(WINDOWS * RPM * BASE.batch_size)
    else:  # as many rows as the syncer's estimate lets through in WINDOWS windows
        per_row = float(np.mean([estimate_tokens(t) for t in texts(1000, seed)]))
        rows = int(WINDOWS * TPM / per_row)
    b = await backlog.prepare(h, rows, replace(BASE, **{kind: limit}), seed)
    h.set_latency(LATENCY_MS)
    h.fake.control(**{kind: limit})
    proc = Watched(backlog.cli_command(h, b), h.env(), h.workdir / f"quota-{kind}.log").start()
    try:
        if quick:
            await asyncio.sleep(QUICK_RUN_S)
            proc.terminate()
        timeout_s = STOP_GRACE_S if quick else backlog.DRAIN_TIMEOUT_S
        usage = await asyncio.to_thread(proc.wait, timeout_s)  # killed past the timeout
        if quick:
            stop_s = usage.wall_s - QUICK_RUN_S
            note = "killed" if stop_s >= STOP_GRACE_S else "exited"
            note += " (rows still queued, the limiter holding the next requests back)"
            result.add(f"{kind}: SIGTERM → exit", stop_s, "s", note)
        if not quick and usage.returncode != 0:
            raise RuntimeError(f"syncer exited with {usage.returncode}:\n{proc.log_tail()}")
        conn = await h.connect(b.url)
        try:
            embedded = await conn.fetchval(
                "SELECT count(*) FROM docs WHERE embedding_hash IS NOT NULL"
            )
        finally:
            await conn.close()
    finally:
        h.drop_database(b.url)
    log = h.fake.requests()
    _judge(result, kind, limit, log, quick)
    if not quick:
        result.at_least(f"{kind}: rows embedded", embedded, "rows", rows, f"of {rows:,}")


def _judge(result: Result, kind: str, limit: int, log: list[dict[str, Any]], quick: bool) -> None:
    served = [e for e in log if e["status"] == 200 and e["fault"] is None]
    if not served:
        raise RuntimeError(f"quota {kind}: no request was served")
    times = [e["t"] for e in served]
    weights = [1 if kind == "rpm" else e["tokens"] for e in served]
    use = _window_use(times, weights)
    span = times[-1] - times[0]
    if quick or span <= WINDOW_S:
        note = "first window only: indicative (the full run judges the refill)"
    else:
        note = (
            f"mean of the 60 s windows starting in the first {span - WINDOW_S:.1f} s, "
            f"min {100 * min(use) / limit:.1f} %"
        )
    unit = "requests" if kind == "rpm" else "tokens (fake's count)"
    mean_use = 100 * float(np.mean(use)) / limit
    result.at_least(f"{kind}: share of quota used", mean_use, "%", 95, f"{limit:,} {unit}; {note}")
    if kind == "tpm":
        estimate = sum(estimate_tokens(t) for e in served for t in e["inputs"])
        ratio = estimate / max(1, sum(weights))
        result.add(
            "tpm: syncer's estimate / fake's count",
            ratio,
            "x",
            "reserved up front, then settled to the provider's usage count",
        )
    limited = sum(1 for e in log if e["status"] == 429)
    note = f"{limited} of {len(log)} requests; served over {span:.1f} s"
    result.at_most(f"{kind}: requests answered 429", 100 * limited / len(log), "%", 1, note)


def _window_use(times: list[float], weights: list[int]) -> list[float]:
    """What each 60 s window [s, s + 60) holds, for every start s from the first request
    served while the window ends before the last one (steps of STEP_S); only the first
    window if the run was shorter than that."""
    first, last = times[0], times[-1]
    cumulative = np.concatenate([[0], np.cumsum(weights)])
    starts = np.arange(first, max(first, last - WINDOW_S) + STEP_S / 2, STEP_S)
    sums = []
    for s in starts:
        lo = bisect.bisect_left(times, s)
        hi = bisect.bisect_left(times, s + WINDOW_S)
        sums.append(float(cumulative[hi] - cumulative[lo]))
    return sums
