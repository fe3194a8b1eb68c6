"""Where vectors are stored, one module per kind behind the Target protocol (base.py).

- `column`: a vector column (and its hash) added to the source table.
- `table`: a side table keyed like the source table.
- `chunks`: a chunk table, each document cut in chunks with a vector each.

A new kind is a new module here, its statements in sql/targets/, and a line in KINDS.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import asyncpg

from syncer.targets.base import Created, Target
from syncer.targets.chunks import ChunkDoc, ChunksTarget
from syncer.targets.column import ColumnTarget
from syncer.targets.store import SourceRow, VectorStore, WriteBatch
from syncer.targets.table import TableTarget

if TYPE_CHECKING:
    from syncer.config import PipelineConfig
    from syncer.schema.render import PipelineSQL

__all__ = [
    "KINDS",
    "ChunkDoc",
    "ChunksTarget",
    "Created",
    "SourceRow",
    "Target",
    "VectorStore",
    "WriteBatch",
    "for_pipeline",
    "store_for",
]

KINDS: dict[str, type[ColumnTarget] | type[TableTarget] | type[ChunksTarget]] = {
    "column": ColumnTarget,
    "table": TableTarget,
    "chunks": ChunksTarget,
}


def for_pipeline(p: PipelineConfig) -> Target:
    return KINDS[p.target](p)


def store_for(
    pool: asyncpg.Pool, p: PipelineConfig, rendered: PipelineSQL, mark_own: bool = False
) -> VectorStore:
    """The pipeline's vector store; `mark_own`: logical mode (writes to a watched table are
    marked so the slot reader skips them)."""
    return VectorStore(pool, rendered, for_pipeline(p), p.vector_type, mark_own)
