"""Typed events and their subscribers: metrics, logs and in-process stats.

Business code emits an event at each stage boundary (`events.emit(Claimed(...))`) and holds
no metric or log call of its own for it. Prometheus samples, the in-process counters (for
`demo` and the `--exit-when-idle` summary) and the log lines are subscribers; the demo and
the benchmark subscribe handlers of their own. A new metric is a new line in a handler.
"""

from __future__ import annotations

import contextvars
import logging
import secrets
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import orjson
from prometheus_client import Counter, Gauge, Histogram

log = logging.getLogger("syncer")

# --- the events ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Claimed:
    pipeline: str
    n: int
    key: str | None = None  # the item's, when one was claimed
    seconds: float = 0.0  # the claim query's


@dataclass(frozen=True, slots=True)
class Fetched:
    """The claimed keys' rows read from the source (their texts, hashes, stored hashes)."""

    pipeline: str
    n: int
    seconds: float


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
    key: str | None = None  # the input's, when the request held one


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


@dataclass(frozen=True, slots=True)
class Written:
    """One write transaction committed: `n` vectors; `ages_s`, each item's time since it
    was queued (the change-to-vector latency)."""

    pipeline: str
    n: int
    seconds: float
    ages_s: tuple[float, ...] = ()
    traces: tuple[str, ...] = ()  # the trace ids of the batches the transaction wrote


@dataclass(frozen=True, slots=True)
class RateLimitWaited:
    provider: str
    seconds: float  # how long a request waited for its turn under the limits


@dataclass(frozen=True, slots=True)
class TokensUsed:
    provider: str
    n: int  # the provider's own count


@dataclass(frozen=True, slots=True)
class QueueSampled:
    """One pipeline's queue, as the sampler's periodic query found it."""

    pipeline: str
    ready: int
    leased: int
    delayed: int
    oldest_s: float  # age of the oldest ready item; 0 when none is ready
    dead_letters: int
    paused: bool = False


@dataclass(frozen=True, slots=True)
class CoverageSampled:
    """Rows with text that have their current vector, as a share (status.coverage's way)."""

    pipeline: str
    ratio: float


@dataclass(frozen=True, slots=True)
class ProcessSampled:
    """The process's own state, sampled with the queue: pool, breakers, slot lag."""

    pool_in_use: int
    pool_idle: int
    breakers_open: tuple[tuple[str, bool], ...] = ()
    slot_lag_bytes: int | None = None


@dataclass(frozen=True, slots=True)
class LoopLag:
    seconds: float


Event = (
    Claimed
    | Fetched
    | InFlightChanged
    | ApiRequest
    | Finished
    | Failed
    | Written
    | RateLimitWaited
    | TokensUsed
    | QueueSampled
    | ProcessSampled
    | CoverageSampled
    | LoopLag
)
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

API_BUCKETS = (0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30, 60)
WAIT_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.5, 1, 5, 15, 60)
WRITE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10)
CHANGE_TO_VECTOR_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)

ROWS = Counter("syncer_rows_total", "Queue items finished, by outcome", ["pipeline", "outcome"])
API_REQUESTS = Counter(
    "syncer_api_requests_total", "Embedding requests, by result", ["provider", "result"]
)
API_INPUTS = Counter("syncer_api_inputs_total", "Texts sent to embedding APIs", ["provider"])
API_SECONDS = Histogram(
    "syncer_api_request_seconds",
    "Embedding request duration",
    ["provider"],
    buckets=API_BUCKETS,
)
API_TOKENS = Counter("syncer_api_tokens_total", "Tokens the provider says it counted", ["provider"])
RATE_LIMITED = Counter("syncer_rate_limited_total", "429 answers", ["provider"])
RATE_LIMIT_WAIT = Histogram(
    "syncer_rate_limit_wait_seconds",
    "Time a request waited for its turn under the rate limits",
    ["provider"],
    buckets=WAIT_BUCKETS,
)
BREAKER_OPEN = Gauge("syncer_breaker_open", "1 while the provider's breaker is open", ["provider"])
WRITE_SECONDS = Histogram(
    "syncer_write_seconds",
    "Vector write transaction duration",
    ["pipeline"],
    buckets=WRITE_BUCKETS,
)
VECTORS_WRITTEN = Counter("syncer_vectors_written_total", "Vectors committed", ["pipeline"])
CHANGE_TO_VECTOR = Histogram(
    "syncer_change_to_vector_seconds",
    "From the queued change to the committed vector",
    ["pipeline"],
    buckets=CHANGE_TO_VECTOR_BUCKETS,
)
QUEUE_DEPTH = Gauge("syncer_queue_depth", "Queue items by state", ["pipeline", "state"])
QUEUE_OLDEST = Gauge("syncer_queue_oldest_seconds", "Age of the oldest ready item", ["pipeline"])
DEAD_LETTERS = Gauge("syncer_dead_letters", "Items in the dead-letter table", ["pipeline"])
PAUSED = Gauge("syncer_pipeline_paused", "1 while the pipeline is paused", ["pipeline"])
POOL = Gauge("syncer_db_pool_connections", "The worker's pool", ["state"])
LOOP_LAG = Gauge("syncer_event_loop_lag_seconds", "How late the event loop ran a timer")
SLOT_LAG = Gauge("syncer_slot_lag_bytes", "WAL the logical slot has not confirmed yet")
IN_FLIGHT = Gauge("syncer_in_flight_items", "Claimed items not yet finished", ["pipeline"])
CLAIMS = Counter("syncer_claims_total", "Claim queries", ["pipeline"])
COVERAGE = Gauge("syncer_coverage_ratio", "Rows with text whose vector is current", ["pipeline"])


def prometheus(event: Event) -> None:
    match event:
        case QueueSampled():
            _queue_sampled(event)
        case ProcessSampled():
            _process_sampled(event)
        case CoverageSampled(pipeline, ratio):
            COVERAGE.labels(pipeline).set(ratio)
        case Written(pipeline, n, seconds, ages_s):
            WRITE_SECONDS.labels(pipeline).observe(seconds)
            VECTORS_WRITTEN.labels(pipeline).inc(n)
            hist = CHANGE_TO_VECTOR.labels(pipeline)
            for age_s in ages_s:
                hist.observe(age_s)
        case RateLimitWaited(provider, seconds):
            RATE_LIMIT_WAIT.labels(provider).observe(seconds)
        case TokensUsed(provider, n):
            API_TOKENS.labels(provider).inc(n)
        case LoopLag(seconds):
            LOOP_LAG.set(seconds)
        case Claimed(pipeline):
            CLAIMS.labels(pipeline).inc()
        case InFlightChanged(pipeline, n):
            IN_FLIGHT.labels(pipeline).set(n)
        case ApiRequest(provider, _, n_inputs, seconds, result):
            API_REQUESTS.labels(provider, result).inc()
            API_SECONDS.labels(provider).observe(seconds)
            if result == "ok":
                API_INPUTS.labels(provider).inc(n_inputs)
            elif result == "rate_limited":
                RATE_LIMITED.labels(provider).inc()
        case Finished(pipeline, outcome, n) | Failed(pipeline, outcome, n) if n:
            ROWS.labels(pipeline, outcome).inc(n)


def _queue_sampled(e: QueueSampled) -> None:
    for state, n in (("ready", e.ready), ("leased", e.leased), ("delayed", e.delayed)):
        QUEUE_DEPTH.labels(e.pipeline, state).set(n)
    QUEUE_OLDEST.labels(e.pipeline).set(e.oldest_s)
    DEAD_LETTERS.labels(e.pipeline).set(e.dead_letters)
    PAUSED.labels(e.pipeline).set(int(e.paused))


def _process_sampled(e: ProcessSampled) -> None:
    POOL.labels("in_use").set(e.pool_in_use)
    POOL.labels("idle").set(e.pool_idle)
    for provider, is_open in e.breakers_open:
        BREAKER_OPEN.labels(provider).set(int(is_open))
    if e.slot_lag_bytes is not None:
        SLOT_LAG.set(e.slot_lag_bytes)


def declare(pipelines: Sequence[str], providers: Sequence[str]) -> None:
    """Every labelled series at zero from the start, so that rates and alerts see the first
    increase, and a scrape lists every metric of every pipeline before anything happens."""
    for p in pipelines:
        for outcome in ("embedded", "unchanged", "cleared", "stale", "retried", "dead_lettered"):
            ROWS.labels(p, outcome)
        for m in (VECTORS_WRITTEN, WRITE_SECONDS, CHANGE_TO_VECTOR, QUEUE_OLDEST, DEAD_LETTERS):
            m.labels(p)
        PAUSED.labels(p)
        for state in ("ready", "leased", "delayed"):
            QUEUE_DEPTH.labels(p, state)
    for name in providers:
        for m in (API_INPUTS, API_TOKENS, API_SECONDS, RATE_LIMITED, RATE_LIMIT_WAIT, BREAKER_OPEN):
            m.labels(name)
        API_REQUESTS.labels(name, "ok")
    for state in ("in_use", "idle"):
        POOL.labels(state)


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
        _log_failed(event)
    elif log.isEnabledFor(logging.DEBUG):
        _log_debug(event)


def _log_debug(event: Event) -> None:
    """A batch's path, one line per stage: claim, each API request, the write's commit."""
    match event:
        case Claimed(pipeline, n, key):
            extra: dict[str, object] = {"pipeline": pipeline, "n": n}
            if key is not None:
                extra["key"] = key
            log.debug("claimed", extra=extra)
        case ApiRequest(provider, pipeline, n_inputs, seconds, result, key):
            extra = {"pipeline": pipeline, "provider": provider, "n": n_inputs}
            extra.update(seconds=round(seconds, 4), result=result)
            if key is not None:
                extra["key"] = key
            log.debug("embed request", extra=extra)
        case Written(pipeline, n, seconds, _, traces):
            for trace_id in traces:  # one line per batch the transaction committed
                extra = {"pipeline": pipeline, "n": n, "seconds": round(seconds, 4)}
                log.debug("write committed", extra={**extra, "trace_id": trace_id})


def _log_failed(event: Failed) -> None:
    level = logging.ERROR if event.outcome == "dead_lettered" else logging.WARNING
    log.log(
        level,
        "%s items %s",
        event.n,
        event.outcome,
        extra={"pipeline": event.pipeline, "error": event.error},
    )


# --- trace ids ----------------------------------------------------------------------------

# The batch a line is about: set at the claim, carried by the jobs and write batches across
# the stage queues (each stage sets it again for the job it takes), read by every log line.
TRACE: contextvars.ContextVar[tuple[str, str]] = contextvars.ContextVar(
    "syncer_trace", default=("", "")
)  # (trace id, pipeline)


def new_trace_id() -> str:
    """128 bits, as W3C trace context has them: with OpenTelemetry on, it is the trace's id."""
    return secrets.token_hex(16)


def current_trace() -> str:
    return TRACE.get()[0]


@contextmanager
def tracing(trace_id: str, pipeline: str) -> Iterator[None]:
    """Lines logged inside (by this task, and tasks it starts) carry `trace_id` and, unless
    they name one, the pipeline."""
    token = TRACE.set((trace_id, pipeline))
    try:
        yield
    finally:
        TRACE.reset(token)


class TraceFilter(logging.Filter):
    """Adds the current trace id (and pipeline) to a record that names none itself."""

    def filter(self, record: logging.LogRecord) -> bool:
        trace_id, pipeline = TRACE.get()
        if trace_id:
            if not hasattr(record, "trace_id"):
                record.trace_id = trace_id
            if not hasattr(record, "pipeline"):
                record.pipeline = pipeline
        return True


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
    handler.addFilter(TraceFilter())
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
    # OpenTelemetry's exporters say when a collector cannot be reached, as JSON lines too.
    otel = logging.getLogger("opentelemetry")
    otel.handlers[:] = [handler]
    otel.setLevel(logging.WARNING)
    otel.propagate = False
