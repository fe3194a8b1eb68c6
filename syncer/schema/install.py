"""Installs, checks and removes syncer's schema and each pipeline's objects.

The schema's tables come from the numbered migrations (schema.migrations); a pipeline's
functions and triggers are rendered (schema.render) and re-created by every install; its
target's DDL is the target's (syncer.targets).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import asyncpg

from syncer import sqlfiles, targets
from syncer.config import PipelineConfig
from syncer.schema.catalog import key_columns, relation_exists
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


# What the capture source does to a pipeline, inside the transaction that installs or
# uninstalls it (syncer.capture: the triggers, or nothing in logical mode).
InstallCapture = Callable[[asyncpg.Connection, PipelineConfig, PipelineSQL], Awaitable[None]]
UninstallCapture = Callable[[asyncpg.Connection, PipelineConfig], Awaitable[None]]

# The text and hash functions: every pipeline's, whatever captures its changes.
_FUNCTION_STEPS = ("text_function", "hash_function")


async def install_pipeline(
    conn: asyncpg.Connection, p: PipelineConfig, capture: InstallCapture
) -> PipelineSQL:
    """Create the target if missing, the text/hash functions and, through `capture`, what
    the capture source needs of the pipeline (trigger mode: the capture triggers)."""
    keys = await key_columns(conn, p)
    rendered = render(p, keys)
    async with conn.transaction():
        created = await targets.for_pipeline(p).create(conn, keys)
        for step in _FUNCTION_STEPS:
            await conn.execute(rendered[step])
        await capture(conn, p, rendered)
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
    conn: asyncpg.Connection, p: PipelineConfig, keep_vectors: bool, capture: UninstallCapture
) -> list[str]:
    """Drop the pipeline's capture (through `capture`: the triggers), and (unless kept)
    what install created."""
    row = await conn.fetchrow(sqlfiles.query("pipeline_get"), p.name)
    created = Created(row["created_column"], row["created_table"]) if row else Created()
    async with conn.transaction():
        if await relation_exists(conn, _ident(p.schema_name, p.table_name)):
            await capture(conn, p)
        return await targets.for_pipeline(p).drop(conn, created, keep_vectors)


async def uninstall_schema(conn: asyncpg.Connection) -> None:
    await conn.execute(_sql("schema_drop"))


async def created_targets(conn: asyncpg.Connection) -> list[str]:
    """What uninstall would drop: the vector columns and side tables install created."""
    if await installed_version(conn) is None:
        return []
    rows = await conn.fetch(_sql("pipeline_created"))
    return [r["name"] for r in rows if r["created_column"] or r["created_table"]]
