"""What every target is: the Target protocol, and the checks and SQL helpers they share."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import asyncpg

from syncer import sqlfiles
from syncer.errors import SchemaError
from syncer.schema.catalog import Column, where

if TYPE_CHECKING:
    from syncer.config import PipelineConfig
    from syncer.schema.render import PipelineSQL
    from syncer.targets.store import SourceRow, WriteBatch

Connection = asyncpg.Connection | asyncpg.pool.PoolConnectionProxy


@dataclass(frozen=True)
class Created:
    """What install created for a pipeline (so uninstall removes that and no user data)."""

    column: bool = False
    table: bool = False


class Target(Protocol):
    """Where one pipeline's vectors live: its DDL, its statements, what 'cleared' means."""

    @property
    def hash_column(self) -> str:
        """The column that holds the hash of the text behind each vector."""

    @property
    def needs_deletes(self) -> bool:
        """Must it hear of deleted source rows? (A column goes with its row; a side-table
        row does not: the delete trigger and the slot's deletes are for this.)"""

    @property
    def inputs_per_item(self) -> int:
        """About how many API inputs one queue item makes (a row: 1; a document: many)."""

    @property
    def writes_source(self) -> bool:
        """Do its writes update the watched source table (logical mode marks them)?"""

    @property
    def statements(self) -> tuple[str, ...]:
        """Its statements in sql/targets/, rendered with the pipeline's (schema.render)."""

    @property
    def statements_file(self) -> str: ...

    def check_config(self) -> None:
        """Raise ValueError for a config key this kind needs or refuses."""

    def values(self, keys: Sequence[str]) -> dict[str, str]:
        """Its placeholders of the pipeline's statements (target_join, stored_hash, ...)."""

    async def check(self, conn: asyncpg.Connection) -> bool:
        """Does it exist? Raise SchemaError if it does but does not fit the config."""

    async def create(self, conn: asyncpg.Connection, keys: Sequence[Column]) -> Created:
        """Create it if missing (checked first); inside install's transaction."""

    async def drop(
        self, conn: asyncpg.Connection, created: Created, keep_vectors: bool
    ) -> list[str]:
        """Drop what install created unless the vectors are kept; says what it dropped."""

    def clear(self, batch: WriteBatch, row: SourceRow) -> None:
        """The row is gone or has no text: its vector must go too."""

    async def write(
        self, conn: Connection, sql: PipelineSQL, batch: WriteBatch, vectors: list[Any]
    ) -> int:
        """Write the batch's vectors and clears; returns the vectors written."""


def render_ddl(file: str, name: str, values: dict[str, str]) -> str:
    return sqlfiles.blocks(file)[name].format(**values)


def rows_affected(status: str) -> int:
    """The row count of a command status ('UPDATE 12', 'INSERT 0 12')."""
    return int(status.split()[-1])


_VEC_RE = re.compile(r"^(vector|halfvec)(?:\((\d+)\))?$")


def check_vector_column(p: PipelineConfig, table: str, col: Column) -> None:
    m = _VEC_RE.match(col.type)
    want = f"{p.vector_type}({p.dimensions})"
    if not m or m.group(1) != p.vector_type or m.group(2) != str(p.dimensions):
        raise SchemaError(
            f"{where(p, 'column')}: {table}.{col.name} is {col.type}, but the config says "
            f"{want} (vector_type, dimensions)"
        )
