"""The table target: a side table keyed like the source, with the vector and its hash."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import asyncpg

from syncer.errors import SchemaError
from syncer.schema.catalog import Column, table_columns, where
from syncer.schema.names import ident, key_eq, split_table
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
class TableTarget:
    p: PipelineConfig

    hash_column = "content_hash"
    needs_deletes = True  # a side-table row outlives its source row unless deleted
    inputs_per_item = 1  # API inputs one queue item makes (sizes the claim window)
    writes_source = False
    statements_file = "targets/table.sql"
    statements = ("vectors_write_table", "vectors_delete_table")

    def check_config(self) -> None:
        if not self.p.target_table:
            raise ValueError("target = 'table' needs target_table")

    @property
    def _name(self) -> tuple[str, str]:
        assert self.p.target_table is not None  # check_config
        return split_table(self.p.target_table)

    def values(self, keys: Sequence[str]) -> dict[str, str]:
        table = ident(*self._name)
        return {
            "target_table": table,
            # LATERAL (kept apart by OFFSET 0): one index probe per source row. A plain join
            # let the planner scan the side table from its start for every backfill page.
            "target_join": (
                f"LEFT JOIN LATERAL (SELECT t.content_hash FROM {table} t "
                f"WHERE {key_eq('t', 's', keys)} OFFSET 0) t ON true"
            ),
            "stored_hash": "t.content_hash",
            # The source was truncated: so is the side table (the user's truncate is quick).
            "target_truncate": f"TRUNCATE {table};",
        }

    def _ddl(self, name: str, keys: Sequence[Column] = ()) -> str:
        p = self.p
        values = {
            "target_table": ident(*self._name),
            "column": ident(p.column),
            "vector_type": p.vector_type,
            "dimensions": str(p.dimensions),
            "key_defs_not_null": ", ".join(f"{ident(c.name)} {c.type} NOT NULL" for c in keys),
            "key_cols": ", ".join(ident(c.name) for c in keys),
        }
        return render_ddl(self.statements_file, name, values)

    async def check(self, conn: asyncpg.Connection) -> bool:
        p, (schema, table) = self.p, self._name
        columns = await table_columns(conn, schema, table)
        if not columns:
            return False
        if p.column not in columns:
            raise SchemaError(
                f"{where(p, 'column')}: side table {p.target_table!r} has no column {p.column!r}"
            )
        check_vector_column(p, str(p.target_table), columns[p.column])
        for needed in ("content_hash", "embedded_at"):
            if needed not in columns:
                raise SchemaError(
                    f"{where(p, 'target_table')}: {p.target_table!r} exists but has no {needed} "
                    "column; it was not created by syncer (choose another target_table)"
                )
        return True

    async def create(self, conn: asyncpg.Connection, keys: Sequence[Column]) -> Created:
        if await self.check(conn):
            return Created()
        await conn.execute(self._ddl("table_create", keys))
        return Created(table=True)

    async def drop(
        self, conn: asyncpg.Connection, created: Created, keep_vectors: bool
    ) -> list[str]:
        if not created.table or keep_vectors:
            return []
        await conn.execute(self._ddl("table_drop"))
        return [f"dropped table {self.p.target_table}"]

    def clear(self, batch: WriteBatch, row: SourceRow) -> None:
        batch.delete_keys.append(row.key)

    async def write(
        self, conn: Connection, sql: PipelineSQL, batch: WriteBatch, vectors: list[Any]
    ) -> int:
        written = 0
        if batch.keys:
            status = await conn.execute(
                sql["vectors_write_table"], batch.keys, vectors, batch.hashes
            )
            written = rows_affected(status)
        if batch.delete_keys:
            await conn.execute(sql["vectors_delete_table"], batch.delete_keys)
        return written
