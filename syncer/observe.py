"""Typed events and their subscribers: metrics, logs and in-process stats.

Business code emits an event at each stage boundary (`events.emit(Claimed(...))`) and holds
no metric or log call of its own for it. Prometheus samples, the in-process counters (for
`demo` and the `--exit-when-idle` summary) and the log lines are subscribers; the demo and
the benchmark subscribe handlers of their own. A new metric is a new line in a handler.
"""

from __future__ import annotations

import logging
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import orjson
from prometheus_client import Counter, Gauge, Histogram

log = logging.getLogger("syncer")

# --- the events ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Claimed:
    pipeline: str
    n: int


@dataclass(frozen=True, slots=True)
class InFlightChanged:
    pipeline: str
    n: int  # items claimed and not yet finished


@dataclass(frozen=True, slots=True)
class ApiRequest:
    provider: str
    pipeline: str
    n_inputs: int
    seconds: float
    result: str  # "ok", or the error class


@dataclass(frozen=True, slots=True)
class Finished:
    pipeline: str
    outcome: str  # embedded, unchanged, cleared, stale
    n: int


@dataclass(frozen=True, slots=True)
class Failed:
    pipeline: str
    outcome: str  # retried, dead_lettered
    n: int
    error: str


Event = Claimed | InFlightChanged | ApiRequest | Finished | Failed
Handler = Callable[[Event], None]


class Events:
    """The bus: every event goes to every subscriber, in order, on the caller's task."""

    def __init__(self) -> None:
        self.stats_handler = StatsHandler()
        self.handlers: list[Handler] = [prometheus, self.stats_handler, log_handler]

    @property
    def stats(self) -> dict[str, Stats]:
        return self.stats_handler.stats

    def subscribe(self, handler: Handler) -> None:
        self.handlers.append(handler)

    def emit(self, event: Event) -> None:
        for handler in self.handlers:
            handler(event)


# --- Prometheus ---------------------------------------------------------------------------

ROWS = Counter("syncer_rows_total", "Queue items finished, by outcome", ["pipeline", "outcome"])
API_REQUESTS = Counter(
    "syncer_api_requests_total", "Embedding requests, by result", ["provider", "result"]
)
API_INPUTS = Counter("syncer_api_inputs_total", "Texts sent to embedding APIs", ["provider"])
API_SECONDS = Histogram(
    "syncer_api_request_seconds",
    "Embedding request duration",
    ["provider"],
    buckets=(0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30, 60),
)
IN_FLIGHT = Gauge("syncer_in_flight_items", "Claimed items not yet finished", ["pipeline"])
CLAIMS = Counter("syncer_claims_total", "Claim queries", ["pipeline"])


def prometheus(event: Event) -> None:
    match event:
        case Claimed(pipeline):
            CLAIMS.labels(pipeline).inc()
        case InFlightChanged(pipeline, n):
            IN_FLIGHT.labels(pipeline).set(n)
        case ApiRequest(provider, _, n_inputs, seconds, result):
            API_REQUESTS.labels(provider, result).inc()
            API_SECONDS.labels(provider).observe(seconds)
            if result == "ok":
                API_INPUTS.labels(provider).inc(n_inputs)
        case Finished(pipeline, outcome, n) | Failed(pipeline, outcome, n) if n:
            ROWS.labels(pipeline, outcome).inc(n)


# --- in-process stats ---------------------------------------------------------------------


@dataclass
class Stats:
    claimed: int = 0
    embedded: int = 0  # vectors written from an API answer
    unchanged: int = 0  # API calls saved: the stored vector already matches the text
    cleared: int = 0  # NULL/empty text or deleted row
    stale: int = 0  # text changed while in flight: not written, a newer item follows
    retried: int = 0
    dead_lettered: int = 0
    api_calls: int = 0
    api_inputs: int = 0
    api_errors: int = 0


class StatsHandler:
    def __init__(self) -> None:
        self.stats: dict[str, Stats] = defaultdict(Stats)

    def __call__(self, event: Event) -> None:
        match event:
            case Claimed(pipeline, n):
                self.stats[pipeline].claimed += n
            case ApiRequest(_, pipeline, n_inputs, _, result):
                s = self.stats[pipeline]
                s.api_calls += 1
                if result == "ok":
                    s.api_inputs += n_inputs
                else:
                    s.api_errors += 1
            case Finished(pipeline, outcome, n) | Failed(pipeline, outcome, n) if n:
                s = self.stats[pipeline]
                setattr(s, outcome, getattr(s, outcome) + n)


# --- logs ---------------------------------------------------------------------------------


def log_handler(event: Event) -> None:
    if isinstance(event, Failed):
        level = logging.ERROR if event.outcome == "dead_lettered" else logging.WARNING
        log.log(
            level,
            "%s items %s",
            event.n,
            event.outcome,
            extra={"pipeline": event.pipeline, "error": event.error},
        )


class JsonFormatter(logging.Formatter):
    _STD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "msg": record.getMessage(),
        }
        doc.update({k: v for k, v in record.__dict__.items() if k not in self._STD})
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(doc, default=str).decode()


def setup_logging(level: str = "info", json_logs: bool = True) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter() if json_logs else logging.Formatter("%(levelname)s %(message)s")
    )
    root = logging.getLogger("syncer")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
    # asyncpg's pool warns, with a traceback, each time it fails to reopen a connection
    # while the database is away; syncer says so once per outage (syncer.db) instead.
    lib = logging.getLogger("asyncpg")
    lib.handlers[:] = [handler]
    lib.setLevel(logging.DEBUG if level.lower() == "debug" else logging.ERROR)
    lib.propagate = False
