"""The HTTP endpoints of `syncer run`: /metrics moves as items flow and faults come,
/healthz and /readyz follow the process and its database, and a bad observe.listen stops
the run before it claims anything."""

from __future__ import annotations

import re
import socket
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import psycopg
import pytest

from syncer.testing.fake_embedder import FakeEmbedderProcess
from tests.conftest import cli_env, syncer, wait_for
from tests.test_outage import synced
from tests.test_pipeline import create_docs
from tests.test_resilience import background

__all__ = ["background"]  # a fixture, used by name

SECRET = "sk-monitor-secret-4242"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()
    except OSError:
        return 0, ""


def sample(body: str, name: str, **labels: str) -> float:
    """The value of one series of a /metrics body (0 when absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in body.splitlines():
        m = re.match(r"^([a-z_]+)(?:\{(.*)\})? (\S+)$", line)
        if m and m.group(1) == name and ",".join(sorted((m.group(2) or "").split(","))) == want:
            return float(m.group(3))
    return 0.0


def with_listen(config: Path, port: int, extra: str = "") -> Path:
    config.write_text(config.read_text() + f'\n[observe]\nlisten = "127.0.0.1:{port}"\n{extra}')
    return config


METRICS = [
    "syncer_queue_depth",
    "syncer_queue_oldest_seconds",
    "syncer_rows_total",
    "syncer_api_requests_total",
    "syncer_api_request_seconds",
    "syncer_api_inputs_total",
    "syncer_api_tokens_total",
    "syncer_rate_limited_total",
    "syncer_rate_limit_wait_seconds",
    "syncer_breaker_open",
    "syncer_write_seconds",
    "syncer_vectors_written_total",
    "syncer_change_to_vector_seconds",
    "syncer_dead_letters",
    "syncer_db_pool_connections",
    "syncer_event_loop_lag_seconds",
]


def test_metrics_move_as_items_flow_and_faults_come(
    db: psycopg.Connection[Any],
    db_url: str,
    make_config: Any,
    fake: FakeEmbedderProcess,
    background: Any,
) -> None:
    create_docs(db)
    port = free_port()
    # Two attempts, no retry in process: two 5xx in a row dead-letter an item.
    config = with_listen(make_config(worker={"max_attempts": 2, "max_retries": 0}), port)
    assert syncer(config, "install", "--no-backfill").returncode == 0
    env = cli_env(FAKE_API_KEY="test-key-123", OTHER_SECRET=SECRET)
    worker = background(config, env=env)
    base = f"http://127.0.0.1:{port}"
    wait_for(lambda: worker.alive() and get(base + "/readyz")[0] == 200, 30, "ready")
    status, body = get(base + "/metrics")
    assert status == 200
    for name in METRICS:
        assert f"# TYPE {name} " in body, name
    fake.control(fail_next=[{"kind": "status", "status": 429, "retry_after": 0}])
    db.execute("INSERT INTO docs SELECT g, 'title ' || g, 'b' FROM generate_series(1, 40) g")
    wait_for(lambda: synced(db_url), 30, "the first rows synced")

    def scraped(cond: Any) -> str:
        def look() -> str | None:
            b = get(base + "/metrics")[1]
            return b if cond(b) else None

        return str(wait_for(look, 30, "the metrics to move"))

    body = scraped(lambda b: sample(b, "syncer_vectors_written_total", pipeline="docs") >= 40)
    assert sample(body, "syncer_rows_total", pipeline="docs", outcome="embedded") == 40
    assert sample(body, "syncer_rate_limited_total", provider="fake") >= 1
    assert sample(body, "syncer_api_request_seconds_count", provider="fake") >= 2
    assert sample(body, "syncer_change_to_vector_seconds_count", pipeline="docs") >= 40
    assert sample(body, "syncer_write_seconds_count", pipeline="docs") >= 1
    assert sample(body, "syncer_api_tokens_total", provider="fake") > 0
    assert sample(body, "syncer_db_pool_connections", state="idle") >= 1
    fake.control(fail_next=[{"kind": "status", "status": 500, "repeat": 2}])
    db.execute("INSERT INTO docs VALUES (1000, 'doomed', 'x')")
    body = scraped(lambda b: sample(b, "syncer_dead_letters", pipeline="docs") == 1)
    assert sample(body, "syncer_api_requests_total", provider="fake", result="retryable") >= 1
    assert sample(body, "syncer_rows_total", pipeline="docs", outcome="dead_lettered") == 1
    assert SECRET not in body and "test-key-123" not in body
    assert get(base + "/healthz")[0] == 200
    assert worker.stop() == 0, worker.stderr()[-3000:]
    logs = worker.stderr()
    assert SECRET not in logs and "test-key-123" not in logs
    assert "Traceback" not in logs


def test_a_listen_in_use_stops_the_run_before_it_claims(
    db: psycopg.Connection[Any], make_config: Any, fake: FakeEmbedderProcess
) -> None:
    create_docs(db)
    db.execute("INSERT INTO docs SELECT g, 'title ' || g, 'b' FROM generate_series(1, 20) g")
    config = make_config()
    assert syncer(config, "install").returncode == 0
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = syncer(config, "run", "--exit-when-idle", "--listen", f"127.0.0.1:{port}")
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1] == (
        f"error: observe.listen 127.0.0.1:{port}: cannot listen: address already in use"
    )
    assert fake.stats()["requests"] == 0
    left = db.execute("SELECT count(*), max(attempts) FROM syncer.queue").fetchone()
    assert left == (20, 0), "the run claimed items"


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ("9187", "must be HOST:PORT"),
        ("localhost:99999", "the port must be a number from 1 to 65535"),
        ("localhost:http", "the port must be a number"),
        (":9187", "must be HOST:PORT"),
    ],
)
def test_a_malformed_listen_names_the_key(
    make_config: Any, fake: FakeEmbedderProcess, value: str, why: str
) -> None:
    config = make_config()
    r = syncer(config, "run", "--listen", value)
    assert r.returncode == 2 and "'--listen'" in r.stderr and why in r.stderr, r.stderr
    config.write_text(config.read_text() + f'\n[observe]\nlisten = "{value}"\n')
    r = syncer(config, "run")
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: "), r.stderr
    assert "observe.listen:" in r.stderr and why in r.stderr, r.stderr


def test_log_options_work_on_every_command(make_config: Any, fake: FakeEmbedderProcess) -> None:
    config = make_config()
    r = syncer(config, "status", "--log-level", "loud")
    assert r.returncode == 2 and "--log-level" in r.stderr
    r = syncer(config, "--log-format", "text", "dlq", "list", "--log-level", "debug")
    assert r.returncode == 1 and "not installed" in r.stderr
