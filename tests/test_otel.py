"""OpenTelemetry (`syncer[otel]`): spans for claim, fetch, embed and write in each batch's
trace, whose id is the one its log lines carry; the Prometheus metrics over OTLP. In
process with the SDK's in-memory exporters, then for real: `syncer run` exporting over
OTLP/gRPC to a receiver of the collector's protocol."""

from __future__ import annotations

import json
import logging
import os
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from syncer import app
from syncer.config import load
from syncer.observe import Events, TraceFilter
from syncer.otel import OtelHandler
from syncer.testing.fake_embedder import BAD_INPUT_MARKER, FakeEmbedderProcess
from syncer.testing.otlp import OtlpReceiver
from tests.conftest import cli_env, syncer
from tests.test_pipeline import assert_synced, create_docs

N_ROWS = 200
POISON = 77
SECRETS = ("test-key-123", "oteltitle", "otelbody")


def fill(db: psycopg.Connection[Any]) -> None:
    create_docs(db)
    db.execute(
        "INSERT INTO docs SELECT g, 'oteltitle-' || g, 'otelbody-' || g, NULL"
        " FROM generate_series(1, %s) g",
        (N_ROWS,),
    )
    db.execute("UPDATE docs SET body = %s WHERE id = %s", (f"x {BAD_INPUT_MARKER}", POISON))


class Records(logging.Handler):
    """The syncer's log records, with the trace ids the TraceFilter gives them."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.addFilter(TraceFilter())
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture()
def records() -> Iterator[Records]:
    logger = logging.getLogger("syncer")
    handler, level = Records(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)


def metric_points(data: Any) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = defaultdict(list)
    for rm in data.resource_metrics:
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                out[m.name] += list(m.data.data_points)
    return out


async def test_spans_in_each_batch_trace_and_the_metrics(
    db: psycopg.Connection[Any],
    make_config: Any,
    fake: FakeEmbedderProcess,
    records: Records,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FAKE_API_KEY", "test-key-123")
    fill(db)
    config = make_config()
    assert syncer(config, "install").returncode == 0
    fake.control(seed=5, fail_rate=0.15, fail_kinds=["status503"])
    cfg = load(config, env=cli_env())
    spans, reader = InMemorySpanExporter(), InMemoryMetricReader()
    otel = OtelHandler(cfg.observe.otel, spans, reader)
    events = Events()
    events.subscribe(otel)
    result = await app.run(cfg, app.make_embedders(cfg, config), exit_when_idle=True, events=events)
    assert result.exit_code == 0, result.message
    metrics = metric_points(reader.get_metrics_data())
    otel.shutdown()
    assert assert_synced(db, f"SELECT title, body, embedding FROM docs WHERE id <> {POISON}")

    finished = spans.get_finished_spans()
    by_trace: dict[int, list[Any]] = defaultdict(list)
    for s in finished:
        by_trace[s.context.trace_id].append(s)
    claims = {t: [s for s in ss if s.name == "claim"] for t, ss in by_trace.items()}
    assert all(len(c) == 1 and c[0].parent is None for c in claims.values()), claims
    for trace_id, trace_spans in by_trace.items():
        claim = claims[trace_id][0]
        names = {s.name for s in trace_spans}
        assert {"claim", "fetch", "write"} <= names, names
        for s in trace_spans:
            assert s is claim or s.parent.span_id == claim.context.span_id, s.name
            assert s.start_time <= s.end_time
            for value in s.attributes.values():
                assert not any(x in str(value) for x in SECRETS), s.attributes
    embeds = [s for s in finished if s.name == "embed"]
    assert sum(s.attributes["syncer.n"] for s in embeds if s.status.is_ok) >= N_ROWS - 1
    failed = [s for s in embeds if not s.status.is_ok]
    assert failed and {s.attributes["syncer.result"] for s in failed} >= {"retryable"}
    assert any(s.name == "dead_lettered" for s in finished)

    # The trace ids of the logs are the OTel ones.
    logged = {r.trace_id for r in records.records if getattr(r, "trace_id", None)}
    assert logged == {format(t, "032x") for t in by_trace}

    # The metrics, as Prometheus has them.
    rows = {p.attributes["outcome"]: p.value for p in metrics["syncer_rows"]}
    assert rows["embedded"] == N_ROWS - 1 and rows["dead_lettered"] == 1, rows
    inputs = sum(p.value for p in metrics["syncer_api_inputs"])
    assert inputs >= N_ROWS - 1
    assert sum(p.value for p in metrics["syncer_vectors_written"]) == N_ROWS - 1
    (c2v,) = metrics["syncer_change_to_vector_seconds"]
    assert c2v.count == N_ROWS - 1 and list(c2v.explicit_bounds)[:2] == [0.05, 0.1]
    requests = {p.attributes["result"] for p in metrics["syncer_api_requests"]}
    assert {"ok", "retryable"} <= requests, requests


def test_syncer_run_exports_over_otlp(
    db: psycopg.Connection[Any], make_config: Any, fake: FakeEmbedderProcess, tmp_path: Path
) -> None:
    fill(db)
    receiver = OtlpReceiver()
    try:
        config = make_config()
        with open(config, "a") as f:
            f.write(f'\n[observe.otel]\nendpoint = "{receiver.endpoint}"\n')
        assert syncer(config, "install").returncode == 0
        r = syncer(config, "run", "--exit-when-idle", "--log-level", "debug")
        assert r.returncode == 0, r.stderr
    finally:
        receiver.stop()
    logged = set()
    for raw in r.stderr.splitlines():
        assert not any(x in raw for x in SECRETS), raw
        line = json.loads(raw)
        if "trace_id" in line:
            logged.add(line["trace_id"])
    exported = {s.trace_id.hex() for s in receiver.spans}
    assert logged and logged == exported
    assert {s.name for s in receiver.spans} >= {"claim", "fetch", "embed", "write"}
    # Shut down flushes the metrics too, so a short run is not lost.
    assert {
        "syncer_rows",
        "syncer_api_request_seconds",
        "syncer_queue_depth",
    } <= receiver.metric_names


def test_bad_otel_settings_are_one_clear_line(
    db: psycopg.Connection[Any], make_config: Any, tmp_path: Path
) -> None:
    create_docs(db)
    config = make_config()
    text = config.read_text()
    config.write_text(text + '\n[observe.otel]\nendpoint = "collector:4317"\n')
    r = syncer(config, "run", "--exit-when-idle")
    assert r.returncode != 0
    assert (
        r.stderr.strip().splitlines() == [r.stderr.strip().splitlines()[-1]]
        and "observe.otel.endpoint" in r.stderr
    ), r.stderr
    assert "http://" in r.stderr and "Traceback" not in r.stderr

    # Set, with the extra not installed: says what to install, before touching anything.
    config.write_text(text + '\n[observe.otel]\nendpoint = "http://collector:4317"\n')
    shadow = tmp_path / "shadow" / "opentelemetry"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('not installed')\n")
    env = cli_env(
        PYTHONPATH=os.pathsep.join([str(shadow.parent), os.environ.get("PYTHONPATH", "")])
    )
    r = syncer(config, "run", "--exit-when-idle", env=env)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install 'syncer[otel]'" in lines[0], r.stderr


def test_a_collector_that_is_away_loses_no_row(
    db: psycopg.Connection[Any], make_config: Any, fake: FakeEmbedderProcess
) -> None:
    """Export fails in the exporter's threads: the rows are embedded all the same, the run
    stops (after one export timeout, not a retry schedule), and the exporter's complaints
    are JSON log lines like the rest."""
    fill(db)
    config = make_config()
    with open(config, "a") as f:
        f.write('\n[observe.otel]\nendpoint = "http://127.0.0.1:9"\n')  # nothing listens
    assert syncer(config, "install").returncode == 0
    r = syncer(config, "run", "--exit-when-idle", timeout_s=60)
    assert r.returncode == 0, r.stderr
    assert assert_synced(db, f"SELECT title, body, embedding FROM docs WHERE id <> {POISON}")
    lines = [json.loads(line) for line in r.stderr.splitlines()]  # every line is JSON
    assert any("Failed to export" in line["msg"] for line in lines), r.stderr
