"""A batch of keys costs the database work for those keys, not for the whole table.

The worker reads and writes a few hundred keys at a time. On a table of a few thousand
rows, PostgreSQL's planner prefers a hash or merge join for such a batch, which reads every
row of the table (and sorts or hashes the vectors) for every batch. These tests run the
worker's own statements, as the worker runs them, under EXPLAIN ANALYZE and count the rows
each table gave up.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import numpy as np
import psycopg
import pytest
from pgvector import Vector
from pgvector.asyncpg import register_vector

from syncer import app, config, db
from syncer.targets import store_for

from .conftest import DEFAULT_PIPELINE, syncer

ROWS = 3000
BATCH = 256
NOTES = {**DEFAULT_PIPELINE, "name": "notes", "table": "public.notes", "target": "table",
         "target_table": "public.notes_vectors"}  # fmt: skip


@pytest.fixture()
def installed(db: psycopg.Connection[Any], make_config: Any) -> Iterator[Path]:
    for table in ("docs", "notes"):
        db.execute(f"CREATE TABLE {table} (id bigint PRIMARY KEY, title text, body text)")
        # ~1 KB a row, as a real document table: the size that tips the planner.
        db.execute(
            f"INSERT INTO {table} SELECT g, 'title ' || g, repeat('word ', 200) || g "
            f"FROM generate_series(1, {ROWS}) g"
        )
    path = make_config(DEFAULT_PIPELINE, NOTES)
    done = syncer(path, "install", "--no-backfill")
    assert done.returncode == 0, done.stderr
    # Every row already has a vector, as after a backfill.
    db.execute(
        "INSERT INTO notes_vectors (id, embedding, content_hash) "
        "SELECT id, '[1,1,1,1,1,1,1,1]', '\\x00' FROM notes"
    )
    for table in ("docs", "notes", "notes_vectors"):
        db.execute(f"ANALYZE {table}")
    yield path


def rows_read(plan: dict[str, Any], out: Counter[str] | None = None) -> Counter[str]:
    """Rows each table's scans returned, over all loops (the plan of EXPLAIN ANALYZE)."""
    out = Counter() if out is None else out
    if "Relation Name" in plan:
        out[plan["Relation Name"]] += int(plan["Actual Rows"] * plan["Actual Loops"])
    for child in plan.get("Plans", []):
        rows_read(child, out)
    return out


async def explain(conn: asyncpg.Connection, sql: str, *args: Any) -> Counter[str]:
    doc = await conn.fetchval("EXPLAIN (ANALYZE, FORMAT JSON) " + sql, *args)
    return rows_read(json.loads(doc)[0]["Plan"])


@pytest.mark.parametrize("name", ["docs", "notes"])
async def test_a_batch_reads_its_own_rows_only(installed: Path, name: str) -> None:
    cfg = config.load(installed, env={"FAKE_API_KEY": "k"})
    p = next(p for p in cfg.pipelines if p.name == name)
    conn = await db.connect(cfg.database.url)
    try:
        await register_vector(conn)
        rendered = await app.checked_pipeline(conn, p)
        store = store_for(conn, p, rendered)  # type: ignore[arg-type]
        ids = range(ROWS // 2, ROWS // 2 + BATCH)
        keys = [json.dumps({"id": i}) for i in ids]
        hashes = [r[0] for r in await conn.fetch(f"SELECT syncer.{name}__hash(s) FROM {name} s "
                                                 "WHERE id = ANY($1::bigint[]) ORDER BY id",
                                                 list(ids))]  # fmt: skip
        vectors = [Vector(np.full(8, 0.5, dtype=np.float32))] * BATCH

        fetched = await explain(conn, rendered["rows_fetch"], keys)
        # A backfill page from the middle of the table (keyset pagination).
        paged = await explain(conn, rendered["backfill_next"], keys[0], BATCH, False)
        async with conn.transaction():
            await conn.execute(store.begin)
            if p.target == "column":
                written = await explain(
                    conn, rendered["vectors_write_column"], keys, vectors, hashes
                )
            else:
                written = await explain(
                    conn, rendered["vectors_write_table"], keys, vectors, hashes
                )
                deleted = await explain(conn, rendered["vectors_delete_table"], keys)
                assert max(deleted.values()) <= 2 * BATCH, deleted
    finally:
        await conn.close()
    # One row per key from each table (the source, and the side table for a table target);
    # reading the whole table would be ROWS.
    assert fetched and max(fetched.values()) <= BATCH, fetched
    assert written and max(written.values()) <= BATCH, written
    assert max(paged.values()) <= BATCH, paged
