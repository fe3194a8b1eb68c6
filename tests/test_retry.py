"""The retry policy, on its own (no I/O), and the per-item attempt budget end to end."""

from __future__ import annotations

from typing import Any

import psycopg

from syncer.config import WorkerConfig
from syncer.errors import (
    CircuitOpenError,
    DimensionError,
    InputError,
    InputTooLongError,
    PausedError,
    ProviderError,
    RateLimitedError,
    RetryableError,
)
from syncer.retry import RATE_LIMITED_SPREAD_S, RetryPolicy
from syncer.testing.fake_embedder import FakeEmbedderProcess
from tests.conftest import DEFAULT_PIPELINE, syncer
from tests.test_pipeline import create_docs

WORKER = WorkerConfig(max_attempts=3, max_retries=2, retry_base_s=1.0, retry_max_s=8.0)
POLICY = RetryPolicy(WORKER, breaker_reset_s=30.0)


def test_input_errors_dead_letter_at_once_and_split_only_a_batch() -> None:
    for err in (InputError("bad"), InputTooLongError("long")):
        assert POLICY.decide(err, attempts=1).dead_letter
        assert POLICY.retry_in_s(err, retry=1, time_left_s=100) is None
    assert POLICY.split(InputError("bad"), n_inputs=2)
    assert not POLICY.split(InputError("bad"), n_inputs=1)
    assert not POLICY.split(RateLimitedError("HTTP 429"), n_inputs=64)


def test_retryable_spends_attempts_until_the_budget() -> None:
    err = RetryableError("HTTP 503")
    first = POLICY.decide(err, attempts=1)
    assert not first.dead_letter and first.counts and 0 <= first.delay_s <= 1.0
    assert 0 <= POLICY.decide(err, attempts=2).delay_s <= 2.0
    assert POLICY.decide(err, attempts=3).dead_letter


def test_a_retry_after_is_a_floor() -> None:
    d = POLICY.decide(RateLimitedError("429", retry_after_s=7.5), attempts=1)
    assert d.delay_s >= 7.5 and not d.dead_letter


def test_failures_not_the_items_fault_spend_no_attempt() -> None:
    # Never sent (breaker open), or a provider that refuses everything: never dead-lettered.
    for err in (CircuitOpenError("open", 2.0), ProviderError("HTTP 401")):
        d = POLICY.decide(err, attempts=99)
        assert not d.dead_letter and not d.counts
    assert POLICY.decide(ProviderError("HTTP 401"), attempts=1).delay_s == 30.0
    # Paused before it was sent: back at once, claimable the moment the pipeline resumes.
    d = POLICY.decide(PausedError("pipeline docs is paused"), attempts=99)
    assert (d.dead_letter, d.delay_s, d.counts) == (False, 0.0, False)


def test_in_process_retries() -> None:
    err = RetryableError("HTTP 500")
    assert 0 <= POLICY.retry_in_s(err, retry=1, time_left_s=100) <= 1.0  # type: ignore[operator]
    assert 0 <= POLICY.retry_in_s(err, retry=2, time_left_s=100) <= 2.0  # type: ignore[operator]
    assert POLICY.retry_in_s(err, retry=3, time_left_s=100) is None  # max_retries = 2
    assert POLICY.retry_in_s(RetryableError("x", retry_after_s=5), 1, time_left_s=4) is None
    assert POLICY.retry_in_s(RateLimitedError("429"), 1, 100) <= RATE_LIMITED_SPREAD_S  # type: ignore[operator]
    assert POLICY.retry_in_s(CircuitOpenError("open", 1.5), 1, 100) == 1.5
    assert POLICY.retry_in_s(DimensionError("4 dims"), 1, 100) is not None
    assert POLICY.retry_in_s(ProviderError("HTTP 403"), 1, 100) is None


def test_fresh_items_beside_one_on_its_last_attempt(
    db: psycopg.Connection[Any], make_config: Any, fake: FakeEmbedderProcess
) -> None:
    """A claim mixing fresh items with one on its last attempt, and a failed request: only
    that one is dead-lettered; its neighbours go back and get their vectors."""
    assert DEFAULT_PIPELINE["batch_size"] >= 10  # one claim, one request
    create_docs(db)
    db.execute("INSERT INTO docs SELECT g, 'title ' || g, NULL FROM generate_series(1, 10) g")
    config = make_config(worker={"max_attempts": 3, "max_retries": 0})
    r = syncer(config, "install")
    assert r.returncode == 0, r.stderr
    db.execute("UPDATE syncer.queue SET attempts = 2 WHERE key->>'id' = '5'")
    # A 429: the provider's state, so the batch is not split to look for an input at fault.
    fake.control(fail_next=[{"kind": "status", "status": 429}])
    r = syncer(config, "run", "--exit-when-idle")
    assert r.returncode == 0, r.stderr
    assert fake.stats()["requests"] == 2  # the batch of 10 failed once, then 9 went through
    dead = db.execute(
        "SELECT key->>'id', error_class, attempts FROM syncer.dead_letters"
    ).fetchall()
    assert dead == [("5", "rate_limited", 3)]
    missing = db.execute("SELECT id FROM docs WHERE embedding IS NULL").fetchall()
    assert missing == [(5,)]
    assert db.execute("SELECT count(*) FROM syncer.queue").fetchone() == (0,)


def test_a_failing_batch_is_split_after_one_retry() -> None:
    err = RetryableError("HTTP 500")
    assert POLICY.retry_in_s(err, retry=1, time_left_s=100, n_inputs=64) is not None
    assert POLICY.retry_in_s(err, retry=2, time_left_s=100, n_inputs=64) is None
    assert POLICY.split(err, n_inputs=64) and not POLICY.split(err, n_inputs=1)
    # A part of a split, or an input already traced, is not retried in process.
    assert POLICY.retry_in_s(err, retry=1, time_left_s=100, n_inputs=1, part=True) is None
    # The provider's own state is never split: a 429, an open breaker, a wrong dimension.
    for state in (RateLimitedError("429"), CircuitOpenError("open", 1.0), DimensionError("4")):
        assert not POLICY.split(state, n_inputs=64)
        assert not POLICY.traced(state)
    assert POLICY.traced(err)
