"""What the database has: a table's columns and unique keys, and a pipeline's key columns.

The statements are the named blocks of sql/catalog.sql.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import asyncpg

from syncer import sqlfiles
from syncer.errors import SchemaError

if TYPE_CHECKING:
    from syncer.config import PipelineConfig


@dataclass(frozen=True)
class Column:
    name: str
    type: str
    not_null: bool


def _sql(name: str) -> str:
    return sqlfiles.blocks("catalog.sql")[name]


def where(p: PipelineConfig, key: str) -> str:
    """Where an error is, for its message: the pipeline and its config key."""
    return f"pipeline {p.name!r} ({key})"


async def table_columns(conn: asyncpg.Connection, schema: str, table: str) -> dict[str, Column]:
    rows = await conn.fetch(_sql("table_columns"), schema, table)
    return {r[0]: Column(r[0], r[1], r[2]) for r in rows}


async def unique_keys(conn: asyncpg.Connection, schema: str, table: str) -> list[tuple[str, ...]]:
    """Column lists of the table's unique, non-partial, plain-column indexes (PK first)."""
    rows = await conn.fetch(_sql("table_unique_keys"), schema, table)
    return [tuple(r["cols"]) for r in rows]


async def is_partitioned(conn: asyncpg.Connection, qualified: str) -> bool:
    """`qualified`: the table's quoted, qualified name."""
    return bool(await conn.fetchval(_sql("table_partitioned"), qualified))


async def relation_exists(conn: asyncpg.Connection, qualified: str) -> bool:
    """`qualified`: the relation's quoted, qualified name."""
    return bool(await conn.fetchval(_sql("relation_exists"), qualified))


async def key_columns(conn: asyncpg.Connection, p: PipelineConfig) -> tuple[Column, ...]:
    """Check the source table and text columns; return the key columns with their types."""
    columns = await table_columns(conn, p.schema_name, p.table_name)
    if not columns:
        raise SchemaError(f"{where(p, 'table')}: table {p.table!r} does not exist")
    for c in p.text:
        if c not in columns:
            raise SchemaError(
                f"{where(p, 'text')}: column {c!r} does not exist in {p.table!r} "
                f"(columns: {', '.join(columns)})"
            )
    uniques = await unique_keys(conn, p.schema_name, p.table_name)
    if p.key is None:
        if not uniques:
            raise SchemaError(
                f"{where(p, 'key')}: table {p.table!r} has no primary key; name unique columns in key"
            )
        key = uniques[0]
    else:
        key = p.key
        for c in key:
            if c not in columns:
                raise SchemaError(f"{where(p, 'key')}: column {c!r} does not exist in {p.table!r}")
        if not any(set(u) == set(key) for u in uniques):
            raise SchemaError(
                f"{where(p, 'key')}: columns {list(key)} are not unique in {p.table!r} "
                "(a primary key or unique index on exactly these columns is needed)"
            )
        nullable = [c for c in key if not columns[c].not_null]
        if nullable:
            raise SchemaError(f"{where(p, 'key')}: key columns {nullable} must be NOT NULL")
    return tuple(columns[c] for c in key)
