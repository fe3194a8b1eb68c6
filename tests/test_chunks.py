"""The chunks target, end to end: the real command line, a real database, the fake API."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import psycopg
import pytest

from syncer.testing.fake_embedder import FakeEmbedderProcess, fake_vector
from tests.conftest import DEFAULT_PIPELINE, start_syncer, syncer, wait_for

DIM = 8
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi".split()


def chunks_pipeline(**over: Any) -> dict[str, Any]:
    return {
        **DEFAULT_PIPELINE,
        "name": "docs_chunks",
        "text": ["body"],
        "target": "chunks",
        "target_table": "public.docs_chunks",
        **over,
    }


def chunking(config_path: Any, size: int = 40, overlap: int = 0, unit: str = "characters") -> None:
    """Append a [pipelines.chunking] table to the config's (only) pipeline."""
    with open(config_path, "a") as f:
        f.write(
            f'\n[pipelines.chunking]\nunit = "{unit}"\nsize = {size}\noverlap = {overlap}\n'
        )


def paragraph(rng: random.Random, n_words: int = 30) -> str:
    words = [rng.choice(WORDS) for _ in range(n_words)]
    return " ".join(words).capitalize() + "."


def document(seed: int, paragraphs: int = 20) -> list[str]:
    rng = random.Random(seed)
    return [paragraph(rng) for _ in range(paragraphs)]


def create_docs(db: psycopg.Connection[Any]) -> None:
    db.execute(
        "CREATE TABLE docs (id bigint PRIMARY KEY, title text, body text, tag text, author int)"
    )


def drain(config: Any) -> None:
    r = syncer(config, "run", "--exit-when-idle")
    assert r.returncode == 0, r.stderr


def install_and_drain(config: Any) -> None:
    r = syncer(config, "install")
    assert r.returncode == 0, r.stderr
    drain(config)


def assert_chunks_current(
    db: psycopg.Connection[Any], template: str | None = None, store_text: bool = True
) -> int:
    """Every document with text has exactly its current text's chunks, whose offsets slice
    the composed text, and each vector is the vector of its chunk text (as embedded)."""
    n = 0
    texts = dict(db.execute("SELECT id, syncer.docs_chunks__text(d) FROM docs d").fetchall())
    rows = db.execute(
        "SELECT id, chunk_index, chunk, start_char, end_char, embedding, doc_hash = "
        "syncer.docs_chunks__hash(d) FROM docs_chunks c JOIN docs d USING (id) "
        "ORDER BY id, chunk_index"
    ).fetchall()
    seen: dict[int, list[int]] = {}
    for id_, idx, chunk, start, end, emb, current in rows:
        text = texts[id_]
        assert text is not None, f"document {id_} has no text but keeps chunks"
        assert current, f"document {id_} chunk {idx} is of an older version"
        piece = text[start:end]
        if store_text:
            assert chunk == piece
        embedded = template.format(chunk=piece) if template else piece
        np.testing.assert_allclose(np.asarray(emb.to_list()), fake_vector(embedded, DIM), rtol=1e-5)
        seen.setdefault(id_, []).append(idx)
        n += 1
    for id_, text in texts.items():
        if text is not None:
            assert id_ in seen, f"document {id_} has no chunks"
            assert seen[id_] == list(range(len(seen[id_]))), f"document {id_}: gaps in indices"
    orphans = db.execute(
        "SELECT count(*) FROM docs_chunks c WHERE NOT EXISTS (SELECT FROM docs d WHERE d.id = c.id)"
    ).fetchone()
    assert orphans == (0,)
    return n


@pytest.mark.parametrize("mode", ["trigger", "logical"])
def test_edit_reembeds_only_changed_chunks(
    db: psycopg.Connection[Any],
    make_config: Any,
    fake: FakeEmbedderProcess,
    logical: dict[str, str],
    mode: str,
) -> None:
    create_docs(db)
    config = make_config(chunks_pipeline(), capture=logical if mode == "logical" else None)
    chunking(config, size=200)
    paras = document(1, 40)
    db.execute("INSERT INTO docs (id, body) VALUES (1, %s), (2, %s)", ("\n\n".join(paras), "short"))
    install_and_drain(config)
    n_chunks = db.execute("SELECT count(*) FROM docs_chunks WHERE id = 1").fetchone()[0]
    assert n_chunks >= 30
    assert len(fake.inputs()) == n_chunks + 1
    assert_chunks_current(db)

    # One paragraph in the middle changes: only its chunk(s) are sent.
    fake.reset()
    paras[20] = "An entirely new paragraph about something else, written just now."
    db.execute("UPDATE docs SET body = %s WHERE id = 1", ("\n\n".join(paras),))
    drain(config)
    assert 1 <= len(fake.inputs()) <= 3, fake.inputs()
    assert any("entirely new paragraph" in t for t in fake.inputs())
    assert_chunks_current(db)

    # A paragraph inserted at the top: boundaries after it stay where they were.
    fake.reset()
    paras.insert(0, "A new opening paragraph.")
    db.execute("UPDATE docs SET body = %s WHERE id = 1", ("\n\n".join(paras),))
    drain(config)
    assert 1 <= len(fake.inputs()) <= 3, fake.inputs()
    assert_chunks_current(db)

    # Shortened: the tail chunks go.
    fake.reset()
    db.execute("UPDATE docs SET body = %s WHERE id = 1", ("\n\n".join(paras[:5]),))
    drain(config)
    assert fake.inputs() == []  # its first chunks are stored already
    left = db.execute("SELECT count(*) FROM docs_chunks WHERE id = 1").fetchone()[0]
    assert 0 < left < n_chunks / 4
    assert_chunks_current(db)

    # Delete, NULL text, truncate.
    db.execute("DELETE FROM docs WHERE id = 2")
    db.execute("UPDATE docs SET body = NULL WHERE id = 1")
    drain(config)
    assert db.execute("SELECT count(*) FROM docs_chunks").fetchone() == (0,)
    db.execute("UPDATE docs SET body = 'back again' WHERE id = 1")
    drain(config)
    assert assert_chunks_current(db) == 1
    db.execute("TRUNCATE docs")
    drain(config)
    assert db.execute("SELECT count(*) FROM docs_chunks").fetchone() == (0,)
    assert db.execute("SELECT count(*) FROM syncer.queue").fetchone() == (0,)
