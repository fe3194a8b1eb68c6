"""Installs, checks and removes syncer's schema and each pipeline's objects.

The schema's tables come from the numbered migrations (schema.migrations); a pipeline's
functions and triggers are rendered (schema.render) and re-created by every install; its
target's DDL is the target's (syncer.targets).
"""

from __future__ import annotations

import asyncpg

from syncer import sqlfiles, targets
from syncer.config import CaptureConfig, PipelineConfig
from syncer.errors import SchemaError
from syncer.schema.catalog import is_partitioned, key_columns, relation_exists
from syncer.schema.catalog import where as _where
from syncer.schema.migrations import installed_version, migrate
from syncer.schema.names import ident as _ident
from syncer.schema.render import PipelineSQL, render
from syncer.targets import Created


def _sql(name: str) -> str:
    return sqlfiles.blocks("install.sql")[name]


# --- install / uninstall --------------------------------------------------------------------


async def install_schema(conn: asyncpg.Connection) -> list[int]:
    """Create or upgrade syncer's schema; returns the migrations it applied."""
    return await migrate(conn)


async def check_pipeline(conn: asyncpg.Connection, p: PipelineConfig) -> bool:
    """Check the source table, its key and the target against the config, changing nothing;
    True if the target exists."""
    await key_columns(conn, p)
    return await targets.for_pipeline(p).check(conn)


async def install_pipeline(
    conn: asyncpg.Connection, p: PipelineConfig, mode: str = "trigger"
) -> PipelineSQL:
    """Create the target if missing, the text/hash functions and (trigger mode) the
    capture triggers; logical mode drops the triggers a trigger-mode install left."""
    keys = await key_columns(conn, p)
    rendered = render(p, keys)
    async with conn.transaction():
        created = await targets.for_pipeline(p).create(conn, keys)
        partitioned = await is_partitioned(conn, _ident(p.schema_name, p.table_name))
        steps = _INSTALL_STEPS[p.target] if mode == "trigger" else _FUNCTION_STEPS
        if mode == "trigger" and partitioned:
            steps = tuple(_ROW_LEVEL.get(step, step) for step in steps)
        for step in steps:
            await conn.execute(rendered[step])
        if mode != "trigger":
            await drop_triggers(conn, p)
        await conn.execute(
            sqlfiles.query("pipeline_register"),
            p.name,
            p.table,
            p.target,
            p.config_hash(),
            p.fingerprint(),
            created.column,
            created.table,
        )
    return rendered


async def uninstall_pipeline(
    conn: asyncpg.Connection, p: PipelineConfig, keep_vectors: bool
) -> list[str]:
    """Drop the pipeline's triggers and functions, and (unless kept) what install created."""
    row = await conn.fetchrow(sqlfiles.query("pipeline_get"), p.name)
    created = Created(row["created_column"], row["created_table"]) if row else Created()
    async with conn.transaction():
        if await relation_exists(conn, _ident(p.schema_name, p.table_name)):
            await drop_triggers(conn, p)
        return await targets.for_pipeline(p).drop(conn, created, keep_vectors)


async def uninstall_schema(conn: asyncpg.Connection) -> None:
    await conn.execute(_sql("schema_drop"))


async def created_targets(conn: asyncpg.Connection) -> list[str]:
    """What uninstall would drop: the vector columns and side tables install created."""
    if await installed_version(conn) is None:
        return []
    rows = await conn.fetch(_sql("pipeline_created"))
    return [r["name"] for r in rows if r["created_column"] or r["created_table"]]


# --- capture: the steps install runs per capture mode (the capture part's) -----------------


_FUNCTION_STEPS = ("text_function", "hash_function")
_COMMON_STEPS = (
    *_FUNCTION_STEPS,
    "capture_insert_function",
    "capture_update_function",
    "capture_insert_trigger",
    "capture_update_trigger",
)
_INSTALL_STEPS: dict[str, tuple[str, ...]] = {
    "column": _COMMON_STEPS,
    "table": (*_COMMON_STEPS, "capture_delete_function", "capture_delete_trigger"),
}


# A partitioned table's row movement fires only row-level INSERT and DELETE triggers.
_ROW_LEVEL = {
    "capture_insert_function": "capture_insert_row_function",
    "capture_insert_trigger": "capture_insert_row_trigger",
    "capture_delete_function": "capture_delete_row_function",
    "capture_delete_trigger": "capture_delete_row_trigger",
}


async def drop_triggers(conn: asyncpg.Connection, p: PipelineConfig) -> None:
    src = _ident(p.schema_name, p.table_name)
    for kind in ("insert", "update", "delete"):
        await conn.execute(f"DROP TRIGGER IF EXISTS {_ident(f'syncer_{p.name}_{kind}')} ON {src}")


# --- logical mode ---------------------------------------------------------------------------


async def check_logical(
    conn: asyncpg.Connection, pipelines: tuple[PipelineConfig, ...], cap: CaptureConfig
) -> None:
    """What logical capture needs of the server, the role and each source table."""
    level = await conn.fetchval("SHOW wal_level")
    if level != "logical":
        raise SchemaError(
            f"capture.mode = 'logical' needs wal_level = logical (the server has {level!r}): "
            "run ALTER SYSTEM SET wal_level = logical, then restart PostgreSQL"
        )
    row = await conn.fetchrow(
        "SELECT rolname, rolreplication OR rolsuper FROM pg_roles WHERE rolname = current_user"
    )
    assert row is not None
    role, allowed = row[0], row[1]
    if not allowed:
        raise SchemaError(
            f"capture.mode = 'logical': role {role!r} may not read a replication slot: "
            f"ALTER ROLE {_ident(role)} REPLICATION"
        )
    slot = await conn.fetchrow(
        "SELECT plugin, database FROM pg_replication_slots WHERE slot_name = $1", cap.slot
    )
    here = await conn.fetchval("SELECT current_database()")
    if slot is not None and (slot["plugin"] != "pgoutput" or slot["database"] != here):
        raise SchemaError(
            f"capture.slot: a slot named {cap.slot!r} already exists for "
            f"{slot['plugin']} on database {slot['database']!r}: choose another name"
        )
    for p in pipelines:
        keys = [c.name for c in await key_columns(conn, p)]
        kind, identity = await replica_identity(conn, p.schema_name, p.table_name)
        if kind == "f" or (identity is not None and set(identity) == set(keys)):
            continue
        now = {
            "n": "NOTHING",
            "d": "DEFAULT, and it has no primary key",
            "i": f"the index on {identity}",
        }.get(kind, f"DEFAULT (primary key {identity})")
        raise SchemaError(
            f"{_where(p, 'key')}: logical capture needs the key {keys} to be the replica "
            f"identity of {p.table} (it is {now}): ALTER TABLE {_ident(p.schema_name, p.table_name)} "
            "REPLICA IDENTITY USING INDEX <a unique index on the key>, or REPLICA IDENTITY FULL"
        )


async def replica_identity(
    conn: asyncpg.Connection, schema: str, table: str
) -> tuple[str, tuple[str, ...] | None]:
    """The table's replica identity ('d', 'i', 'f' or 'n') and the columns of its index."""
    row = await conn.fetchrow(
        """SELECT c.relreplident::text,
                  (SELECT array_agg(a.attname ORDER BY k.ord)
                   FROM pg_index i
                   CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
                   JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = k.attnum
                   WHERE i.indrelid = c.oid
                     AND CASE c.relreplident WHEN 'd' THEN i.indisprimary
                                             WHEN 'i' THEN i.indisreplident
                                             ELSE false END)
           FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
           WHERE n.nspname = $1 AND c.relname = $2""",
        schema,
        table,
    )
    assert row is not None
    return row[0], tuple(row[1]) if row[1] else None


async def install_publication(
    conn: asyncpg.Connection, pipelines: tuple[PipelineConfig, ...], cap: CaptureConfig
) -> None:
    """The publication of the source tables, each with only the columns syncer reads
    (key and text), so the slot carries nothing else."""
    columns: dict[tuple[str, str], list[str] | None] = {}
    for p in pipelines:
        table = (p.schema_name, p.table_name)
        kind, _ = await replica_identity(conn, *table)
        keys = [c.name for c in await key_columns(conn, p)]
        if kind == "f":  # a column list must hold the whole replica identity: every column
            columns[table] = None
        elif (have := columns.setdefault(table, [])) is not None:
            have += [c for c in (*keys, *p.text) if c not in have]
    entries = ", ".join(
        _ident(*t) + (f" ({', '.join(_ident(c) for c in cols)})" if cols else "")
        for t, cols in columns.items()
    )
    pub = _ident(cap.publication)
    async with conn.transaction():
        if await conn.fetchval(
            "SELECT true FROM pg_publication WHERE pubname = $1", cap.publication
        ):
            await conn.execute(f"ALTER PUBLICATION {pub} SET TABLE {entries}")
            await conn.execute(
                f"ALTER PUBLICATION {pub} SET (publish = 'insert, update, delete', "
                "publish_via_partition_root = true)"
            )
        else:
            await conn.execute(
                f"CREATE PUBLICATION {pub} FOR TABLE {entries} WITH "
                "(publish = 'insert, update, delete', publish_via_partition_root = true)"
            )


async def ensure_slot(conn: asyncpg.Connection, cap: CaptureConfig) -> bool:
    """Create the slot unless it exists; True if it was created. From its creation on,
    every committed change is kept for the reader."""
    if await conn.fetchval("SELECT true FROM pg_replication_slots WHERE slot_name = $1", cap.slot):
        return False
    await conn.execute("SELECT pg_create_logical_replication_slot($1, 'pgoutput')", cap.slot)
    return True


async def drop_logical(conn: asyncpg.Connection, cap: CaptureConfig) -> list[str]:
    """Drop the slot and publication (a forgotten slot keeps WAL forever)."""
    done: list[str] = []
    here = await conn.fetchval("SELECT current_database()")
    slot = await conn.fetchrow(
        "SELECT active_pid, database FROM pg_replication_slots WHERE slot_name = $1", cap.slot
    )
    if slot is not None and slot["database"] == here:
        if slot["active_pid"] is not None:
            raise SchemaError(
                f"capture.slot {cap.slot!r} is being read by a running worker "
                f"(backend pid {slot['active_pid']}): stop the syncer workers first"
            )
        await conn.execute("SELECT pg_drop_replication_slot($1)", cap.slot)
        done.append(f"dropped logical replication slot {cap.slot}")
    if await conn.fetchval("SELECT true FROM pg_publication WHERE pubname = $1", cap.publication):
        await conn.execute(f"DROP PUBLICATION {_ident(cap.publication)}")
        done.append(f"dropped publication {cap.publication}")
    return done


async def check_slot(conn: asyncpg.Connection, cap: CaptureConfig) -> None:
    """Before a logical-mode run: the slot and publication install makes are there."""
    if not await conn.fetchval(
        "SELECT true FROM pg_replication_slots WHERE slot_name = $1", cap.slot
    ):
        raise SchemaError(
            f"capture.mode = 'logical', but there is no replication slot {cap.slot!r}: "
            "run `syncer install`"
        )
    if not await conn.fetchval(
        "SELECT true FROM pg_publication WHERE pubname = $1", cap.publication
    ):
        raise SchemaError(
            f"capture.mode = 'logical', but there is no publication {cap.publication!r}: "
            "run `syncer install`"
        )


async def slot_lag(conn: asyncpg.Connection, cap: CaptureConfig) -> asyncpg.Record | None:
    """The slot's state for `status`: is a worker reading it, and how much WAL it holds."""
    return await conn.fetchrow(
        """SELECT active,
                  pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::bigint AS behind,
                  pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint AS retained
           FROM pg_replication_slots WHERE slot_name = $1""",
        cap.slot,
    )
