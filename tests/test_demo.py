"""`syncer demo`, run for real: its own embedded PostgreSQL and local embedder."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

STEP_RE = re.compile(
    r"^(\d+)\. (.+?)\s{2,}(?:queued\s+(\d+), )?embedded\s+(\d+), API calls (\d+)$", re.M
)
TOTAL_RE = re.compile(r"^  (rows embedded|API calls|calls saved|free updates)\s+(\d+)\b", re.M)
LATENCY_RE = re.compile(r"^  latency\s+p50 ([\d.]+) ms, max ([\d.]+) ms", re.M)


def demo_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "syncer.cli", "demo", *args]


def demo_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("SYNCER_DATABASE_URL", "NO_COLOR")}
    return {**env, **extra}


def run_demo(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        demo_command(*args), capture_output=True, text=True, env=env or demo_env(), timeout=120
    )


def steps(out: str) -> dict[str, dict[str, int | None]]:
    """Each numbered step's figures, keyed by a word of its label."""
    found: dict[str, dict[str, int | None]] = {}
    for number, label, queued, embedded, calls in STEP_RE.findall(out):
        found[label] = {
            "number": int(number),
            "queued": int(queued) if queued else None,
            "embedded": int(embedded),
            "calls": int(calls),
        }
    return found


def step(found: dict[str, dict[str, int | None]], word: str) -> dict[str, int | None]:
    matches = [figures for label, figures in found.items() if word in label]
    assert len(matches) == 1, f"one step with {word!r} expected in {list(found)}"
    return matches[0]


def test_demo_shows_what_each_change_costs() -> None:
    started = time.monotonic()
    r = run_demo("--rows", "10")
    assert r.returncode == 0, r.stdout + r.stderr
    assert time.monotonic() - started < 60
    out = r.stdout
    assert "NOT semantic" in out
    assert not [line for line in (out + r.stderr).splitlines() if line.startswith("{")]

    found = steps(out)
    assert [f["number"] for f in found.values()] == list(range(1, 9)), out
    backfill = step(found, "backfill")
    assert (backfill["queued"], backfill["embedded"]) == (10, 10)
    assert step(found, "INSERT")["embedded"] == 3
    assert step(found, "UPDATE a title") == {"number": 3, "queued": 1, "embedded": 1, "calls": 1}
    # The claims that matter: text that did not change costs no API call.
    for word in ("views", "same title", "undo", "DELETE"):
        assert step(found, word)["calls"] == 0, word
        assert step(found, word)["embedded"] == 0, word
    assert step(found, "views")["queued"] == 0
    assert step(found, "same title")["queued"] == 0
    assert step(found, "undo")["queued"] == 2
    latency_run = step(found, "single-row")
    assert latency_run["embedded"] == 10

    totals = {name: int(value) for name, value in TOTAL_RE.findall(out)}
    assert totals["rows embedded"] == 10 + 3 + 1 + 10
    assert totals["rows embedded"] == sum(f["embedded"] or 0 for f in found.values())
    assert totals["API calls"] == sum(f["calls"] or 0 for f in found.values())
    # The edit undone in the same transaction: captured twice, folded into one queue item.
    assert totals["calls saved"] == 1
    assert totals["free updates"] == 13 + 1  # views on every row, then the same title again
    p50, worst = (float(x) for x in LATENCY_RE.findall(out)[0])
    assert 0 < p50 <= worst < 30_000


def test_missing_api_key_is_named_and_nothing_starts() -> None:
    env = demo_env()
    env.pop("SOME_UNSET_VAR", None)
    r = run_demo("--base-url", "http://127.0.0.1:9/v1", "--api-key-env", "SOME_UNSET_VAR", env=env)
    assert r.returncode != 0
    assert "SOME_UNSET_VAR" in r.stderr
    assert "PostgreSQL" not in r.stdout


def test_bad_base_url_is_a_usage_error() -> None:
    r = run_demo("--base-url", "ftp://example.com", env=demo_env(OPENAI_API_KEY="x"))
    assert r.returncode == 2
    assert "--base-url" in r.stderr and "http://" in r.stderr


def test_keep_runs_until_ctrl_c_then_removes_everything() -> None:
    proc = subprocess.Popen(
        demo_command("--rows", "3", "--keep"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=demo_env(),
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout or ()], daemon=True).start()
    try:
        seen = read_until(lines, "keeps running", timeout_s=90)
        datadir = Path(re.findall(r"host=(/[^'\s&]+)", seen)[0])
        assert datadir.is_dir()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not datadir.exists(), "the embedded PostgreSQL's data directory was left behind"


def read_until(lines: queue.Queue[str], marker: str, timeout_s: float) -> str:
    deadline, seen = time.monotonic() + timeout_s, ""
    while marker not in seen:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"no {marker!r} within {timeout_s} s; output so far:\n{seen}"
        try:
            seen += lines.get(timeout=remaining)
        except queue.Empty:
            continue
    return seen
