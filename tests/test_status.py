"""`syncer status`: the table, `--json`, and the exit codes of its thresholds on a healthy
database, a backlogged one and one with dead letters."""

from __future__ import annotations

import json
from typing import Any

import psycopg
import pytest

from syncer.testing.fake_embedder import FakeEmbedderProcess
from tests.conftest import syncer
from tests.test_pipeline import create_docs

FIELDS = {
    "name", "mode", "paused", "queued", "in_progress", "delayed", "oldest_age_s",
    "dead_letters", "rows", "rows_current", "rows_missing", "rows_stale", "coverage",
    "coverage_exact", "last_write_at", "runners",
}  # fmt: skip


def status(config: Any, *args: str) -> tuple[int, dict[str, Any], str]:
    r = syncer(config, "status", "--json", *args)
    doc = json.loads(r.stdout) if r.stdout.strip() else {}
    return r.returncode, doc, r.stderr


def test_a_healthy_database(
    db: psycopg.Connection[Any], make_config: Any, fake: FakeEmbedderProcess
) -> None:
    create_docs(db)
    db.execute("INSERT INTO docs SELECT g, 'title ' || g, 'b' FROM generate_series(1, 30) g")
    db.execute("INSERT INTO docs VALUES (31, NULL, NULL)")  # no text: not counted as missing
    config = make_config()
    assert syncer(config, "install").returncode == 0
    assert syncer(config, "run", "--exit-when-idle").returncode == 0
    code, doc, err = status(config, "--max-lag-s", "60", "--max-dead-letters", "0",
                            "--min-coverage", "1")  # fmt: skip
    assert code == 0, err
    (p,) = doc["pipelines"]
    assert set(p) == FIELDS
    assert p["name"] == "docs" and p["mode"] == "trigger" and p["paused"] is False
    assert (p["queued"], p["in_progress"], p["delayed"], p["dead_letters"]) == (0, 0, 0, {})
    assert (p["rows"], p["rows_current"], p["rows_missing"], p["rows_stale"]) == (31, 30, 0, 0)
    assert p["coverage"] == 1.0 and p["coverage_exact"] is True
    assert p["last_write_at"] is not None
    assert p["runners"] == []  # the run ended: it said so on its way out
    code, _, err = status(config, "--require-runner")
    assert code == 3 and "no runner seen in the last 30 s" in err
    r = syncer(config, "status")
    assert r.returncode == 0 and "100.00%" in r.stdout and "active" in r.stdout


def test_a_backlogged_database(
    db: psycopg.Connection[Any], make_config: Any, fake: FakeEmbedderProcess
) -> None:
    create_docs(db)
    db.execute("INSERT INTO docs SELECT g, 'title ' || g, 'b' FROM generate_series(1, 40) g")
    config = make_config()
    assert syncer(config, "install").returncode == 0
    db.execute("UPDATE docs SET body = 'changed'")  # captured into the inbox: queued too
    code, doc, err = status(config)
    assert code == 0, err
    (p,) = doc["pipelines"]
    assert p["queued"] >= 40 and p["rows_missing"] == 40 and p["coverage"] == 0.0
    assert p["last_write_at"] is None and p["oldest_age_s"] >= 0
    code, _, err = status(config, "--max-lag-s", "0", "--min-coverage", "0.99")
    assert code == 3
    assert "pipeline docs: lag" in err and "over --max-lag-s 0" in err
    assert "coverage 0.0000 under --min-coverage 0.99" in err


def test_a_database_with_dead_letters(
    db: psycopg.Connection[Any], make_config: Any, fake: FakeEmbedderProcess
) -> None:
    create_docs(db)
    db.execute("INSERT INTO docs VALUES (1, 'doomed', 'b')")  # alone: a request it cannot split
    config = make_config(worker={"max_attempts": 1, "max_retries": 0})
    assert syncer(config, "install").returncode == 0
    fake.control(fail_next=[{"kind": "status", "status": 500}])
    assert syncer(config, "run", "--exit-when-idle").returncode == 0
    code, doc, _ = status(config)
    (p,) = doc["pipelines"]
    assert code == 0 and p["dead_letters"] == {"retryable": 1} and p["rows_missing"] == 1
    n_dead = 1
    code, _, err = status(config, "--max-dead-letters", str(n_dead))
    assert code == 0, err
    code, _, err = status(config, "--max-dead-letters", "0")
    assert code == 3 and f"{n_dead} dead letters over --max-dead-letters 0" in err


@pytest.mark.parametrize(
    ("args", "key"),
    [
        (["--min-coverage", "1.5"], "--min-coverage"),
        (["--max-lag-s", "-1"], "--max-lag-s"),
        (["--max-dead-letters", "many"], "--max-dead-letters"),
    ],
)
def test_a_bad_threshold_names_the_flag(
    make_config: Any, fake: FakeEmbedderProcess, args: list[str], key: str
) -> None:
    r = syncer(make_config(), "status", *args)
    assert r.returncode == 2 and key in r.stderr, r.stderr


def test_not_installed_or_unreachable_is_exit_1(
    make_config: Any, fake: FakeEmbedderProcess, tmp_path: Any
) -> None:
    config = make_config()
    r = syncer(config, "status", "--json")
    assert r.returncode == 1 and "not installed" in r.stderr
    config.write_text(
        config.read_text().replace("url = ", 'url = "postgresql://nobody@127.0.0.1:1/x"\n# ', 1)
    )
    r = syncer(config, "status", "--json")
    assert r.returncode == 1 and "cannot connect" in r.stderr, r.stderr
