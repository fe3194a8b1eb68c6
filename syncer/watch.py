"""`syncer status --watch`: a live view, refreshed every second, of each pipeline's rate, lag,
backlog and its ETA, and of its provider's API latency, 429s and breaker.

What the database knows comes from two cheap statements a frame (the sampler's queue gauges
and the runners; never the coverage scan). What only a runner knows (rows embedded, request
latency, 429s, breaker) comes from its /metrics when `[observe] listen` (or --metrics-url)
names one; without it the rate is the backlog's own drain and the API columns show "-".
"""

from __future__ import annotations

import asyncio
import math
import signal
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import aiohttp
import asyncpg
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console
from rich.live import Live
from rich.table import Table

from syncer.aio import wait_first
from syncer.config import Config
from syncer.sqlfiles import query

REFRESH_S = 1.0
RATE_SMOOTHING = 0.3  # the weight of the newest second in the rates (an EWMA)
METRICS_TIMEOUT_S = 0.8

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@dataclass
class Row:
    name: str
    provider: str
    paused: bool = False
    backlog: int = 0  # ready + leased + delayed
    leased: int = 0
    lag_s: float = 0.0
    dead_letters: int = 0
    runners: int = 0
    rate: float | None = None  # rows/s: embedded (from /metrics) or the backlog's drain
    eta_s: float | None = None
    p50_s: float | None = None
    p99_s: float | None = None
    rate_limited: int | None = None  # 429s since the runner started
    breaker_open: bool | None = None


@dataclass
class _Prev:
    at: float
    backlog: int
    finished: float | None
    buckets: list[tuple[float, float]] = field(default_factory=list)


class Watch:
    def __init__(self, cfg: Config, conn: asyncpg.Connection, metrics_url: str | None) -> None:
        self.cfg = cfg
        self.conn = conn
        self.metrics_url = metrics_url
        self.providers = {p.name: p.provider for p in cfg.pipelines}
        self.metrics_error = ""
        self._prev: dict[str, _Prev] = {}
        self._rates: dict[str, float] = {}
        self._session: aiohttp.ClientSession | None = None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def frame(self) -> list[Row]:
        """One refresh: the database's figures, the runner's if it serves /metrics."""
        gauges = {r["name"]: r for r in await self.conn.fetch(query("queue_gauges"))}
        meta = {r["name"]: r for r in await self.conn.fetch(query("status_pipelines"))}
        samples = await self._scrape()
        now = time.monotonic()
        rows = []
        for name, provider in self.providers.items():
            g, m = gauges.get(name), meta.get(name)
            row = Row(name, provider)
            if g is not None:
                row.paused = bool(g["paused"])
                row.leased = int(g["leased"])
                row.backlog = int(g["ready"]) + row.leased + int(g["delayed"])
                row.lag_s = float(g["oldest_s"])
                row.dead_letters = int(g["dead_letters"])
            row.runners = len(m["runners"]) if m is not None else 0
            self._figures(row, samples, now)
            rows.append(row)
        return rows

    def _figures(self, row: Row, samples: Samples | None, now: float) -> None:
        finished = buckets = None
        if samples is not None:
            finished = _sum(samples, "syncer_rows_total", pipeline=row.name)
            buckets = _buckets(samples, "syncer_api_request_seconds", provider=row.provider)
            row.rate_limited = int(
                _sum(samples, "syncer_rate_limited_total", provider=row.provider)
            )
            row.breaker_open = _sum(samples, "syncer_breaker_open", provider=row.provider) > 0
        prev = self._prev.get(row.name)
        self._prev[row.name] = _Prev(now, row.backlog, finished, buckets or [])
        if prev is None or now <= prev.at:
            return
        dt = now - prev.at
        if finished is not None and prev.finished is not None:
            rate = max(0.0, finished - prev.finished) / dt
        else:  # no runner to ask: what left the backlog (net of what arrived)
            rate = max(0.0, prev.backlog - row.backlog) / dt
        old = self._rates.get(row.name)
        row.rate = rate if old is None else RATE_SMOOTHING * rate + (1 - RATE_SMOOTHING) * old
        self._rates[row.name] = row.rate
        if row.backlog == 0:
            row.eta_s = 0.0
        elif row.rate > 0:
            row.eta_s = row.backlog / row.rate
        if buckets:  # latency over the last second's requests, else since the runner started
            recent = [(le, n - p) for (le, n), (_, p) in zip(buckets, prev.buckets, strict=False)]
            if len(recent) != len(buckets) or not recent or recent[-1][1] <= 0:
                recent = buckets
            row.p50_s, row.p99_s = _quantile(recent, 0.5), _quantile(recent, 0.99)

    async def _scrape(self) -> Samples | None:
        if self.metrics_url is None:
            return None
        if self._session is None:
            timeout = aiohttp.ClientTimeout(total=METRICS_TIMEOUT_S)
            self._session = aiohttp.ClientSession(timeout=timeout)
        try:
            async with self._session.get(self.metrics_url) as resp:
                resp.raise_for_status()
                body = await resp.text()
        except (aiohttp.ClientError, TimeoutError) as err:
            self.metrics_error = f"{self.metrics_url}: {type(err).__name__} {err}".strip()
            return None
        self.metrics_error = ""
        out: Samples = {}
        for family in text_string_to_metric_families(body):
            for s in family.samples:
                key = (s.name, tuple(sorted(s.labels.items())))
                out[key] = out.get(key, 0.0) + float(s.value)
        return out


def _matching(samples: Samples, name: str, **labels: str) -> Iterable[tuple[dict[str, str], float]]:
    for (n, lbls), value in samples.items():
        d = dict(lbls)
        if n == name and all(d.get(k) == v for k, v in labels.items()):
            yield d, value


def _sum(samples: Samples, name: str, **labels: str) -> float:
    return sum(v for _, v in _matching(samples, name, **labels))


def _buckets(samples: Samples, name: str, **labels: str) -> list[tuple[float, float]]:
    """The histogram's cumulative buckets (upper bound, count), summed over other labels."""
    by_le: dict[float, float] = {}
    for d, value in _matching(samples, name + "_bucket", **labels):
        le = float(d["le"])
        by_le[le] = by_le.get(le, 0.0) + value
    return sorted(by_le.items())


def _quantile(buckets: list[tuple[float, float]], q: float) -> float | None:
    """Prometheus' histogram_quantile: linear within the bucket that holds the rank."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower_le, lower_n = 0.0, 0.0
    for le, n in buckets:
        if n >= rank:
            if math.isinf(le):
                return lower_le
            if n == lower_n:
                return le
            return lower_le + (le - lower_le) * (rank - lower_n) / (n - lower_n)
        lower_le, lower_n = le, n
    return lower_le


def _num(v: float | None, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def _duration(s: float | None) -> str:
    if s is None:
        return "-"
    s = round(s)
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def render(rows: list[Row], note: str = "") -> Table:
    table = Table(title="syncer status --watch", caption=note or None, title_justify="left")
    for col in ("pipeline", "state", "backlog", "rows/s", "ETA", "lag"):
        table.add_column(col, justify="left" if col == "pipeline" else "right")
    for col in ("p50 ms", "p99 ms", "429s", "breaker", "dead", "runners"):
        table.add_column(col, justify="right")
    for r in rows:
        breaker = "-" if r.breaker_open is None else ("OPEN" if r.breaker_open else "closed")
        table.add_row(
            r.name,
            "paused" if r.paused else "active",
            str(r.backlog),
            _num(r.rate, ".1f"),
            _duration(r.eta_s),
            _duration(r.lag_s),
            _num(None if r.p50_s is None else 1000 * r.p50_s, ".0f"),
            _num(None if r.p99_s is None else 1000 * r.p99_s, ".0f"),
            _num(r.rate_limited, "d"),
            breaker,
            str(r.dead_letters),
            str(r.runners),
        )
    return table


def metrics_url(cfg: Config, override: str | None) -> str | None:
    """The runner's /metrics: --metrics-url, else [observe] listen (0.0.0.0 as localhost)."""
    if override:
        return override
    listen = cfg.observe.listen
    if not listen:
        return None
    host, _, port = listen.rpartition(":")
    host = host.strip("[]")
    if host in ("", "0.0.0.0", "::"):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}/metrics"


async def watch(
    cfg: Config,
    conn: asyncpg.Connection,
    url: str | None,
    console: Console,
    frames: int | None = None,
    refresh_s: float = REFRESH_S,
    on_frame: Callable[[list[Row]], None] | None = None,
) -> int:
    """Until SIGINT or SIGTERM (or `frames` frames): returns how many were drawn. On a
    terminal the view redraws in place; otherwise each frame is printed after the last."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    w = Watch(cfg, conn, url)
    drawn = 0
    live = Live(console=console, auto_refresh=False) if console.is_terminal else None
    try:
        if live is not None:
            live.start()
        while not stop.is_set() and (frames is None or drawn < frames):
            rows = await w.frame()
            note = f"metrics: {w.metrics_error}" if w.metrics_error else ""
            note = note or ("" if url else "no [observe] listen: rates from the backlog")
            table = render(rows, note)
            if live is not None:
                live.update(table, refresh=True)
            else:
                console.print(table)
            drawn += 1
            if on_frame is not None:
                on_frame(rows)
            await wait_first(stop, timeout_s=refresh_s)
    finally:
        if live is not None:
            live.stop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        await w.close()
    return drawn
