"""`install` is idempotent and needs no superuser; `uninstall` removes what syncer made."""

from __future__ import annotations

from typing import Any

import psycopg

from syncer.schema.migrations import SCHEMA_VERSION
from syncer.testing.fake_embedder import FakeEmbedderProcess
from tests.conftest import DEFAULT_PIPELINE, syncer
from tests.test_pipeline import create_docs, install_and_drain

CATALOG = """
SELECT 'fn ' || p.oid::regprocedure::text FROM pg_proc p WHERE p.pronamespace::regnamespace::text = 'syncer'
UNION ALL SELECT 'trigger ' || tgname FROM pg_trigger WHERE NOT tgisinternal
UNION ALL SELECT 'table ' || oid::regclass::text FROM pg_class WHERE relnamespace::regnamespace::text = 'syncer' AND relkind = 'r'
UNION ALL SELECT 'column ' || table_name || '.' || column_name || ' ' || data_type
    FROM information_schema.columns WHERE table_schema = 'public'
ORDER BY 1
"""


def snapshot(db: psycopg.Connection[Any]) -> list[str]:
    return [r[0] for r in db.execute(CATALOG)]


def test_install_twice_changes_nothing(
    db: psycopg.Connection[Any], make_config: Any, fake: FakeEmbedderProcess
) -> None:
    create_docs(db)
    db.execute("CREATE ROLE app LOGIN NOSUPERUSER")
    db.execute("GRANT ALL ON SCHEMA public TO app; ALTER TABLE docs OWNER TO app")
    db.execute("INSERT INTO docs VALUES (1, 'a', 'b', NULL)")
    config = make_config()
    # As a plain role that owns the table: no superuser needed (pgvector is already there).
    db.execute("GRANT CREATE ON DATABASE " + db.info.dbname + " TO app")
    text = config.read_text().replace("postgresql://postgres@", "postgresql://app@", 1)
    config.write_text(text)
    install_and_drain(config)
    first = snapshot(db)
    assert "trigger syncer_docs_insert" in first and "trigger syncer_docs_update" in first
    assert "column docs.embedding USER-DEFINED" in first
    r = syncer(config, "install")
    assert r.returncode == 0, r.stderr
    assert snapshot(db) == first
    assert db.execute("SELECT count(*) FROM syncer.queue").fetchone() == (0,)
    assert db.execute("SELECT max(version) FROM syncer.schema_version").fetchone() == (
        SCHEMA_VERSION,
    )


def test_writes_by_another_role_are_captured(
    db: psycopg.Connection[Any], make_config: Any, fake: FakeEmbedderProcess
) -> None:
    """The trigger functions run as their owner: the application's role needs no grant on syncer."""
    create_docs(db)
    config = make_config()
    assert syncer(config, "install").returncode == 0
    db.execute("CREATE ROLE writer NOSUPERUSER; GRANT SELECT, INSERT, UPDATE ON docs TO writer")
    db.execute("SET ROLE writer; INSERT INTO docs VALUES (5, 'by writer', NULL, NULL); RESET ROLE")
    db.execute("SET ROLE writer; UPDATE docs SET title = 'again' WHERE id = 5; RESET ROLE")
    assert db.execute("SELECT count(*) FROM syncer.inbox").fetchone() == (2,)


def test_uninstall_keeps_user_data(
    db: psycopg.Connection[Any], make_config: Any, fake: FakeEmbedderProcess
) -> None:
    create_docs(db)
    db.execute("INSERT INTO docs VALUES (1, 'a', 'b', 'keep me')")
    before = snapshot(db)
    config = make_config()
    install_and_drain(config)
    r = syncer(config, "uninstall", input="n\n")  # asked before dropping the vectors: no
    assert r.returncode != 0
    assert db.execute("SELECT to_regnamespace('syncer') IS NOT NULL").fetchone() == (True,)
    r = syncer(config, "uninstall", input="y\n")
    assert r.returncode == 0, r.stderr
    assert snapshot(db) == before
    assert db.execute("SELECT id, title, body, tag FROM docs").fetchall() == [
        (1, "a", "b", "keep me")
    ]
    # With --keep-vectors the vectors stay and become the user's; the rest goes.
    install_and_drain(config)
    r = syncer(config, "uninstall", "--keep-vectors")
    assert r.returncode == 0, r.stderr
    assert db.execute("SELECT to_regnamespace('syncer')").fetchone() == (None,)
    kept = snapshot(db)
    assert "column docs.embedding USER-DEFINED" in kept
    assert not any(s.startswith("trigger syncer") for s in kept)
    assert db.execute("SELECT tag, embedding IS NOT NULL FROM docs").fetchone() == ("keep me", True)


def test_uninstall_side_table(
    db: psycopg.Connection[Any], make_config: Any, fake: FakeEmbedderProcess
) -> None:
    create_docs(db)
    before = snapshot(db)
    config = make_config({**DEFAULT_PIPELINE, "target": "table", "target_table": "docs_vec"})
    install_and_drain(config)
    assert db.execute("SELECT to_regclass('docs_vec') IS NOT NULL").fetchone() == (True,)
    r = syncer(config, "uninstall", "--yes")
    assert r.returncode == 0, r.stderr
    assert db.execute("SELECT to_regclass('docs_vec')").fetchone() == (None,)
    assert snapshot(db) == before
