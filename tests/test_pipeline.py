"""End to end, trigger mode: the real command line, a real database, the fake API."""

from __future__ import annotations

from typing import Any

import numpy as np
import psycopg

from syncer.fake_embedder import FakeEmbedderProcess, fake_vector
from tests.conftest import DEFAULT_PIPELINE, syncer

DIM = 8


def create_docs(db: psycopg.Connection[Any], table: str = "docs") -> None:
    db.execute(f"CREATE TABLE {table} (id bigint PRIMARY KEY, title text, body text, tag text)")


def composed(*parts: str | None) -> str | None:
    kept = [p for p in parts if p]
    return "\n\n".join(kept) if kept else None


def assert_synced(db: psycopg.Connection[Any], sql: str = "SELECT title, body, embedding FROM docs") -> int:
    n = 0
    for title, body, emb in db.execute(sql).fetchall():
        text = composed(title, body)
        if text is None:
            assert emb is None
        else:
            assert emb is not None, f"no vector for {text[:40]!r}"
            np.testing.assert_allclose(np.asarray(emb.to_list()), fake_vector(text, DIM), rtol=1e-6)
        n += 1
    return n


def install_and_drain(config: Any) -> None:
    r = syncer(config, "install")
    assert r.returncode == 0, r.stderr
    r = syncer(config, "run", "--exit-when-idle")
    assert r.returncode == 0, r.stderr


def test_insert_update_and_noop_update(db: psycopg.Connection[Any], make_config: Any, fake: FakeEmbedderProcess) -> None:
    create_docs(db)
    config = make_config()
    db.execute("INSERT INTO docs VALUES (1, 'Hello', 'world', 'a'), (2, 'Second', NULL, 'b')")
    install_and_drain(config)
    assert assert_synced(db) == 2
    assert sorted(fake.inputs()) == ["Hello\n\nworld", "Second"]

    fake.reset()
    db.execute("UPDATE docs SET body = 'changed' WHERE id = 1")
    db.execute("UPDATE docs SET tag = 'zzz'")  # not a text column: no work
    db.execute("UPDATE docs SET title = title")  # same text: no work
    r = syncer(config, "run", "--exit-when-idle")
    assert r.returncode == 0, r.stderr
    assert fake.inputs() == ["Hello\n\nchanged"]
    assert_synced(db)
