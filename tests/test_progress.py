"""Progress: with no terminal, a drain logs a JSON progress line every 10 s (and one at the
end); on a terminal, the rich bar shows items done of total, rows/s and the ETA."""

from __future__ import annotations

import asyncio
import io
import json
from typing import Any

import psycopg
from rich.console import Console

from syncer import app
from syncer import config as config_mod
from syncer.progress import Reporter, reporting
from syncer.testing.fake_embedder import FakeEmbedderProcess
from tests.conftest import syncer
from tests.test_pipeline import create_docs


def test_a_drain_without_a_terminal_logs_progress_lines(
    db: psycopg.Connection[Any], make_config: Any, fake: FakeEmbedderProcess
) -> None:
    create_docs(db)
    db.execute("INSERT INTO docs SELECT g, 'title ' || g, NULL FROM generate_series(1, 320) g")
    config = make_config(concurrency=1)
    assert syncer(config, "install").returncode == 0
    fake.control(latency_ms=600)  # 20 requests one at a time: over 10 s
    r = syncer(config, "run", "--exit-when-idle")
    assert r.returncode == 0, r.stderr
    lines = [json.loads(line) for line in r.stderr.splitlines()]  # stderr is a pipe: JSON
    progress = [line for line in lines if line["msg"].startswith("progress: embedded")]
    assert len(progress) >= 2, r.stderr  # at 10 s, and at the end
    first, last = progress[0], progress[-1]
    assert 0 < first["done"] < 320 and first["rows_per_s"] > 0 and first["total"] == 320
    assert first["eta_s"] > 0
    assert last["done"] == last["total"] == 320
    assert last["msg"] == "progress: embedded 320 of 320"


def test_the_bar_on_a_terminal(
    db: psycopg.Connection[Any], make_config: Any, fake: FakeEmbedderProcess
) -> None:
    create_docs(db)
    db.execute("INSERT INTO docs SELECT g, 'title ' || g, NULL FROM generate_series(1, 12000) g")
    db.execute("ANALYZE docs")  # the total comes from the planner's statistics
    path = make_config()
    assert syncer(path, "install", "--no-backfill").returncode == 0
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=120, color_system=None)
    reporter = Reporter("scanned", console=console, refresh_s=0.01)
    assert reporter.on_terminal
    cfg = config_mod.load(path)
    queued = asyncio.run(
        reporting(reporter, app.backfill(cfg, None, False, lambda _: None, reporter.update))
    )
    assert queued == {"docs": 12000}
    assert (reporter.done, reporter.total) == (12000, 12000)
    frames = out.getvalue()
    assert "scanned" in frames and "12000/12000" in frames, frames
    assert "rows/s" in frames and "ETA" in frames, frames
    assert "/12000" in frames.split("12000/12000")[0]  # a frame drawn before the end
