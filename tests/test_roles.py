"""`syncer roles`: install and run work as exactly the roles it creates, in both capture
modes, and those roles can do no more than that (no superuser, no write to the user's text)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.conftest import DEFAULT_PIPELINE, cli_env, syncer
from tests.test_pipeline import assert_synced, create_docs

SIDE = {**DEFAULT_PIPELINE, "name": "notes", "table": "public.notes", "target": "table",
        "target_table": "public.notes_vectors"}  # fmt: skip


def as_role(db_url: str, role: str) -> str:
    assert db_url.startswith("postgresql://postgres@"), db_url
    return db_url.replace("postgresql://postgres@", f"postgresql://{role}@", 1)


def run_script(db: psycopg.Connection[Any], config: Path, *args: str) -> list[str]:
    """Print the roles script and run it as the administrator; what it says to do later."""
    r = syncer(config, "roles", *args)
    assert r.returncode == 0, r.stderr
    notices: list[str] = []

    def keep(d: psycopg.errors.Diagnostic) -> None:
        if "again after syncer install" in str(d.message_primary):
            notices.append(str(d.message_primary))

    db.add_notice_handler(keep)
    try:
        db.execute(r.stdout.encode())
    finally:
        db.remove_notice_handler(keep)
    return notices


@pytest.mark.parametrize("mode", ["trigger", "logical"])
def test_install_and_run_as_the_printed_roles(
    db: psycopg.Connection[Any],
    db_url: str,
    make_config: Callable[..., Path],
    logical: dict[str, str],
    mode: str,
) -> None:
    suffix = db.execute("SELECT current_database()").fetchone()[0]  # type: ignore[index]
    owner, install, run = f"own_{suffix}", f"ins_{suffix}", f"run_{suffix}"
    db.execute(f"CREATE ROLE {owner} NOLOGIN")
    for table in ("docs", "notes"):
        create_docs(db, table)
        db.execute(f"ALTER TABLE {table} OWNER TO {owner}")
        db.execute(f"INSERT INTO {table} VALUES (1, 'Before', 'install', 'a')")
    capture = logical if mode == "logical" else None
    config = make_config(DEFAULT_PIPELINE, SIDE, capture=capture)
    names = ("--mode", mode, "--install-role", install, "--run-role", run)

    notices = run_script(db, config, *names)
    assert any("run this script again after syncer install" in n for n in notices), notices
    r = syncer(config, "install", env=cli_env(SYNCER_DATABASE_URL=as_role(db_url, install)))
    assert r.returncode == 0, r.stderr
    assert run_script(db, config, *names) == []  # now every grant found its object

    db.execute("INSERT INTO docs VALUES (2, 'Hello', 'world', 'b')")
    db.execute("UPDATE notes SET body = 'changed' WHERE id = 1")
    db.execute("INSERT INTO notes VALUES (2, 'Side', 'table', 'b')")
    r = syncer(
        config, "run", "--exit-when-idle", env=cli_env(SYNCER_DATABASE_URL=as_role(db_url, run))
    )
    assert r.returncode == 0, r.stderr
    assert "cannot VACUUM" not in r.stderr  # trigger mode: MAINTAIN on the inbox was granted
    assert assert_synced(db) == 2
    sql = "SELECT n.title, n.body, v.embedding FROM notes n JOIN notes_vectors v USING (id)"
    assert assert_synced(db, sql) == 2

    flags = db.execute(
        "SELECT rolsuper, rolcreaterole, rolcreatedb, rolreplication FROM pg_roles "
        "WHERE rolname = ANY(%s) ORDER BY rolname = %s",
        ([install, run], run),
    ).fetchall()
    assert flags == [(False, False, False, mode == "logical")] * 2
    with psycopg.connect(as_role(db_url, run), autocommit=True) as conn:
        for statement in (
            "UPDATE docs SET body = 'vandalised'",  # the user's text is not run's to change
            "UPDATE notes SET tag = 'vandalised'",
            "CREATE TABLE public.mine (x int)",
            "DROP TABLE syncer.queue",
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(statement)
