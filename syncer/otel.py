"""OpenTelemetry: spans for claim, fetch, embed and write, and the Prometheus metrics over
OTLP (`pip install 'syncer[otel]'`, `[observe.otel] endpoint`).

One more subscriber of the events (syncer.observe), imported only when an endpoint is set.
Each span is made when its stage's event arrives, from the duration the event carries, so
the business code holds no tracing call. A batch's trace id is the one its log lines carry
(observe.new_trace_id is 128 bits): the claim's span is the root of that trace, and fetch,
embed and write are its children. A write committing several batches ends one span in each
of their traces.

Metrics keep the Prometheus names, without the `_total` of counters (an OTLP-to-Prometheus
exporter adds it back); a gauge sampled by the monitor is set where Prometheus's is.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

from opentelemetry import trace
from opentelemetry.metrics import Counter, Histogram, Meter
from opentelemetry.metrics import _Gauge as Gauge
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, Status, StatusCode

from syncer import observe
from syncer.config import OtelConfig
from syncer.observe import (
    ApiRequest,
    Claimed,
    CoverageSampled,
    Event,
    Failed,
    Fetched,
    Finished,
    InFlightChanged,
    LoopLag,
    ProcessSampled,
    QueueSampled,
    RateLimitWaited,
    TokensUsed,
    Written,
)

MAX_TRACES = 16_384  # claims whose later stages may still come (far more than in flight)
# One export's time, retries included: bounds too what a stop waits for a collector that is
# away (the spans and points it could not take are dropped, and said so in the log).
EXPORT_TIMEOUT_S = 3.0


class _BatchTraceIds(RandomIdGenerator):
    """A root span takes the batch's trace id, so that OTel and the logs agree."""

    def generate_trace_id(self) -> int:
        trace_id = observe.current_trace()
        return int(trace_id, 16) if trace_id else super().generate_trace_id()


def _exporters(cfg: OtelConfig) -> tuple[SpanExporter, MetricReader]:
    assert cfg.endpoint is not None
    if cfg.protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        insecure = cfg.endpoint.startswith("http://")
        kw: dict[str, Any] = {"insecure": insecure, "timeout": EXPORT_TIMEOUT_S}
        spans: SpanExporter = OTLPSpanExporter(endpoint=cfg.endpoint, **kw)
        metrics: Any = OTLPMetricExporter(endpoint=cfg.endpoint, **kw)
    else:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
            OTLPMetricExporter as HttpMetricExporter,
        )
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
            OTLPSpanExporter as HttpSpanExporter,
        )

        base = cfg.endpoint.rstrip("/")
        spans = HttpSpanExporter(endpoint=f"{base}/v1/traces", timeout=EXPORT_TIMEOUT_S)
        metrics = HttpMetricExporter(endpoint=f"{base}/v1/metrics", timeout=EXPORT_TIMEOUT_S)
    reader = PeriodicExportingMetricReader(
        metrics, export_interval_millis=int(cfg.export_interval_s * 1000)
    )
    return spans, reader


class OtelHandler:
    """The subscriber. `span_exporter` and `metric_reader` replace the OTLP ones (tests use
    the SDK's in-memory exporters)."""

    def __init__(
        self,
        cfg: OtelConfig,
        span_exporter: SpanExporter | None = None,
        metric_reader: MetricReader | None = None,
    ) -> None:
        if span_exporter is None or metric_reader is None:
            default_spans, default_reader = _exporters(cfg)
            span_exporter = span_exporter or default_spans
            metric_reader = metric_reader or default_reader
        resource = Resource.create({"service.name": cfg.service_name})
        self.tracer_provider = TracerProvider(resource=resource, id_generator=_BatchTraceIds())
        self.tracer_provider.add_span_processor(BatchSpanProcessor(span_exporter))
        self.tracer = self.tracer_provider.get_tracer("syncer")
        self.meter_provider = MeterProvider(resource=resource, metric_readers=[metric_reader])
        self.metrics = _Metrics(self.meter_provider.get_meter("syncer"))
        self._claims: OrderedDict[str, SpanContext] = OrderedDict()

    def __call__(self, event: Event) -> None:
        self.metrics(event)
        match event:
            case Claimed(pipeline, n, _, seconds):
                span = self._span("claim", seconds, {"syncer.pipeline": pipeline, "syncer.n": n})
                if span is not None:
                    self._claims[observe.current_trace()] = span.get_span_context()
                    while len(self._claims) > MAX_TRACES:
                        self._claims.popitem(last=False)
            case Fetched(pipeline, n, seconds):
                self._span("fetch", seconds, {"syncer.pipeline": pipeline, "syncer.n": n})
            case ApiRequest(provider, pipeline, n_inputs, seconds, result):
                attrs: dict[str, str | int] = {"syncer.pipeline": pipeline, "syncer.n": n_inputs}
                attrs.update({"syncer.provider": provider, "syncer.result": result})
                self._span("embed", seconds, attrs, SpanKind.CLIENT, ok=result == "ok")
            case Written(pipeline, n, seconds, _, traces):
                attrs = {"syncer.pipeline": pipeline, "syncer.n": n}
                for trace_id in traces:
                    self._span("write", seconds, attrs, trace_id=trace_id)
            case Failed(pipeline, outcome, n, error):
                attrs = {"syncer.pipeline": pipeline, "syncer.n": n}
                attrs["syncer.error"] = error
                self._span(outcome, 0.0, attrs, ok=False)

    def _span(
        self,
        name: str,
        seconds: float,
        attrs: Mapping[str, str | int],
        kind: SpanKind = SpanKind.INTERNAL,
        ok: bool = True,
        trace_id: str | None = None,
    ) -> trace.Span | None:
        """A span that ended now and lasted `seconds`, in the batch's trace (the current
        one unless named); None outside any batch."""
        trace_id = trace_id or observe.current_trace()
        if not trace_id:
            return None
        claim = self._claims.get(trace_id)
        parent = trace.set_span_in_context(NonRecordingSpan(claim)) if claim else None
        end = time.time_ns()
        # A root span (a claim, or a stage whose claim was forgotten) takes this trace id.
        token = observe.TRACE.set((trace_id, "")) if claim is None else None
        try:
            span = self.tracer.start_span(
                name,
                context=parent,
                kind=kind,
                attributes=attrs,
                start_time=end - int(seconds * 1e9),
            )
        finally:
            if token is not None:
                observe.TRACE.reset(token)
        if not ok:
            span.set_status(Status(StatusCode.ERROR))
        span.end(end_time=end)
        return span

    def shutdown(self) -> None:
        """Export what is left, spans and metrics side by side (each within an export's
        timeout)."""
        spans = threading.Thread(target=self.tracer_provider.shutdown, daemon=True)
        spans.start()
        self.meter_provider.shutdown(timeout_millis=EXPORT_TIMEOUT_S * 1000)
        spans.join(EXPORT_TIMEOUT_S * 2)


class _Metrics:
    """The Prometheus metrics (syncer.observe), fed from the same events."""

    def __init__(self, meter: Meter) -> None:
        o = observe

        def doc(metric: Any) -> str:
            return str(metric.describe()[0].documentation)

        def counter(like: Any) -> Counter:  # Prometheus's name without its _total
            return meter.create_counter(like.describe()[0].name, "1", doc(like))

        def hist(like: Any, buckets: tuple[float, ...]) -> Histogram:
            name = like.describe()[0].name
            advisory = [float(b) for b in buckets]
            return meter.create_histogram(
                name, "s", doc(like), explicit_bucket_boundaries_advisory=advisory
            )

        def gauge(like: Any, unit: str = "1") -> Gauge:
            return meter.create_gauge(like.describe()[0].name, unit, doc(like))

        self.rows = counter(o.ROWS)
        self.requests = counter(o.API_REQUESTS)
        self.inputs = counter(o.API_INPUTS)
        self.tokens = counter(o.API_TOKENS)
        self.rate_limited = counter(o.RATE_LIMITED)
        self.written = counter(o.VECTORS_WRITTEN)
        self.claims = counter(o.CLAIMS)
        self.api_s = hist(o.API_SECONDS, o.API_BUCKETS)
        self.wait_s = hist(o.RATE_LIMIT_WAIT, o.WAIT_BUCKETS)
        self.write_s = hist(o.WRITE_SECONDS, o.WRITE_BUCKETS)
        self.c2v_s = hist(o.CHANGE_TO_VECTOR, o.CHANGE_TO_VECTOR_BUCKETS)
        self.depth = gauge(o.QUEUE_DEPTH)
        self.oldest = gauge(o.QUEUE_OLDEST, "s")
        self.dead = gauge(o.DEAD_LETTERS)
        self.paused = gauge(o.PAUSED)
        self.coverage = gauge(o.COVERAGE)
        self.pool = gauge(o.POOL)
        self.breaker = gauge(o.BREAKER_OPEN)
        self.slot_lag = gauge(o.SLOT_LAG, "By")
        self.loop_lag = gauge(o.LOOP_LAG, "s")
        self.in_flight = gauge(o.IN_FLIGHT)

    def __call__(self, event: Event) -> None:
        match event:
            case QueueSampled(pipeline, ready, leased, delayed, oldest_s, dead, paused):
                for state, n in (("ready", ready), ("leased", leased), ("delayed", delayed)):
                    self.depth.set(n, {"pipeline": pipeline, "state": state})
                at = {"pipeline": pipeline}
                self.oldest.set(oldest_s, at)
                self.dead.set(dead, at)
                self.paused.set(int(paused), at)
            case ProcessSampled(in_use, idle, breakers, slot_lag):
                self.pool.set(in_use, {"state": "in_use"})
                self.pool.set(idle, {"state": "idle"})
                for provider, is_open in breakers:
                    self.breaker.set(int(is_open), {"provider": provider})
                if slot_lag is not None:
                    self.slot_lag.set(slot_lag)
            case CoverageSampled(pipeline, ratio):
                self.coverage.set(ratio, {"pipeline": pipeline})
            case Written(pipeline, n, seconds, ages_s):
                at = {"pipeline": pipeline}
                self.write_s.record(seconds, at)
                self.written.add(n, at)
                for age_s in ages_s:
                    self.c2v_s.record(age_s, at)
            case RateLimitWaited(provider, seconds):
                self.wait_s.record(seconds, {"provider": provider})
            case TokensUsed(provider, n):
                self.tokens.add(n, {"provider": provider})
            case LoopLag(seconds):
                self.loop_lag.set(seconds)
            case Claimed(pipeline):
                self.claims.add(1, {"pipeline": pipeline})
            case InFlightChanged(pipeline, n):
                self.in_flight.set(n, {"pipeline": pipeline})
            case ApiRequest(provider, _, n_inputs, seconds, result):
                self.requests.add(1, {"provider": provider, "result": result})
                self.api_s.record(seconds, {"provider": provider})
                if result == "ok":
                    self.inputs.add(n_inputs, {"provider": provider})
                elif result == "rate_limited":
                    self.rate_limited.add(1, {"provider": provider})
            case Finished(pipeline, outcome, n) | Failed(pipeline, outcome, n) if n:
                self.rows.add(n, {"pipeline": pipeline, "outcome": outcome})
