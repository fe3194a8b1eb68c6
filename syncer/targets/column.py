"""The column target: the vector and its hash are columns of the source table itself."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import asyncpg

from syncer.errors import SchemaError
from syncer.schema.catalog import Column, relation_exists, table_columns, where
from syncer.schema.names import ident
from syncer.targets.base import (
    Connection,
    Created,
    check_vector_column,
    render_ddl,
    rows_affected,
)

if TYPE_CHECKING:
    from syncer.config import PipelineConfig
    from syncer.schema.render import PipelineSQL
    from syncer.targets.store import SourceRow, WriteBatch


@dataclass(frozen=True)
class ColumnTarget:
    p: PipelineConfig

    needs_deletes = False  # a deleted row takes its vector with it
    inputs_per_item = 1  # API inputs one queue item makes (sizes the claim window)
    writes_source = True
    statements_file = "targets/column.sql"
    statements = ("vectors_write_column",)

    @property
    def hash_column(self) -> str:
        return f"{self.p.column}_hash"

    def check_config(self) -> None:
        if self.p.target_table:
            raise ValueError("target_table is only used with target = 'table'")

    def values(self, keys: Sequence[str]) -> dict[str, str]:
        hash_column = ident(self.hash_column)
        return {
            "hash_column": hash_column,
            "target_join": "",
            "stored_hash": f"s.{hash_column}",
            "target_truncate": "",  # the vectors went with the rows
        }

    def _ddl(self, name: str) -> str:
        p = self.p
        values = {
            "src": ident(p.schema_name, p.table_name),
            "column": ident(p.column),
            "hash_column": ident(self.hash_column),
            "vector_type": p.vector_type,
            "dimensions": str(p.dimensions),
        }
        return render_ddl(self.statements_file, name, values)

    async def check(self, conn: asyncpg.Connection) -> bool:
        p = self.p
        columns = await table_columns(conn, p.schema_name, p.table_name)
        if p.column not in columns:
            return False
        check_vector_column(p, p.table, columns[p.column])
        h = columns.get(self.hash_column)
        if h is not None and h.type != "bytea":
            raise SchemaError(
                f"{where(p, 'column')}: {self.hash_column} must be bytea, is {h.type}"
            )
        if p.column in p.text:
            raise SchemaError(f"{where(p, 'column')}: the vector column cannot be a text column")
        return True

    async def create(self, conn: asyncpg.Connection, keys: Sequence[Column]) -> Created:
        if await self.check(conn):
            await conn.execute(self._ddl("hash_column_add"))
            return Created()
        await conn.execute(self._ddl("column_add"))
        return Created(column=True)

    async def drop(
        self, conn: asyncpg.Connection, created: Created, keep_vectors: bool
    ) -> list[str]:
        p = self.p
        if not created.column or keep_vectors:
            return []
        if not await relation_exists(conn, ident(p.schema_name, p.table_name)):
            return []  # the table went, and its columns with it
        await conn.execute(self._ddl("column_drop"))
        return [f"dropped column {p.table}.{p.column}"]

    def clear(self, batch: WriteBatch, row: SourceRow) -> None:
        if row.present and row.stored_hash is not None:
            batch.add_vector(row.key, None, None)  # NULL the vector and its hash

    async def write(
        self, conn: Connection, sql: PipelineSQL, batch: WriteBatch, vectors: list[Any]
    ) -> int:
        if not batch.keys:
            return 0
        status = await conn.execute(sql["vectors_write_column"], batch.keys, vectors, batch.hashes)
        return rows_affected(status)
