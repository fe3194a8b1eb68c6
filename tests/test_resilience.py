"""Resilience end to end: the real `syncer` command in subprocesses, a real database, and the
fake OpenAI server injecting faults (429 storms, 5xx, hangs, resets, refused connections,
broken answers, a wrong key, rate limits).

Every test ends with `assert_settled`: each source row either has the vector of its current
text or is in the dead-letter table with a reason, and the queue is empty. Timing claims are
judged by the fake's request log (`t` is CLOCK_MONOTONIC, shared by every process here).
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import pytest

from syncer.providers.limits import PACE_BURST_S
from syncer.providers.tokens import estimate_tokens
from syncer.testing.fake_embedder import FakeEmbedderProcess, fake_vector
from syncer.testing.fake_embedder import estimate_tokens as provider_tokens
from tests.conftest import DEFAULT_PIPELINE, cli_env, pipeline_toml, syncer, wait_for
from tests.test_pipeline import DIM, composed, create_docs

KEY = "test-key-123"  # what the session's fake server accepts (conftest)
TOL_S = 0.1  # clock and scheduling slack when judging gaps in the fake's log
Log = list[dict[str, Any]]


# --- configuration -----------------------------------------------------------------------


def _toml(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


def provider(url: str, **settings: Any) -> dict[str, Any]:
    """A provider table: conftest's defaults plus any ProviderConfig key (rpm, breaker_*...)."""
    return {
        "kind": "openai",
        "base_url": url,
        "api_key_env": "FAKE_API_KEY",
        "max_concurrency": 4,
        "timeout_s": 5,
        **settings,
    }


# Small delays so retries happen within a test; a breaker cool-down of 30 s (the default)
# would stall most of these tests, so each sets its own.
WORKER = {"poll_interval_s": 0.5, "lease_s": 5, "retry_base_s": 0.05, "shutdown_timeout_s": 3}


@pytest.fixture()
def config(tmp_path: Path, db_url: str, fake: FakeEmbedderProcess) -> Callable[..., Path]:
    """config(*pipelines, providers=None, worker=None, **provider_settings) -> a TOML file.

    Without `providers`, one provider "fake" (the session's fake server) gets the settings.
    """
    counter = iter(range(1000))

    def make(
        *pipelines: dict[str, Any],
        providers: dict[str, dict[str, Any]] | None = None,
        worker: dict[str, Any] | None = None,
        **provider_settings: Any,
    ) -> Path:
        providers = providers or {"fake": provider(fake.url, **provider_settings)}
        body = f"[database]\nurl = {_toml(db_url)}\n\n[worker]\n"
        body += "".join(f"{k} = {_toml(v)}\n" for k, v in {**WORKER, **(worker or {})}.items())
        for name, settings in providers.items():
            body += f"\n[providers.{name}]\n"
            body += "".join(f"{k} = {_toml(v)}\n" for k, v in settings.items() if v is not None)
        for p in pipelines or (DEFAULT_PIPELINE,):
            body += "\n" + pipeline_toml(**p)
        path = tmp_path / f"resilience-{next(counter)}.toml"
        path.write_text(body)
        return path

    return make


def docs(**fields: Any) -> dict[str, Any]:
    return {**DEFAULT_PIPELINE, **fields}


# --- running the command in the background -----------------------------------------------


class Background:
    """`syncer run` in its own process; stderr goes to a file, so logs can never block it."""

    def __init__(self, config: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self._err = tempfile.TemporaryFile()  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "syncer.cli", "-c", str(config), "run", *args],
            stdout=subprocess.DEVNULL,
            stderr=self._err,
            env=env or cli_env(),
        )

    def stderr(self) -> str:
        self._err.seek(0)
        return self._err.read().decode(errors="replace")

    def alive(self) -> bool:
        """True while running; a process that died on its own fails the test with its stderr."""
        code = self.proc.poll()
        assert code is None, f"syncer exited early with {code}:\n{self.stderr()[-3000:]}"
        return True

    def wait(self, timeout_s: float) -> int:
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"syncer still running after {timeout_s}s") from None

    def stop(self, timeout_s: float = 20) -> int:
        """SIGTERM; the exit code, which must come within timeout_s."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.wait(timeout_s)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._err.close()


@pytest.fixture()
def background() -> Iterator[Callable[..., Background]]:
    started: list[Background] = []

    def start(config: Path, *args: str, env: dict[str, str] | None = None) -> Background:
        bg = Background(config, *args, env=env)
        started.append(bg)
        return bg

    yield start
    for bg in started:
        bg.close()


def until(bg: Background, cond: Callable[[], Any], timeout_s: float, what: str) -> Any:
    """wait_for, failing at once (with the syncer's stderr) if the process died meanwhile."""
    return wait_for(lambda: bg.alive() and cond(), timeout_s, what)


def assert_stays_false(cond: Callable[[], Any], for_s: float, what: str) -> None:
    """An observation window, not a synchronisation: `cond` must not become true meanwhile."""
    deadline = time.monotonic() + for_s
    while time.monotonic() < deadline:
        assert not cond(), what
        time.sleep(0.1)


# --- the database ------------------------------------------------------------------------


def install(config: Path) -> None:
    r = syncer(config, "install")
    assert r.returncode == 0, r.stderr


def drain(config: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    r = syncer(config, "run", "--exit-when-idle", env=env, timeout_s=90)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def fill(db: psycopg.Connection[Any], n: int, table: str = "docs", body: str = "body") -> None:
    db.execute(
        f"INSERT INTO {table} SELECT g, 'title ' || g, %s || ' ' || g "
        "FROM generate_series(1, %s) g",
        (body, n),
    )


def one(db: psycopg.Connection[Any], sql: str, *args: Any) -> Any:
    row = db.execute(sql, args or None).fetchone()
    assert row is not None
    return row[0]


def queued(db: psycopg.Connection[Any], pipeline: str = "docs") -> int:
    return int(one(db, "SELECT count(*) FROM syncer.queue WHERE pipeline = %s", pipeline))


def embedded(db: psycopg.Connection[Any], table: str = "docs") -> int:
    return int(one(db, f"SELECT count(*) FROM {table} WHERE embedding IS NOT NULL"))


def dead(db: psycopg.Connection[Any]) -> list[tuple[Any, ...]]:
    return db.execute(
        "SELECT key->>'id', error_class, error, attempts FROM syncer.dead_letters ORDER BY id"
    ).fetchall()


def assert_settled(
    db: psycopg.Connection[Any], pipelines: Sequence[tuple[str, str]] = (("docs", "docs"),)
) -> None:
    """Each source row has the vector of its current text, or is in the dead-letter table
    with a reason; and the queue is empty. `pipelines` holds (pipeline, table) pairs."""
    left = db.execute(
        "SELECT pipeline, key::text, attempts, last_error FROM syncer.queue"
    ).fetchall()
    assert left == [], f"{len(left)} items still queued, e.g. {left[:3]}"
    for pipeline, table in pipelines:
        letters = {
            int(k): (cls, err)
            for k, cls, err in db.execute(
                "SELECT key->>'id', error_class, error FROM syncer.dead_letters WHERE pipeline = %s",
                (pipeline,),
            )
        }
        rows = db.execute(f"SELECT id, title, body, embedding FROM {table} ORDER BY id").fetchall()
        assert rows, f"no rows in {table}"
        for id_, title, body, emb in rows:
            if id_ in letters:
                cls, err = letters[id_]
                assert cls and err, f"{table} row {id_}: dead-lettered without a reason"
                continue
            text = composed(title, body)
            if text is None:
                assert emb is None, f"{table} row {id_}: a vector for no text"
                continue
            assert emb is not None, f"{table} row {id_}: neither a vector nor a dead letter"
            np.testing.assert_allclose(
                np.asarray(emb.to_list()),
                fake_vector(text, DIM),
                rtol=1e-6,
                err_msg=f"{table} row {id_}: not the vector of its current text",
            )


# --- the fake's request log --------------------------------------------------------------


def times(log: Log, status: int | None = None) -> list[float]:
    return sorted(e["t"] for e in log if status is None or e["status"] == status)


def most_in_a_minute(log: Log, weight: Callable[[dict[str, Any]], float] = lambda e: 1) -> float:
    """The largest total weight of requests arriving within any sliding 60 s window."""
    entries = sorted(log, key=lambda e: e["t"])
    best = 0.0
    for i, first in enumerate(entries):
        best = max(best, sum(weight(e) for e in entries[i:] if e["t"] < first["t"] + 60))
    return best


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def storm(kind: dict[str, Any], repeat: int = 10_000) -> list[dict[str, Any]]:
    """A fault on every request until the test clears it with control(fail_next=[])."""
    return [{**kind, "repeat": repeat}]


# --- 1. 429 with Retry-After -------------------------------------------------------------


def test_429_storm_honours_retry_after(
    db: psycopg.Connection[Any], config: Any, fake: FakeEmbedderProcess, background: Any
) -> None:
    create_docs(db)
    fill(db, 64)
    cfg = config(docs(batch_size=16), max_concurrency=4, breaker_reset_s=1)
    install(cfg)
    fake.control(fail_next=storm({"kind": "status", "status": 429, "retry_after": "2"}))
    bg = background(cfg, "--exit-when-idle")

    def storm_lasted_4s() -> bool:
        t429 = times(fake.requests(), 429)
        return len(t429) > 0 and t429[-1] - t429[0] >= 4 - TOL_S

    until(bg, storm_lasted_4s, 40, "three rounds of 429s")
    fake.control(fail_next=[])
    assert bg.wait(60) == 0, bg.stderr()[-3000:]

    log = fake.requests()
    t_all, t429 = times(log), times(log, 429)
    # Requests already on the wire when a 429 came back may land just after it; anything
    # later must wait for Retry-After.
    for t0 in t429:
        early = [round(t - t0, 3) for t in t_all if t0 + 0.25 < t < t0 + 2 - TOL_S]
        assert not early, f"requests {early} s after a 429 that said Retry-After: 2"
    # Not hammering: at most one round of `max_concurrency` requests per Retry-After.
    storm_s = t429[-1] - t429[0]
    assert len(t429) <= 4 * (storm_s / 2 + 1), f"{len(t429)} 429s in {storm_s:.1f}s"
    assert dead(db) == []
    assert_settled(db)


# --- 2. RPM and TPM ----------------------------------------------------------------------


def paced(times: list[float], amounts: list[float], per_minute: float, slack: float) -> bool:
    """No prefix of the log started faster than per_minute allows, beyond `slack`."""
    t0, total = times[0], 0.0
    for t, n in zip(times, amounts, strict=True):
        total += n
        if total > (t - t0 + TOL_S) * per_minute / 60 + slack:
            return False
    return True


@pytest.mark.parametrize("fake_enforces", [True, False], ids=["fake-enforces", "config-only"])
def test_rpm_is_paced_and_holds_in_every_sliding_minute(
    db: psycopg.Connection[Any],
    config: Any,
    fake: FakeEmbedderProcess,
    background: Any,
    fake_enforces: bool,
) -> None:
    """24 single-input requests at rpm 120 go out evenly, 2 a second, not in one burst.

    config-only: the fake sends no rate-limit headers, so only the configured rpm holds the
    syncer back."""
    rpm, rows = 120, 24
    create_docs(db)
    fill(db, rows)
    cfg = config(docs(batch_size=1), rpm=rpm, max_concurrency=4)
    install(cfg)
    if fake_enforces:
        fake.control(rpm=rpm)
    bg = background(cfg, "--exit-when-idle")
    assert bg.wait(60) == 0, bg.stderr()[-3000:]

    log = fake.requests()
    assert [e["status"] for e in log] == [200] * rows
    assert most_in_a_minute(log) <= rpm
    burst = PACE_BURST_S * rpm / 60 + 1
    assert paced([e["t"] for e in log], [1] * rows, rpm, burst)
    assert log[-1]["t"] - log[0]["t"] >= (rows - burst) * 60 / rpm - 1
    assert dead(db) == []
    assert_settled(db)


@pytest.mark.parametrize("fake_enforces", [True, False], ids=["fake-enforces", "config-only"])
def test_tpm_is_paced_by_the_provider_s_token_count(
    db: psycopg.Connection[Any],
    config: Any,
    fake: FakeEmbedderProcess,
    background: Any,
    fake_enforces: bool,
) -> None:
    """Token-heavy texts go out at tpm as the provider counts tokens (its `usage` replaces
    syncer's higher estimate), evenly, and never over tpm in any minute."""
    rows = 24
    create_docs(db)
    fill(db, rows, body="lorem ipsum dolor sit amet consectetur " * 15)
    texts = [t for (t,) in db.execute("SELECT title || E'\\n\\n' || body FROM docs")]
    estimate = max(estimate_tokens(t) for t in texts)
    counted = max(provider_tokens(t) for t in texts)
    assert estimate > counted >= 100  # token-heavy, and the estimate errs high
    tpm = 120 * counted  # two texts a second, by the provider's count
    cfg = config(docs(batch_size=1), tpm=tpm, max_concurrency=4)
    install(cfg)
    if fake_enforces:
        fake.control(tpm=tpm)
    bg = background(cfg, "--exit-when-idle")
    assert bg.wait(60) == 0, bg.stderr()[-3000:]

    log = fake.requests()
    assert [e["status"] for e in log] == [200] * rows
    assert most_in_a_minute(log, lambda e: e["tokens"]) <= tpm
    # Ahead of the pace by at most the burst allowance and the estimates still in flight.
    slack = PACE_BURST_S * tpm / 60 + 4 * estimate
    assert paced([e["t"] for e in log], [e["tokens"] for e in log], tpm, slack)
    # ...and not paced by the estimate: that would take estimate / counted times as long.
    assert log[-1]["t"] - log[0]["t"] < rows * estimate * 60 / tpm
    assert dead(db) == []
    assert_settled(db)


def test_sigterm_while_the_rate_limiter_holds_a_full_pipeline(
    db: psycopg.Connection[Any], config: Any, fake: FakeEmbedderProcess, background: Any
) -> None:
    """The soft stop has a deadline even when every stage waits on the limiter (12 s a
    request at rpm 5)."""
    create_docs(db)
    fill(db, 40)
    cfg = config(docs(batch_size=1), rpm=5, max_concurrency=2, worker={"shutdown_timeout_s": 2})
    install(cfg)
    bg = background(cfg)
    until(bg, lambda: len(fake.requests()) >= 1, 30, "the first request")
    # Steady state: it holds all the work it may claim, and waits on the limiter.
    leased: list[int] = []

    def holding_steady() -> bool:
        leased.append(one(db, "SELECT count(*) FROM syncer.queue WHERE leased_by IS NOT NULL"))
        return len(leased) > 20 and leased[-1] > 0 and len(set(leased[-20:])) == 1

    until(bg, holding_steady, 20, "the claimed work to stop changing")
    code = bg.stop(timeout_s=2 + 8)  # shutdown_timeout_s, then a hard stop; not the minute
    assert code == 0, bg.stderr()[-3000:]
    assert one(db, "SELECT count(*) FROM syncer.queue WHERE leased_by IS NOT NULL") == 0
    assert embedded(db) + queued(db) == 40
    drain(config(docs(batch_size=8)))
    assert_settled(db)


# --- 3-5. 5xx, hangs, resets, refused connections ----------------------------------------


def test_5xx_for_a_while_then_healthy(
    db: psycopg.Connection[Any], config: Any, fake: FakeEmbedderProcess
) -> None:
    create_docs(db)
    fill(db, 20)
    cfg = config(docs(batch_size=5), max_concurrency=2, breaker_reset_s=1)
    install(cfg)
    fake.control(
        fail_next=[
            {"kind": "status", "status": 500, "repeat": 4},
            {"kind": "status", "status": 503, "repeat": 4},
        ]
    )
    drain(cfg)
    stats = fake.stats()["by_status"]
    assert stats.get("500") == 4 and stats.get("503") == 4
    assert dead(db) == []
    assert_settled(db)


def test_hang_longer_than_the_timeout_is_retried(
    db: psycopg.Connection[Any], config: Any, fake: FakeEmbedderProcess
) -> None:
    create_docs(db)
    fill(db, 8)
    cfg = config(docs(batch_size=4), max_concurrency=2, timeout_s=1, breaker_reset_s=1)
    install(cfg)
    fake.control(fail_next=[{"kind": "hang", "hang_s": 60, "repeat": 2}])
    started = time.monotonic()
    drain(cfg)
    assert time.monotonic() - started < 30  # not the 60 s of the hang
    log = fake.requests()
    hangs = [e for e in log if e["fault"] == "hang"]
    assert len(hangs) == 2
    for h in hangs:
        # The same inputs again, once the 1 s timeout gave up on the hung request.
        retry = min(e["t"] for e in log if e["inputs"] == h["inputs"] and e["status"] == 200)
        assert h["t"] + 1 - TOL_S <= retry < h["t"] + 10
    assert dead(db) == []
    assert_settled(db)


def test_connection_resets_are_retried(
    db: psycopg.Connection[Any], config: Any, fake: FakeEmbedderProcess
) -> None:
    create_docs(db)
    fill(db, 8)
    cfg = config(docs(batch_size=4), max_concurrency=2, breaker_reset_s=1)
    install(cfg)
    fake.control(fail_next=[{"kind": "reset", "repeat": 4}])
    drain(cfg)
    assert sum(e["fault"] == "reset" for e in fake.requests()) == 4
    assert dead(db) == []
    assert_settled(db)


def test_refused_connection_keeps_items_queued_until_fixed(
    db: psycopg.Connection[Any], config: Any, fake: FakeEmbedderProcess, background: Any
) -> None:
    rows = 12
    create_docs(db)
    fill(db, rows)
    worker = {"max_attempts": 10, "max_retries": 1, "retry_base_s": 0.2}
    broken = config(
        docs(batch_size=4),
        worker=worker,
        base_url=f"http://127.0.0.1:{closed_port()}/v1",
        breaker_reset_s=1,
    )
    install(broken)
    bg = background(broken)
    # Every item failed and went back to the queue, and was tried again after the cool-down.
    until(
        bg,
        lambda: (
            one(db, "SELECT count(*) FROM syncer.queue WHERE last_error IS NOT NULL") == rows
            and "open -> half_open" in bg.stderr()
        ),
        30,
        "items retried after refused connections",
    )
    assert bg.stop() == 0, bg.stderr()[-3000:]
    # The provider's outage is not the items': at most the attempt before the breaker opened.
    assert one(db, "SELECT max(attempts) FROM syncer.queue") <= 1
    assert dead(db) == []  # far from max_attempts: nothing may be dead-lettered
    assert queued(db) == rows
    errors = [e for (e,) in db.execute("SELECT DISTINCT last_error FROM syncer.queue")]
    # The connection error itself, or the open breaker it caused; either names the provider.
    assert all(e and "provider fake" in e for e in errors), errors
    assert one(db, "SELECT count(*) FROM syncer.queue WHERE leased_by IS NOT NULL") == 0

    drain(config(docs(batch_size=4), worker=worker))
    assert_settled(db)


# --- 6. broken answers -------------------------------------------------------------------


def test_bad_answers_are_never_written(
    db: psycopg.Connection[Any], config: Any, fake: FakeEmbedderProcess
) -> None:
    """Each fault bends a whole answer of 4 inputs; a client that kept its good-looking
    parts would store a wrong vector under the current hash, which assert_settled sees."""
    create_docs(db)
    fill(db, 12)
    cfg = config(docs(batch_size=4), max_concurrency=1, breaker_reset_s=1)
    install(cfg)
    kinds = ["malformed", "wrong_count", "nan", "bad_base64", "missing_index"]
    fake.control(fail_next=[{"kind": k} for k in kinds])
    drain(cfg)
    assert [e["fault"] for e in fake.requests()][: len(kinds)] == kinds
    assert dead(db) == []
    assert_settled(db)


def test_bad_answers_in_float_encoding(
    db: psycopg.Connection[Any], config: Any, fake: FakeEmbedderProcess
) -> None:
    """A provider without base64: NaN arrives as a JSON literal, numbers as lists."""
    create_docs(db)
    fill(db, 8)
    cfg = config(docs(batch_size=4), max_concurrency=1, breaker_reset_s=1)
    install(cfg)
    body = {"error": {"message": "'encoding_format' must be 'float'.", "param": "encoding_format"}}
    fake.control(
        fail_next=[
            {"kind": "status", "status": 400, "body": body},
            {"kind": "nan"},
            {"kind": "wrong_count"},
        ]
    )
    drain(cfg)
    log = fake.requests()
    assert [e["encoding_format"] for e in log[1:]] == ["float"] * (len(log) - 1)
    assert [e["fault"] for e in log][:3] == ["status", "nan", "wrong_count"]
    assert dead(db) == []
    assert_settled(db)


def test_one_wrong_dimension_answer_is_not_fatal(
    db: psycopg.Connection[Any], config: Any, fake: FakeEmbedderProcess
) -> None:
    """One answer of the wrong size among good ones: retried like any broken answer, and a
    draining run finishes the work instead of stopping as if the provider were misconfigured."""
    create_docs(db)
    fill(db, 8)
    cfg = config(docs(batch_size=4), max_concurrency=1, breaker_reset_s=1)
    install(cfg)
    fake.control(fail_next=[{"kind": "wrong_dim"}])
    r = syncer(cfg, "run", "--exit-when-idle", timeout_s=60)
    assert r.returncode == 0, r.stderr[-3000:]
    assert fake.requests()[0]["fault"] == "wrong_dim"
    assert dead(db) == []
    assert_settled(db)


def test_wrong_dimension_on_every_answer_pauses_the_provider(
    db: psycopg.Connection[Any], config: Any, fake: FakeEmbedderProcess
) -> None:
    """The model ignores `dimensions` (send_dimensions = false; the fake's default is 1536):
    provider fatal. The run stops with code 3 and says why; no row is blamed."""
    rows = 10
    create_docs(db)
    fill(db, rows)
    cfg = config(docs(batch_size=4, send_dimensions=False), breaker_reset_s=1)
    install(cfg)
    r = syncer(cfg, "run", "--exit-when-idle", timeout_s=60)
    assert r.returncode == 3, r.stderr[-3000:]
    assert "provider fake" in r.stderr and "1536 dimensions" in r.stderr
    assert "queue is intact" in r.stderr
    assert dead(db) == []
    assert queued(db) == rows and embedded(db) == 0
    assert one(db, "SELECT max(attempts) FROM syncer.queue") == 0  # not the items' fault
    assert 0 < len(fake.requests()) <= 4  # paused, not hammering

    drain(config(docs(batch_size=4), breaker_reset_s=1))
    assert_settled(db)


# --- 8. 401 ------------------------------------------------------------------------------


def test_401_pauses_the_pipeline_until_the_key_works(
    db: psycopg.Connection[Any], config: Any, fake: FakeEmbedderProcess, background: Any
) -> None:
    rows = 10
    create_docs(db)
    fill(db, rows)
    cfg = config(docs(batch_size=4), max_concurrency=2, breaker_reset_s=1)
    install(cfg)
    bad_key = cli_env(FAKE_API_KEY="sk-wrong-0123456789")

    r = syncer(cfg, "run", "--exit-when-idle", env=bad_key, timeout_s=60)
    assert r.returncode == 3, r.stderr[-3000:]
    assert "provider fake" in r.stderr and "HTTP 401" in r.stderr
    assert "sk-wrong-0123456789" not in r.stderr  # never log a key
    assert dead(db) == [] and queued(db) == rows
    assert one(db, "SELECT max(attempts) FROM syncer.queue") == 0

    # A long-running worker waits, then recovers by itself once the provider takes the key.
    fake.reset()
    bg = background(cfg, env=bad_key)
    until(bg, lambda: times(fake.requests(), 401), 30, "a 401")
    started = time.monotonic()
    assert_stays_false(lambda: dead(db), 2, "a row dead-lettered for the provider's refusal")
    fake.control(api_key="sk-wrong-0123456789")
    until(bg, lambda: queued(db) == 0, 30, "the queue to drain")
    paused_s = time.monotonic() - started
    assert bg.stop() == 0, bg.stderr()[-3000:]
    n401 = len(times(fake.requests(), 401))
    assert n401 <= 2 * (paused_s / 1 + 2), f"{n401} requests refused in {paused_s:.1f}s"
    assert "sk-wrong-0123456789" not in bg.stderr()
    assert_settled(db)


# --- 9. one provider's 429s do not slow another ------------------------------------------


def test_429_on_one_provider_does_not_slow_another(
    db: psycopg.Connection[Any], config: Any, fake: FakeEmbedderProcess, background: Any
) -> None:
    create_docs(db, "docs_a")
    create_docs(db, "docs_b")
    fill(db, 40, "docs_a")
    fill(db, 200, "docs_b")
    with FakeEmbedderProcess(api_key=KEY) as other:
        providers = {
            "slow": provider(fake.url, breaker_reset_s=1),
            "fast": provider(other.url, breaker_reset_s=1),
        }
        pipes = [
            docs(name="a", table="public.docs_a", provider="slow"),
            docs(name="b", table="public.docs_b", provider="fast"),
        ]
        cfg = config(*pipes, providers=providers)
        install(cfg)
        fake.control(fail_next=storm({"kind": "status", "status": 429, "retry_after": "30"}))
        bg = background(cfg)
        until(bg, lambda: queued(db, "b") == 0, 30, "pipeline b to drain")
        drained_at = time.monotonic()
        a_log = fake.requests()
        assert a_log and {e["status"] for e in a_log} == {429}
        first_429 = times(a_log, 429)[0]
        # b was done while a still sat out its Retry-After: 30.
        assert drained_at < first_429 + 15
        assert max(times(a_log)) < first_429 + 1, "a request to `slow` before Retry-After"
        assert embedded(db, "docs_a") == 0
        assert {e["status"] for e in other.requests()} == {200}
        assert bg.stop() == 0, bg.stderr()[-3000:]

        fake.control(fail_next=[])
        drain(cfg)  # a fresh process: the 30 s pause was the old process's
    assert_settled(db, [("a", "docs_a"), ("b", "docs_b")])


# --- 10. circuit breaker -----------------------------------------------------------------


def test_circuit_breaker_opens_probes_and_closes(
    db: psycopg.Connection[Any], config: Any, fake: FakeEmbedderProcess, background: Any
) -> None:
    create_docs(db)
    fill(db, 16)
    cfg = config(
        docs(batch_size=8),
        max_concurrency=2,
        breaker_failures=3,
        breaker_reset_s=1,
        worker={"max_attempts": 20},
    )
    install(cfg)
    fake.control(fail_next=storm({"kind": "status", "status": 500}))
    bg = background(cfg)

    def probes(log: Log) -> list[float]:
        """Requests after the first pause of >= the cool-down."""
        t = times(log)
        gaps = [i for i in range(1, len(t)) if t[i] - t[i - 1] >= 1 - TOL_S]
        return t[gaps[0] :] if gaps else []

    until(bg, lambda: len(probes(fake.requests())) >= 2, 30, "two failed probes")
    fake.control(fail_next=[])
    until(bg, lambda: queued(db) == 0, 30, "recovery")
    assert bg.stop() == 0, bg.stderr()[-3000:]

    log = fake.requests()
    failed = times(log, 500)
    first_ok = times(log, 200)[0]
    burst = [t for t in failed if t < probes(log)[0]]
    # Opened after 3 consecutive failures (one more may have been on the wire already).
    assert 3 <= len(burst) <= 4, f"{len(burst)} failures before the first pause"
    # While open: one probe per cool-down, the last of them the first success.
    probe_times = [t for t in failed if t > burst[-1]] + [first_ok]
    gaps = np.diff([burst[-1], *probe_times])
    assert (gaps >= 1 - TOL_S).all(), f"gaps between probes: {gaps.round(3)}"
    err = bg.stderr()
    for change in (
        "closed -> open",
        "open -> half_open",
        "half_open -> open",
        "half_open -> closed",
    ):
        assert f"circuit breaker fake: {change}" in err, change
    assert dead(db) == []
    assert_settled(db)


# --- 11. replay after the fault is gone --------------------------------------------------


def test_replay_dlq_after_the_fault_is_gone(
    db: psycopg.Connection[Any], config: Any, fake: FakeEmbedderProcess
) -> None:
    rows = 12
    create_docs(db)
    fill(db, rows)
    cfg = config(
        docs(batch_size=4),
        breaker_failures=1000,
        worker={"max_attempts": 1, "max_retries": 1},
    )
    install(cfg)
    fake.control(fail_next=storm({"kind": "status", "status": 500}))
    drain(cfg)
    letters = dead(db)
    assert len(letters) == rows
    assert {(cls, attempts) for _k, cls, _e, attempts in letters} == {("retryable", 1)}
    assert all("provider fake: HTTP 500" in e for _k, _c, e, _a in letters)
    assert_settled(db)  # every row dead-lettered with a reason, the queue empty

    fake.control(fail_next=[])
    r = syncer(cfg, "replay-dlq")
    assert r.returncode == 0 and f"replayed {rows} dead letters" in r.stdout, r.stderr
    drain(cfg)
    assert dead(db) == [] and embedded(db) == rows
    assert_settled(db)


# --- 12. SIGKILL during a retry storm ----------------------------------------------------


def test_sigkill_during_a_retry_storm_loses_nothing(
    db: psycopg.Connection[Any], config: Any, fake: FakeEmbedderProcess, background: Any
) -> None:
    rows = 40
    create_docs(db)
    fill(db, rows)
    cfg = config(
        docs(batch_size=4),
        max_concurrency=2,
        breaker_reset_s=1,
        worker={"lease_s": 2, "max_attempts": 20},
    )
    install(cfg)
    fake.control(fail_next=storm({"kind": "status", "status": 503}))
    victim = background(cfg)
    until(victim, lambda: len(times(fake.requests(), 503)) >= 6, 30, "a retry storm")
    until(
        victim,
        lambda: one(db, "SELECT count(*) FROM syncer.queue WHERE leased_until > now()") > 0,
        10,
        "leased items",
    )
    victim.proc.send_signal(signal.SIGKILL)
    assert victim.wait(10) == -signal.SIGKILL
    assert queued(db) == rows and embedded(db) == 0

    fake.control(fail_next=[])
    drain(cfg)  # waits out the dead worker's 2 s leases
    assert dead(db) == []
    assert_settled(db)
