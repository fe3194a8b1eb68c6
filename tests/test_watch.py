"""`syncer status --watch`: frames drawn against a real database, on a terminal (a pty) and
off one; the runner's /metrics gives rates, API latency, 429s and the breaker; SIGINT ends it
with exit 0."""

from __future__ import annotations

import asyncio
import io
import os
import pty
import select
import signal
import subprocess
import sys
import time
from typing import Any

import asyncpg
import psycopg
from rich.console import Console

from syncer import config as config_mod
from syncer.testing.fake_embedder import FakeEmbedderProcess
from syncer.watch import Row, metrics_url, watch
from tests.conftest import cli_env, start_syncer, syncer, wait_for
from tests.test_monitor import free_port, with_listen
from tests.test_pipeline import create_docs


def test_watch_on_a_terminal_redraws_and_exits_0_on_sigint(
    db: psycopg.Connection[Any], make_config: Any, fake: FakeEmbedderProcess
) -> None:
    create_docs(db)
    db.execute("INSERT INTO docs SELECT g, 'title ' || g, NULL FROM generate_series(1, 50) g")
    config = make_config()
    assert syncer(config, "install").returncode == 0  # 50 rows queued, no runner
    master, slave = pty.openpty()
    env = cli_env(TERM="xterm", COLUMNS="140", LINES="40")
    proc = subprocess.Popen(
        [sys.executable, "-m", "syncer.cli", "-c", str(config), "status", "--watch"],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        env=env,
    )
    os.close(slave)
    out = b""
    try:
        deadline = time.monotonic() + 30
        while out.count(b"syncer status --watch") < 3 and time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                out += os.read(master, 65536)
        assert out.count(b"syncer status --watch") >= 3, out  # redrawn each second
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
    text = out.decode(errors="replace")
    assert "docs" in text and "active" in text and "50" in text, text
    assert "\x1b[" in text  # drawn in place with the terminal's cursor codes
    assert "Traceback" not in text


def test_watch_reads_the_runners_metrics(
    db: psycopg.Connection[Any], make_config: Any, fake: FakeEmbedderProcess, tmp_path: Any
) -> None:
    create_docs(db)
    db.execute("INSERT INTO docs SELECT g, 'title ' || g, NULL FROM generate_series(1, 3000) g")
    port = free_port()
    config = with_listen(make_config(), port)
    assert syncer(config, "install").returncode == 0
    fake.control(latency_ms=150, fail_next=[{"kind": "status", "status": 429, "repeat": 2}])
    cfg = config_mod.load(config)
    url = metrics_url(cfg, None)
    assert url == f"http://127.0.0.1:{port}/metrics"
    runner = start_syncer(config, "run")
    frames: list[list[Row]] = []
    out = io.StringIO()
    try:
        wait_for(lambda: fake.stats()["ok"] > 0, what="the runner's first answers")

        async def main() -> int:
            conn = await asyncpg.connect(cfg.database.url)
            try:
                console = Console(file=out, width=160)
                return await watch(cfg, conn, url, console, 4, 0.5, frames.append)
            finally:
                await conn.close()

        assert asyncio.run(main()) == 4
    finally:
        runner.send_signal(signal.SIGTERM)
        runner.wait(timeout=30)
    rows = [f[0] for f in frames]
    assert all(r.name == "docs" and r.runners == 1 for r in rows)
    later = [r for r in rows[1:] if r.rate is not None]
    assert later and max(r.rate or 0 for r in later) > 0, rows
    assert any(r.p50_s is not None and r.p99_s is not None for r in later), rows
    assert max(r.p50_s or 0 for r in later) > 0.1, rows  # answers take 150 ms
    assert all(r.p99_s is None or r.p99_s < 5 for r in later), rows
    assert rows[-1].rate_limited == 2 and rows[-1].breaker_open is False, rows
    text = out.getvalue()
    assert text.count("syncer status --watch") == 4  # off a terminal: frame after frame
    assert "closed" in text and "rows/s" in text


def test_watch_usage_errors(make_config: Any) -> None:
    config = make_config()
    r = syncer(config, "status", "--watch", "--json")
    assert r.returncode == 2 and "--watch draws a live view: it takes no --json" in r.stderr
    r = syncer(config, "status", "--metrics-url", "http://x/metrics")
    assert r.returncode == 2 and "--metrics-url goes with --watch" in r.stderr
