"""The chunks target, end to end: the real command line, a real database, the fake API."""

from __future__ import annotations

import random
import signal
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import psycopg
import pytest

from syncer import config as config_mod
from syncer.errors import ConfigError
from syncer.testing.fake_embedder import ALWAYS_500_MARKER, FakeEmbedderProcess, fake_vector
from tests.conftest import DEFAULT_PIPELINE, start_syncer, syncer, wait_for

DIM = 8
WORDS = [
    "alpha",
    "beta",
    "gamma",
    "delta",
    "epsilon",
    "zeta",
    "eta",
    "theta",
    "iota",
    "kappa",
    "lambda",
    "mu",
    "nu",
    "xi",
]


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
        f.write(f'\n[pipelines.chunking]\nunit = "{unit}"\nsize = {size}\noverlap = {overlap}\n')


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


def chunked_docs(db: psycopg.Connection[Any], make_config: Any, size: int, **over: Any) -> Path:
    """The docs table and a config of one chunk pipeline cutting `size` characters."""
    create_docs(db)
    config: Path = make_config(chunks_pipeline(**over))
    chunking(config, size=size)
    return config


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


def test_template_copy_columns_and_halfvec(
    db: psycopg.Connection[Any], make_config: Any, fake: FakeEmbedderProcess
) -> None:
    create_docs(db)
    db.execute("ALTER TABLE docs ALTER COLUMN author TYPE bigint")
    config = make_config(
        chunks_pipeline(
            template="{title}: {chunk}",
            copy_columns=["tag", "author"],
            vector_type="halfvec",
        )
    )
    chunking(config, size=120)
    body = "\n\n".join(document(2, 12))
    db.execute("INSERT INTO docs VALUES (1, 'Guide', %s, 'red', 7)", (body,))
    install_and_drain(config)
    types = dict(
        db.execute(
            "SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute "
            "WHERE attrelid = 'docs_chunks'::regclass AND attnum > 0"
        ).fetchall()
    )
    assert types["embedding"] == f"halfvec({DIM})" and types["author"] == "bigint"
    n = db.execute("SELECT count(*) FROM docs_chunks").fetchone()[0]
    assert len(fake.inputs()) == n > 3
    assert all(t.startswith("Guide: ") for t in fake.inputs())
    rows = db.execute("SELECT chunk, embedding, tag, author FROM docs_chunks").fetchall()
    for chunk, emb, tag, author in rows:
        assert (tag, author) == ("red", 7)
        got = np.asarray(emb.to_list(), dtype=np.float32)
        np.testing.assert_allclose(got, fake_vector(f"Guide: {chunk}", DIM), atol=2e-3)

    # A copied column alone: refreshed on every chunk, with no API call.
    fake.reset()
    db.execute("UPDATE docs SET tag = 'blue', author = NULL")
    drain(config)
    assert fake.inputs() == []
    assert db.execute("SELECT DISTINCT tag, author FROM docs_chunks").fetchall() == [("blue", None)]

    # The template's column changes what is embedded: every chunk anew.
    db.execute("UPDATE docs SET title = 'Manual'")
    drain(config)
    assert len(fake.inputs()) == n and all(t.startswith("Manual: ") for t in fake.inputs())
    assert db.execute("SELECT count(*) FROM docs_chunks").fetchone() == (n,)


def test_global_dedupe_reuses_across_rows_never_across_models(
    db: psycopg.Connection[Any], make_config: Any, fake: FakeEmbedderProcess
) -> None:
    config = chunked_docs(db, make_config, 200, dedupe="global")
    boiler = "This document is confidential. Do not share it outside the company, thanks."
    for i in range(1, 4):
        body = "\n\n".join([boiler, *document(10 + i, 3), boiler.upper()])
        db.execute("INSERT INTO docs (id, body) VALUES (%s, %s)", (i, body))
    install_and_drain(config)
    inputs = fake.inputs()
    assert len(inputs) == len(set(inputs))  # one claim: each boilerplate chunk sent once
    assert sum(boiler in t for t in inputs) == 1
    db.execute("INSERT INTO docs (id, body) VALUES (9, %s)", (boiler,))
    fake.reset()
    drain(config)
    assert fake.inputs() == []  # stored for another row already
    assert_chunks_current(db)

    # Another model: nothing of the first is reused.
    text = config.read_text().replace('model = "text-embedding-3-small"', 'model = "other-model"')
    config.write_text(text)
    fake.reset()
    install_and_drain(config)
    assert sorted(fake.inputs()) == sorted({*inputs, boiler})
    assert db.execute("SELECT count(*) FROM docs_chunks WHERE id = 9").fetchone() == (1,)


def parse_pipeline(**over: Any) -> Any:
    """Parse a config of one chunk pipeline changed by `over` (None: the key left out)."""
    p = {k: v for k, v in chunks_pipeline(**over).items() if v is not None}
    data = {"providers": {"fake": {"api_key_env": None}}, "pipelines": [p]}
    return config_mod.parse(data, Path("syncer.toml"))


@pytest.mark.parametrize(
    ("over", "expected"),
    [
        ({"chunking": {"size": 64, "overlap": 64}}, "pipelines[0].chunking.overlap: must be less"),
        ({"chunking": {"size": 8}}, "pipelines[0].chunking.size: must be at least 16 tokens"),
        ({"chunking": {"splitter": "sentences"}}, "pipelines[0].chunking.splitter"),
        ({"chunking": {"unit": "words"}}, "pipelines[0].chunking.unit"),
        ({"chunking": {"sise": 10}}, "pipelines[0].chunking.sise: unknown key"),
        ({"template": "{title"}, "pipelines[0].template: not a valid template"),
        ({"template": "{title}"}, "pipelines[0].template: must contain {chunk}"),
        ({"template": "{chunk!r}"}, "pipelines[0].template: {chunk}: fields are plain"),
        ({"copy_columns": ["body"]}, "copy_columns: 'body' is a text column"),
        ({"copy_columns": ["id"], "key": ["id"]}, "copy_columns: 'id' is a key column"),
        ({"target_table": None}, "target = 'chunks' needs target_table"),
        ({"target": "table", "template": "{chunk}"}, "pipelines[0].template: is only for"),
        ({"target": "column", "target_table": None, "chunking": {}}, "chunking: is only for"),
        ({"dedupe": "everything"}, "pipelines[0].dedupe"),
    ],
)
def test_bad_chunk_config(over: dict[str, Any], expected: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_pipeline(**over)
    assert expected in str(err.value), str(err.value)
    assert "\n" not in str(err.value)


def test_good_chunk_config_parses() -> None:
    cfg = parse_pipeline(template="{title}\n\n{chunk}", chunking={"unit": "characters", "size": 80})
    p = cfg.pipelines[0]
    assert p.template_columns == ("title",)
    assert p.watched_columns == ("body", "title")
    # A change of how documents are cut or composed makes every document stale.
    other = parse_pipeline(
        template="{title}\n\n{chunk}", chunking={"unit": "characters", "size": 90}
    )
    assert other.pipelines[0].fingerprint() != p.fingerprint()


@pytest.mark.parametrize(
    ("setup", "over", "expected"),
    [
        ("", {"template": "{subtitle} {chunk}"}, "(template): column 'subtitle' does not exist"),
        ("", {"copy_columns": ["nope"]}, "(copy_columns): column 'nope' does not exist"),
        ("", {"copy_columns": ["id"]}, "(copy_columns): 'id' is a key column"),
        (
            "CREATE TABLE docs_chunks (id bigint, chunk_index text)",
            {},
            "column 'chunk_index' is of type text, not integer",
        ),
        (
            "CREATE TABLE docs_chunks (id bigint, chunk_index int, chunk text, start_char int, "
            "end_char int, chunk_hash bytea, doc_hash bytea, embedded_at timestamptz, "
            "embedding vector(3))",
            {},
            "docs_chunks.embedding is vector(3), but the config says vector(8)",
        ),
        (
            "CREATE TABLE docs_chunks (id bigint, chunk_index int, chunk text, start_char int, "
            "end_char int, chunk_hash bytea, doc_hash bytea, embedded_at timestamptz, "
            "embedding vector(8))",
            {"copy_columns": ["tag"]},
            "column 'tag' is missing, not text",
        ),
    ],
)
def test_install_checks_the_chunk_table(
    db: psycopg.Connection[Any], make_config: Any, setup: str, over: dict[str, Any], expected: str
) -> None:
    create_docs(db)
    if setup:
        db.execute(setup)
    r = syncer(make_config(chunks_pipeline(**over)), "install")
    assert r.returncode != 0
    assert expected in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert db.execute("SELECT to_regnamespace('syncer') IS NULL").fetchone() == (True,)


def test_unsplittable_document_is_dead_lettered_alone(
    db: psycopg.Connection[Any], make_config: Any, fake: FakeEmbedderProcess
) -> None:
    config = chunked_docs(db, make_config, 200)
    huge = "word " * 2_100_000  # 10.5 M characters: over what can be split
    db.execute("INSERT INTO docs (id, body) VALUES (1, %s)", (huge,))
    for i in range(2, 12):
        db.execute("INSERT INTO docs (id, body) VALUES (%s, %s)", (i, "\n\n".join(document(i, 3))))
    install_and_drain(config)
    dead = db.execute("SELECT key, error_class FROM syncer.dead_letters").fetchall()
    assert dead == [({"id": 1}, "chunking_failed")]
    assert db.execute("SELECT count(DISTINCT id) FROM docs_chunks").fetchone() == (10,)
    # status counts documents: the failed one is not current.
    r = syncer(config, "status", "--json")
    (st,) = orjson.loads(r.stdout)["pipelines"]
    assert (st["rows_current"], st["rows_missing"], st["dead_letters"]) == (
        10,
        1,
        {"chunking_failed": 1},
    ), st
    db.execute("DELETE FROM docs WHERE id = 1")
    assert_chunks_current(db)


def test_two_workers_rapid_edits_leave_the_newest_version(
    db: psycopg.Connection[Any], make_config: Any, fake: FakeEmbedderProcess
) -> None:
    create_docs(db)
    config = make_config(chunks_pipeline(), worker={"poll_interval_s": 0.2})
    chunking(config, size=120)
    db.execute("INSERT INTO docs (id, body) VALUES (1, 'first')")
    r = syncer(config, "install")
    assert r.returncode == 0, r.stderr
    fake.control(latency_ms=20)
    workers = [start_syncer(config, "run") for _ in range(2)]
    try:
        rng = random.Random(5)
        for n in range(200):
            paras = document(rng.randrange(1000), rng.randrange(1, 12))
            paras[0] = f"Version {n}."
            db.execute("UPDATE docs SET body = %s WHERE id = 1", ("\n\n".join(paras),))
        newest = db.execute("SELECT syncer.docs_chunks__hash(d) FROM docs d").fetchone()[0]
        wait_for(
            lambda: (
                db.execute(
                    "SELECT count(*) FROM syncer.queue WHERE pipeline = 'docs_chunks'"
                ).fetchone()
                == (0,)
                and db.execute(
                    "SELECT bool_and(doc_hash = %s) FROM docs_chunks", (newest,)
                ).fetchone()
                == (True,)
            ),
            timeout_s=90,
            what="the newest version's chunks",
        )
    finally:
        for w in workers:
            w.send_signal(signal.SIGTERM)
        codes = [w.wait(timeout=30) for w in workers]
    assert codes == [0, 0], [w.stderr.read() if w.stderr else "" for w in workers]
    assert_chunks_current(db)
    assert db.execute(
        "SELECT count(*) FROM docs_chunks WHERE chunk LIKE 'Version 199.%'"
    ).fetchone() == (1,)


def test_preview_shows_what_an_edit_would_send(
    db: psycopg.Connection[Any], make_config: Any, fake: FakeEmbedderProcess
) -> None:
    config = chunked_docs(db, make_config, 200)
    paras = document(3, 20)
    db.execute("INSERT INTO docs (id, body) VALUES (42, %s)", ("\n\n".join(paras),))
    install_and_drain(config)
    paras[10] = "A changed paragraph in the middle of it all."
    db.execute("UPDATE docs SET body = %s WHERE id = 42", ("\n\n".join(paras),))
    r = syncer(
        config, "chunks", "preview", "--pipeline", "docs_chunks", "--key", '{"id": 42}', "--json"
    )
    assert r.returncode == 0, r.stderr
    pv = orjson.loads(r.stdout)
    text = "\n\n".join(paras)
    assert pv["chunks"] and not pv["current"]
    for c in pv["chunks"]:
        assert c["start"] < c["end"] <= len(text)
    assert 1 <= pv["to_embed"] <= 3
    drain(config)
    assert len(fake.inputs()) >= pv["to_embed"]  # what preview said is what was sent
    r = syncer(config, "chunks", "preview", "--pipeline", "docs_chunks", "--key", '{"id": 42}')
    assert r.returncode == 0 and "0 to embed" in r.stdout and "current" in r.stdout, r.stdout
    for bad, expected in [
        ('{"id": ', "--key: not JSON"),
        ('{"nope": 1}', "--key: must be a JSON object of the key columns ['id']"),
    ]:
        r = syncer(config, "chunks", "preview", "--pipeline", "docs_chunks", "--key", bad)
        assert r.returncode != 0 and expected in r.stderr and "Traceback" not in r.stderr
    r = syncer(config, "chunks", "preview", "--pipeline", "nope", "--key", '{"id": 42}')
    assert r.returncode != 0 and "no pipeline named 'nope'" in r.stderr


def test_always_failing_chunk_costs_only_its_document(
    db: psycopg.Connection[Any], make_config: Any, fake: FakeEmbedderProcess
) -> None:
    create_docs(db)
    config = make_config(chunks_pipeline(batch_size=32), worker={"max_attempts": 3})
    chunking(config, size=200)
    poisoned = (5, 23)
    for i in range(1, 41):
        paras = document(100 + i, 10)
        if i in poisoned:
            paras[4] = f"A paragraph the provider always fails on {ALWAYS_500_MARKER}."
        db.execute("INSERT INTO docs (id, body) VALUES (%s, %s)", (i, "\n\n".join(paras)))
    r = syncer(config, "install")
    assert r.returncode == 0, r.stderr
    r = syncer(config, "run", "--exit-when-idle", timeout_s=120)
    assert r.returncode == 0, r.stderr
    dead = db.execute(
        "SELECT (key->>'id')::int, error_class, attempts FROM syncer.dead_letters ORDER BY 1"
    ).fetchall()
    assert dead == [(i, "retryable", 3) for i in poisoned]
    assert db.execute(
        "SELECT count(*) FROM docs_chunks WHERE id = ANY(%s)", (list(poisoned),)
    ).fetchone() == (0,)
    db.execute("DELETE FROM docs WHERE id = ANY(%s)", (list(poisoned),))
    assert assert_chunks_current(db) > 300
    healthy = [t for t in fake.inputs() if ALWAYS_500_MARKER not in t]
    assert len(healthy) == len(set(healthy))
    assert "closed -> open" not in r.stderr, "the breaker opened for one input's sake"
