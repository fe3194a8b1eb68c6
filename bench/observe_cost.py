"""observe_cost: what the exporter and JSON logs cost a drain, on against off.

"off": no HTTP server, log level warning (the lines a drain writes: none). "on": /metrics,
/healthz and /readyz served and /metrics scraped every second (Prometheus scrapes every
15 s by default: this is 15 times harder), JSON logs at info. Each arm drains a fresh
backlog through the real command; the arms alternate, and each figure is the mean.
"""

from __future__ import annotations

import socket
import threading
import urllib.request
from pathlib import Path

import numpy as np

from bench import backlog
from bench.harness import Harness
from bench.report import Result
from bench.throughput import API, _seeds


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Scraper(threading.Thread):
    """GET /metrics every `every_s` until stopped; counts the scrapes that answered."""

    def __init__(self, url: str, every_s: float = 1.0) -> None:
        super().__init__(daemon=True)
        self.url, self.every_s = url, every_s
        self.stopped = threading.Event()
        self.ok = 0

    def run(self) -> None:
        while not self.stopped.wait(self.every_s):
            try:
                with urllib.request.urlopen(self.url, timeout=2) as r:
                    r.read()
                self.ok += 1
            except OSError:
                pass  # not up yet, or gone


def _command(h: Harness, config: Path, on: bool, port: int) -> list[str]:
    if not on:
        return h.syncer_command(config, "run", "--exit-when-idle")
    return h.syncer_command(
        config,
        "--log-level",
        "info",
        "--log-format",
        "json",
        "run",
        "--exit-when-idle",
        "--listen",
        f"127.0.0.1:{port}",
    )


async def _drain(h: Harness, latency_ms: float, rows: int, on: bool) -> tuple[float, int]:
    b = await backlog.prepare(h, rows, API, next(_seeds))
    h.set_latency(latency_ms)
    port = _free_port()
    scraper = Scraper(f"http://127.0.0.1:{port}/metrics")
    if on:
        scraper.start()
    try:
        d = await backlog.drain(h, b, _command(h, b.config, on, port))
    finally:
        scraper.stopped.set()
        h.drop_database(b.url)
    return d.steady_rows_s, scraper.ok


async def run(h: Harness, quick: bool) -> Result:
    result = Result("observe_cost")
    rows, rounds = 20_000, 1 if quick else 3  # a drain of some seconds: scraped many times
    for name, latency_ms in (("api_bound", 200.0), ("db_bound", 0.0)):
        rates: dict[bool, list[float]] = {False: [], True: []}
        scrapes = 0
        for _ in range(rounds):
            for on in (False, True):
                rate, ok = await _drain(h, latency_ms, rows, on)
                rates[on].append(rate)
                scrapes += ok
        off, on_ = float(np.mean(rates[False])), float(np.mean(rates[True]))
        note = f"{off:,.0f} -> {on_:,.0f} rows/s steady, {rounds} round(s), {scrapes} scrapes"
        result.at_most(
            f"{name}: throughput lost, metrics + JSON logs", 100 * (1 - on_ / off), "%", 3.0, note
        )
    return result
