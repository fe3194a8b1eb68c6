"""Metrics and logs, emitted at the stage boundaries and nowhere else.

Business code calls `events.<stage>(...)`; this module turns each event into
Prometheus samples, in-process counters (for `demo` and `--exit-when-idle` summaries)
and log lines.
"""

from __future__ import annotations

import logging
import sys
import time
from collections import defaultdict
from dataclasses import dataclass

import orjson
from prometheus_client import Counter, Gauge, Histogram

log = logging.getLogger("syncer")

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


class Events:
    """The one place where stage boundaries become metrics and logs."""

    def __init__(self) -> None:
        self.stats: dict[str, Stats] = defaultdict(Stats)

    def claimed(self, pipeline: str, n: int) -> None:
        CLAIMS.labels(pipeline).inc()
        self.stats[pipeline].claimed += n

    def in_flight(self, pipeline: str, n: int) -> None:
        IN_FLIGHT.labels(pipeline).set(n)

    def api_request(
        self, provider: str, pipeline: str, n_inputs: int, seconds: float, result: str
    ) -> None:
        API_REQUESTS.labels(provider, result).inc()
        API_SECONDS.labels(provider).observe(seconds)
        s = self.stats[pipeline]
        s.api_calls += 1
        if result == "ok":
            API_INPUTS.labels(provider).inc(n_inputs)
            s.api_inputs += n_inputs
        else:
            s.api_errors += 1

    def finished(self, pipeline: str, outcome: str, n: int) -> None:
        if n:
            ROWS.labels(pipeline, outcome).inc(n)
            s = self.stats[pipeline]
            setattr(s, outcome, getattr(s, outcome) + n)

    def failed(self, pipeline: str, outcome: str, n: int, error: str) -> None:
        self.finished(pipeline, outcome, n)
        level = logging.ERROR if outcome == "dead_lettered" else logging.WARNING
        log.log(level, "%s items %s", n, outcome, extra={"pipeline": pipeline, "error": error})


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
