"""The dashboard and the alerts speak of metrics the exporter really exports: a real run's
/metrics body names every metric their expressions use, and promtool accepts the body."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import psycopg
import pytest

from syncer.testing.fake_embedder import FakeEmbedderProcess
from tests.conftest import start_syncer, syncer, wait_for
from tests.test_monitor import free_port, get, sample, with_listen
from tests.test_pipeline import create_docs
from tests.test_processes import stop_all

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy/grafana/syncer.json"
ALERTS = ROOT / "deploy/prometheus/alerts.yml"


def used_metrics(text: str) -> set[str]:
    return set(re.findall(r"\bsyncer_[a-z_]+", text))


def dashboard_exprs() -> list[str]:
    doc = json.loads(DASHBOARD.read_text())
    assert doc["uid"] == "syncer" and doc["panels"]
    exprs = []
    for panel in doc["panels"]:
        assert panel["title"] and panel["targets"], panel
        exprs += [t["expr"] for t in panel["targets"]]
    return exprs


def test_dashboard_and_alerts_name_only_exported_metrics(
    db: psycopg.Connection[Any], make_config: Any, fake: FakeEmbedderProcess
) -> None:
    create_docs(db)
    port = free_port()
    config = with_listen(make_config(), port)
    assert syncer(config, "install").returncode == 0
    db.execute("INSERT INTO docs SELECT g, 'title ' || g, 'b' FROM generate_series(1, 200) g")
    proc = start_syncer(config, "run")
    try:

        def scraped() -> str | None:
            body = get(f"http://127.0.0.1:{port}/metrics")[1]
            written = sample(body, "syncer_vectors_written_total", pipeline="docs")
            return body if written == 200 and "syncer_queue_oldest_seconds{" in body else None

        body = str(wait_for(scraped, 60, "a /metrics body after the writes"))
    finally:
        stop_all([proc])
    series = {line.split("{")[0].split(" ")[0] for line in body.splitlines() if line[:1] != "#"}
    for expr in dashboard_exprs():
        for name in used_metrics(expr):
            assert name in series, f"dashboard: {name} is not exported ({expr})"
    for name in used_metrics(ALERTS.read_text()):
        assert name in series, f"alerts.yml: {name} is not exported"
    if shutil.which("promtool") is None:
        pytest.skip("promtool missing: deploy/promtool.sh installs it")
    r = subprocess.run(["promtool", "check", "metrics"], input=body, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
