"""Installs, checks and removes syncer's objects; renders each pipeline's SQL.

The pipeline's identifiers come from the config and are always quoted with
psycopg.sql.Identifier before they reach a statement.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import asyncpg
from psycopg import sql

from syncer import sqlfiles
from syncer.config import PipelineConfig, split_table
from syncer.errors import SchemaError

SCHEMA_VERSION = 2


@dataclass(frozen=True)
class Column:
    name: str
    type: str
    not_null: bool


@dataclass(frozen=True)
class PipelineSQL:
    """Every per-pipeline statement, rendered once with quoted identifiers."""

    name: str
    statements: dict[str, str]
    keys: tuple[str, ...]

    def __getitem__(self, name: str) -> str:
        return self.statements[name]


def _ident(*parts: str) -> str:
    return sql.Identifier(*parts).as_string(None)


def _lit(value: str) -> str:
    return sql.Literal(value).as_string(None)


def render(p: PipelineConfig, key_columns: tuple[Column, ...]) -> PipelineSQL:
    keys = [c.name for c in key_columns]

    def cols(alias: str) -> str:
        return ", ".join(f"{alias}.{_ident(k)}" for k in keys)

    def eq(a: str, b: str) -> str:
        return " AND ".join(f"{a}.{_ident(k)} = {b}.{_ident(k)}" for k in keys)

    def key_json(alias: str) -> str:
        args = ", ".join(f"{_lit(k)}, {alias}.{_ident(k)}" for k in keys)
        return f"pg_catalog.jsonb_build_object({args})"

    def fn(suffix: str) -> str:
        return _ident("syncer", f"{p.name}__{suffix}")

    def changed(columns: list[str], cast: str = "") -> list[str]:
        return [f"OLD.{_ident(c)}{cast} IS DISTINCT FROM NEW.{_ident(c)}{cast}" for c in columns]

    key_defs = ", ".join(f"{_ident(c.name)} {c.type}" for c in key_columns)
    table_target = p.target == "table"
    target_table = _ident(*split_table(p.target_table)) if p.target_table else ""
    values = {
        "src": _ident(p.schema_name, p.table_name),
        "pipeline": _lit(p.name),
        "fingerprint": _lit(p.fingerprint() + ":"),
        "text_fn": fn("text"),
        "hash_fn": fn("hash"),
        "text_parts": ", ".join(f"NULLIF(s.{_ident(c)}::text, '')" for c in p.text),
        "capture_insert_fn": fn("capture_insert"),
        "capture_update_fn": fn("capture_update"),
        "capture_delete_fn": fn("capture_delete"),
        "capture_insert_row_fn": fn("capture_insert_row"),
        "capture_delete_row_fn": fn("capture_delete_row"),
        "has_text_new": " OR ".join(f"NEW.{_ident(c)}::text <> ''" for c in p.text),
        "insert_trigger": _ident(f"syncer_{p.name}_insert"),
        "update_trigger": _ident(f"syncer_{p.name}_update"),
        "delete_trigger": _ident(f"syncer_{p.name}_delete"),
        "key_json_n": key_json("n"),
        "key_json_o": key_json("o"),
        "key_json_p": key_json("p"),
        "key_json_r": key_json("r"),
        # The same as {text_fn}(n) IS NOT NULL (some column has non-empty text), without
        # composing the text: the insert trigger tests every inserted row.
        "has_text_n": " OR ".join(f"n.{_ident(c)}::text <> ''" for c in p.text),
        "key_json_new": key_json("NEW"),
        "key_json_old": key_json("OLD"),
        "key_changed": " OR ".join(changed(keys)),
        # Compared as text: the composed text is made of the columns' text forms, and a
        # column type without an equality operator (json) compares all the same.
        "text_or_key_changed": " OR ".join(changed(list(p.text), "::text") + changed(keys)),
        "nobody_awake": (
            "coalesce(pg_sequence_last_value('syncer.awake_until'::regclass), 0)"
            " < date_part('epoch', now())"
        ),
        "key_eq_s_r": eq("s", "r"),
        "key_eq_s_i": eq("s", "i"),
        "key_eq_t_r": eq("t", "r"),
        "key_eq_s_t": eq("s", "t"),
        "key_defs": key_defs,
        "key_cols": ", ".join(_ident(k) for k in keys),
        "key_cols_i": cols("i"),
        "key_cols_s": cols("s"),
        "key_cols_p_desc": ", ".join(f"p.{_ident(k)} DESC" for k in keys),
        "column": _ident(p.column),
        "hash_column": _ident(p.hash_column),
        "vector_type": p.vector_type,
        "target_table": target_table,
        # LATERAL (kept apart by OFFSET 0): one index probe per source row. A plain join
        # let the planner scan the side table from its start for every backfill page.
        "target_join": (
            f"LEFT JOIN LATERAL (SELECT t.content_hash FROM {target_table} t "
            f"WHERE {eq('t', 's')} OFFSET 0) t ON true"
            if table_target
            else ""
        ),
        "stored_hash": "t.content_hash" if table_target else f"s.{_ident(p.hash_column)}",
    }
    after_next = (
        f"({cols('s')}) > (SELECT {cols('r')} FROM jsonb_to_record($1::jsonb) AS r({key_defs}))"
    )
    out: dict[str, str] = {}
    for name, template in sqlfiles.blocks("pipeline.sql").items():
        if name == "backfill_page":
            out["backfill_first"] = template.format(**values, after="$1::jsonb IS NULL")
            out["backfill_next"] = template.format(**values, after=after_next)
        else:
            out[name] = template.format(**values)
    return PipelineSQL(p.name, out, tuple(keys))


# --- introspection -------------------------------------------------------------------------


async def table_columns(conn: asyncpg.Connection, schema: str, table: str) -> dict[str, Column]:
    rows = await conn.fetch(
        """SELECT a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull
           FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
           JOIN pg_namespace n ON n.oid = c.relnamespace
           WHERE n.nspname = $1 AND c.relname = $2 AND a.attnum > 0 AND NOT a.attisdropped
             AND c.relkind IN ('r', 'p')
           ORDER BY a.attnum""",
        schema,
        table,
    )
    return {r[0]: Column(r[0], r[1], r[2]) for r in rows}


async def unique_keys(conn: asyncpg.Connection, schema: str, table: str) -> list[tuple[str, ...]]:
    """Column lists of the table's unique, non-partial, plain-column indexes (PK first)."""
    rows = await conn.fetch(
        """SELECT array_agg(a.attname ORDER BY k.ord) AS cols
           FROM pg_index i
           JOIN pg_class c ON c.oid = i.indrelid
           JOIN pg_namespace n ON n.oid = c.relnamespace
           CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
           JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = k.attnum
           WHERE n.nspname = $1 AND c.relname = $2 AND i.indisunique
             AND i.indpred IS NULL AND 0 <> ALL (i.indkey)
           GROUP BY i.indexrelid, i.indisprimary
           ORDER BY i.indisprimary DESC, i.indexrelid""",
        schema,
        table,
    )
    return [tuple(r["cols"]) for r in rows]


def _where(p: PipelineConfig, key: str) -> str:
    return f"pipeline {p.name!r} ({key})"


async def key_columns(conn: asyncpg.Connection, p: PipelineConfig) -> tuple[Column, ...]:
    """Check the source table and text columns; return the key columns with their types."""
    columns = await table_columns(conn, p.schema_name, p.table_name)
    if not columns:
        raise SchemaError(f"{_where(p, 'table')}: table {p.table!r} does not exist")
    for c in p.text:
        if c not in columns:
            raise SchemaError(
                f"{_where(p, 'text')}: column {c!r} does not exist in {p.table!r} "
                f"(columns: {', '.join(columns)})"
            )
    uniques = await unique_keys(conn, p.schema_name, p.table_name)
    if p.key is None:
        if not uniques:
            raise SchemaError(
                f"{_where(p, 'key')}: table {p.table!r} has no primary key; name unique columns in key"
            )
        key = uniques[0]
    else:
        key = p.key
        for c in key:
            if c not in columns:
                raise SchemaError(f"{_where(p, 'key')}: column {c!r} does not exist in {p.table!r}")
        if not any(set(u) == set(key) for u in uniques):
            raise SchemaError(
                f"{_where(p, 'key')}: columns {list(key)} are not unique in {p.table!r} "
                "(a primary key or unique index on exactly these columns is needed)"
            )
        nullable = [c for c in key if not columns[c].not_null]
        if nullable:
            raise SchemaError(f"{_where(p, 'key')}: key columns {nullable} must be NOT NULL")
    return tuple(columns[c] for c in key)


_VEC_RE = re.compile(r"^(vector|halfvec)(?:\((\d+)\))?$")


def _check_vector_column(p: PipelineConfig, where: str, col: Column) -> None:
    m = _VEC_RE.match(col.type)
    want = f"{p.vector_type}({p.dimensions})"
    if not m or m.group(1) != p.vector_type or m.group(2) != str(p.dimensions):
        raise SchemaError(
            f"{_where(p, 'column')}: {where}.{col.name} is {col.type}, but the config says "
            f"{want} (vector_type, dimensions)"
        )


async def check_target(conn: asyncpg.Connection, p: PipelineConfig) -> tuple[bool, bool]:
    """Check the target against the config. Returns (column exists, side table exists)."""
    if p.target == "column":
        columns = await table_columns(conn, p.schema_name, p.table_name)
        if p.column in columns:
            _check_vector_column(p, p.table, columns[p.column])
            h = columns.get(p.hash_column)
            if h is not None and h.type != "bytea":
                raise SchemaError(
                    f"{_where(p, 'column')}: {p.hash_column} must be bytea, is {h.type}"
                )
            if p.column in p.text:
                raise SchemaError(
                    f"{_where(p, 'column')}: the vector column cannot be a text column"
                )
            return True, False
        return False, False
    assert p.target_table is not None
    schema, table = split_table(p.target_table)
    columns = await table_columns(conn, schema, table)
    if not columns:
        return False, False
    if p.column not in columns:
        raise SchemaError(
            f"{_where(p, 'column')}: side table {p.target_table!r} has no column {p.column!r}"
        )
    _check_vector_column(p, p.target_table, columns[p.column])
    for needed in ("content_hash", "embedded_at"):
        if needed not in columns:
            raise SchemaError(
                f"{_where(p, 'target_table')}: {p.target_table!r} exists but has no {needed} "
                "column; it was not created by syncer (choose another target_table)"
            )
    return False, True


# --- install / uninstall --------------------------------------------------------------------


async def install_schema(conn: asyncpg.Connection) -> None:
    # One installer at a time; the lock ends with the transaction.
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext('syncer.install'))")
        await conn.execute(sqlfiles.read("schema.sql"))


async def installed_version(conn: asyncpg.Connection) -> int | None:
    exists = await conn.fetchval("SELECT to_regclass('syncer.schema_version') IS NOT NULL")
    if not exists:
        return None
    v = await conn.fetchval("SELECT max(version) FROM syncer.schema_version")
    return int(v) if v is not None else None


# The capture source's part of installing or uninstalling a pipeline (syncer.capture),
# run inside the pipeline's transaction.
InstallCapture = Callable[[asyncpg.Connection, PipelineConfig, PipelineSQL], Awaitable[None]]
UninstallCapture = Callable[[asyncpg.Connection, PipelineConfig], Awaitable[None]]


async def install_pipeline(
    conn: asyncpg.Connection, p: PipelineConfig, capture: InstallCapture
) -> PipelineSQL:
    """Create the target if missing, the text/hash functions and, through `capture`, what
    the capture source needs of the pipeline (trigger mode: the capture triggers)."""
    keys = await key_columns(conn, p)
    rendered = render(p, keys)
    async with conn.transaction():
        has_column, has_table = await check_target(conn, p)
        created_column = created_table = False
        if p.target == "column" and not has_column:
            await conn.execute(
                f"ALTER TABLE {_ident(p.schema_name, p.table_name)} "
                f"ADD COLUMN {_ident(p.column)} {p.vector_type}({p.dimensions}), "
                f"ADD COLUMN IF NOT EXISTS {_ident(p.hash_column)} bytea"
            )
            created_column = True
        elif p.target == "column":
            await conn.execute(
                f"ALTER TABLE {_ident(p.schema_name, p.table_name)} "
                f"ADD COLUMN IF NOT EXISTS {_ident(p.hash_column)} bytea"
            )
        if p.target == "table" and not has_table:
            assert p.target_table is not None
            key_defs = ", ".join(f"{_ident(c.name)} {c.type} NOT NULL" for c in keys)
            key_cols = ", ".join(_ident(c.name) for c in keys)
            await conn.execute(
                f"CREATE TABLE {_ident(*split_table(p.target_table))} ({key_defs}, "
                f"{_ident(p.column)} {p.vector_type}({p.dimensions}) NOT NULL, "
                "content_hash bytea NOT NULL, embedded_at timestamptz NOT NULL DEFAULT now(), "
                f"PRIMARY KEY ({key_cols}))"
            )
            created_table = True
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
            created_column,
            created_table,
        )
    return rendered


_FUNCTION_STEPS = ("text_function", "hash_function")


async def uninstall_pipeline(
    conn: asyncpg.Connection, p: PipelineConfig, keep_vectors: bool, capture: UninstallCapture
) -> list[str]:
    """Drop the pipeline's capture (through `capture`: the triggers), and (unless kept)
    what install created."""
    done: list[str] = []
    row = await conn.fetchrow(sqlfiles.query("pipeline_get"), p.name)
    src = _ident(p.schema_name, p.table_name)
    async with conn.transaction():
        if await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", src):
            await capture(conn, p)
            if row and row["created_column"] and not keep_vectors:
                await conn.execute(
                    f"ALTER TABLE {src} DROP COLUMN IF EXISTS {_ident(p.column)}, "
                    f"DROP COLUMN IF EXISTS {_ident(p.hash_column)}"
                )
                done.append(f"dropped column {p.table}.{p.column}")
        if row and row["created_table"] and not keep_vectors and p.target_table:
            await conn.execute(f"DROP TABLE IF EXISTS {_ident(*split_table(p.target_table))}")
            done.append(f"dropped table {p.target_table}")
    return done


async def uninstall_schema(conn: asyncpg.Connection) -> None:
    await conn.execute("DROP SCHEMA IF EXISTS syncer CASCADE")


async def created_targets(conn: asyncpg.Connection) -> list[str]:
    """What uninstall would drop: the vector columns and side tables install created."""
    if await installed_version(conn) is None:
        return []
    rows = await conn.fetch(
        "SELECT name, created_column, created_table FROM syncer.pipelines ORDER BY name"
    )
    return [r["name"] for r in rows if r["created_column"] or r["created_table"]]


# --- backfill -------------------------------------------------------------------------------


async def backfill(
    conn: asyncpg.Connection,
    rendered: PipelineSQL,
    everything: bool,
    page_size: int = 5000,
    progress: Callable[[int, int], None] | None = None,
) -> int:
    """Enqueue stale or missing rows page by page; each page commits on its own."""
    last: str | None = None
    enqueued = scanned = 0
    while True:
        stmt = rendered["backfill_first"] if last is None else rendered["backfill_next"]
        row = await conn.fetchrow(stmt, last, page_size, everything)
        assert row is not None
        n_enq, n_page, last = int(row[0]), int(row[1]), row[2]
        enqueued += n_enq
        scanned += n_page
        if n_enq:
            await conn.execute("SELECT pg_notify('syncer', $1)", rendered.name)
        if progress:
            progress(scanned, enqueued)
        if n_page < page_size:
            return enqueued
