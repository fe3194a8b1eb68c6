"""A fresh install and an upgrade from any earlier schema version give the same database,
and the work queued before the upgrade is still there after it."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import psycopg
import pytest

from syncer import config as config_mod
from syncer import db as db_mod
from syncer.capture import source_for
from syncer.schema.install import install_pipeline
from syncer.schema.migrations import SCHEMA_VERSION, VERSIONS, migrate, migrations, missing_versions

from .conftest import DEFAULT_PIPELINE, syncer
from .test_pipeline import create_docs

SIDE = {**DEFAULT_PIPELINE, "name": "notes", "table": "public.notes", "target": "table",
        "target_table": "public.notes_vectors"}  # fmt: skip
QUEUED = "SELECT id, pipeline, key::text, attempts FROM syncer.queue ORDER BY id"
# Version 1's update trigger was statement-level; install must replace it.
V1_UPDATE_TRIGGER = """
CREATE OR REPLACE TRIGGER syncer_docs_update AFTER UPDATE ON docs
REFERENCING OLD TABLE AS syncer_old NEW TABLE AS syncer_new
FOR EACH STATEMENT EXECUTE FUNCTION syncer.docs__capture_update()
"""


def schema_dump(pg: Any, url: str) -> list[str]:
    """pg_dump --schema-only of the database, without its comments and per-run keys."""
    pg_dump = Path(pg.server.bin_path) / "pg_dump"
    out = subprocess.run(
        [str(pg_dump), "--schema-only", "--no-owner", "--no-privileges", "-d", url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    skip = ("--", "\\restrict", "\\unrestrict")
    return [line for line in out.splitlines() if line and not line.startswith(skip)]


async def install_old(url: str, config: Path, version: int) -> None:
    """The database as syncer left it at `version`: its migrations, then the pipelines."""
    cfg = config_mod.load(config, env={"FAKE_API_KEY": "k"})
    conn = await db_mod.connect(url)
    try:
        assert await migrate(conn, upto=version) == [v for v in VERSIONS if v <= version]
        for p in cfg.pipelines:
            await install_pipeline(conn, p, source_for(cfg).install_pipeline)
        if version == 1:
            await conn.execute(V1_UPDATE_TRIGGER)
    finally:
        await conn.close()


def test_migrations_are_numbered_upward_from_one() -> None:
    # A gap is allowed: a migration of another branch may land after a higher-numbered one.
    versions = [m.version for m in migrations()]
    assert versions[0] == 1 and versions == sorted(set(versions)) and SCHEMA_VERSION >= 2


async def test_a_migration_merged_later_with_a_lower_number_still_runs(db_url: str) -> None:
    conn = await db_mod.connect(db_url)
    try:
        assert await migrate(conn) == list(VERSIONS)
        await conn.execute("DELETE FROM syncer.schema_version WHERE version = 2")
        assert await migrate(conn) == [2]  # idempotent, as every migration must be
        assert await missing_versions(conn) == []
    finally:
        await conn.close()


@pytest.mark.parametrize("version", VERSIONS)
async def test_an_upgrade_gives_the_database_a_fresh_install_gives(
    pg: Any, db: psycopg.Connection[Any], db_url: str, make_config: Any, version: int
) -> None:
    create_docs(db)
    create_docs(db, "notes")
    db.execute("INSERT INTO docs VALUES (1, 'a', 'b', NULL), (2, 'c', NULL, NULL)")
    config = make_config(DEFAULT_PIPELINE, SIDE)
    r = syncer(config, "install", "--no-backfill")
    assert r.returncode == 0, r.stderr
    fresh = schema_dump(pg, db_url)
    assert "CREATE TABLE syncer.inbox (" in fresh and "CREATE TABLE public.notes_vectors (" in fresh
    assert syncer(config, "uninstall", "--yes").returncode == 0

    await install_old(db_url, config, version)
    db.execute(
        "INSERT INTO syncer.queue (pipeline, key, attempts) "
        """VALUES ('docs', '{"id": 1}', 2), ('notes', '{"id": 7}', 0)"""
    )
    queued = db.execute(QUEUED).fetchall()
    if version < SCHEMA_VERSION:
        r = syncer(config, "run", "--exit-when-idle")
        assert r.returncode != 0 and "run `syncer install` again to upgrade" in r.stderr
    r = syncer(config, "install", "--no-backfill")
    assert r.returncode == 0, r.stderr

    assert schema_dump(pg, db_url) == fresh
    assert db.execute(QUEUED).fetchall() == queued
    versions = db.execute("SELECT version FROM syncer.schema_version ORDER BY 1").fetchall()
    assert versions == [(v,) for v in VERSIONS]
