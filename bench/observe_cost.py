"""observe_cost: what the exporter, JSON logs, tracing and asyncio's debug mode cost a
drain, each against off.

"off": no HTTP server, log level warning (the lines a drain writes: none). "on": /metrics,
/healthz and /readyz served and /metrics scraped every second (Prometheus scrapes every
15 s by default: this is 15 times harder), JSON logs at info. "otel": "on" plus OpenTelemetry
spans and metrics exported over OTLP/gRPC to a receiver in this process. "debug": "off" under
PYTHONASYNCIODEBUG=1. Each arm drains a fresh backlog through the real command; the arms
alternate, and each figure is the mean.
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
from syncer.testing.otlp import OtlpReceiver


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


ARMS = ("off", "on", "otel", "debug")


def _command(h: Harness, config: Path, arm: str, port: int) -> list[str]:
    if arm == "debug":
        return ["env", "PYTHONASYNCIODEBUG=1", *h.syncer_command(config, "run", "--exit-when-idle")]
    if arm == "off":
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


async def _drain(
    h: Harness, latency_ms: float, rows: int, arm: str, receiver: OtlpReceiver
) -> tuple[float, int]:
    b = await backlog.prepare(h, rows, API, next(_seeds))
    h.set_latency(latency_ms)
    port = _free_port()
    scraper = Scraper(f"http://127.0.0.1:{port}/metrics")
    if arm == "otel":
        otel = f'\n[observe.otel]\nendpoint = "{receiver.endpoint}"\n'
        b.config.write_text(b.config.read_text() + otel)
    if arm in ("on", "otel"):
        scraper.start()
    try:
        d = await backlog.drain(h, b, _command(h, b.config, arm, port))
    finally:
        scraper.stopped.set()
        h.drop_database(b.url)
    return d.steady_rows_s, scraper.ok


async def run(h: Harness, quick: bool) -> Result:
    result = Result("observe_cost")
    rows, rounds = 20_000, 1 if quick else 3  # a drain of some seconds: scraped many times
    receiver = OtlpReceiver()
    try:
        for name, latency_ms in (("api_bound", 200.0), ("db_bound", 0.0)):
            rates: dict[str, list[float]] = {arm: [] for arm in ARMS}
            scrapes, spans = 0, len(receiver.spans)
            for _ in range(rounds):
                for arm in ARMS:
                    rate, ok = await _drain(h, latency_ms, rows, arm, receiver)
                    rates[arm].append(rate)
                    scrapes += ok
            mean = {arm: float(np.mean(r)) for arm, r in rates.items()}

            def lost(arm: str, mean: dict[str, float] = mean) -> float:
                return 100 * (1 - mean[arm] / mean["off"])

            def note(arm: str, mean: dict[str, float] = mean) -> str:
                return f"{mean['off']:,.0f} -> {mean[arm]:,.0f} rows/s steady, {rounds} round(s)"

            result.at_most(
                f"{name}: throughput lost, metrics + JSON logs",
                lost("on"),
                "%",
                3.0,
                f"{note('on')}, {scrapes} scrapes",
            )
            spans = len(receiver.spans) - spans
            result.add(
                f"{name}: throughput lost, + OpenTelemetry",
                lost("otel"),
                "%",
                f"{note('otel')}, {spans:,} spans exported",
            )
            result.add(
                f"{name}: throughput lost, asyncio debug mode", lost("debug"), "%", note("debug")
            )
    finally:
        receiver.stop()
    return result
