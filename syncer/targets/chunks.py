"""The chunks target: each document cut into chunks, one row and one vector per chunk.

A document is written whole, in one statement, under its hash: the chunks that no longer
exist are deleted, changed ones written, unchanged ones kept (sql/targets/chunks.sql). A
chunk whose text is already stored (for this document, or with `dedupe = "global"` for
any) takes the stored vector instead of a new one: an edit pays only for what it changed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import asyncpg
from pgvector import HalfVector, Vector

from syncer.errors import SchemaError
from syncer.schema.catalog import Column, key_columns, table_columns, where
from syncer.schema.names import ident, key_eq, split_table
from syncer.sqlfiles import query
from syncer.targets.base import Connection, Created, check_vector_column, render_ddl

if TYPE_CHECKING:
    from syncer.chunking import Chunk
    from syncer.config import PipelineConfig
    from syncer.schema.render import PipelineSQL
    from syncer.targets.store import SourceRow, WriteBatch


@dataclass(eq=False)  # compared and hashed by identity: one object per document on its way
class ChunkDoc:
    """One document on its way: its chunks, their hashes (of the text as embedded), the
    vectors it has so far (a hash without one reuses the stored vector) and what it waits
    for."""

    key: str
    hash: bytes  # the document's: the row's text hash these chunks were cut from
    ids: list[int]  # its queue items
    chunks: list[Chunk]
    hashes: list[bytes]
    texts: list[str]  # as embedded (the template applied)
    vectors: dict[bytes, Any] = field(default_factory=dict)
    missing: set[bytes] = field(default_factory=set)
    failed: bool = False


@dataclass(frozen=True)
class ChunksTarget:
    p: PipelineConfig

    hash_column = "doc_hash"
    needs_deletes = True  # chunks outlive their source row unless deleted
    writes_source = False
    # A document is many chunks: the window of items in flight is cut by this (a guess of
    # chunks per document), so that it holds about as many API inputs as for rows.
    inputs_per_item = 16
    statements_file = "targets/chunks.sql"
    statements = ("vectors_write_chunks", "vectors_delete_chunks", "chunks_stored")

    def check_config(self) -> None:
        p = self.p
        if not p.target_table:
            raise ValueError("target = 'chunks' needs target_table")
        for c in p.copy_columns:
            if c in p.text:
                raise ValueError(
                    f"copy_columns: {c!r} is a text column (its text is in the chunks already)"
                )
            if p.key and c in p.key:
                raise ValueError(f"copy_columns: {c!r} is a key column (the chunk table has it)")
        if len(set(p.copy_columns)) != len(p.copy_columns):
            raise ValueError("copy_columns: a column is named twice")

    @property
    def _name(self) -> tuple[str, str]:
        assert self.p.target_table is not None  # check_config
        return split_table(self.p.target_table)

    def values(self, keys: Sequence[str]) -> dict[str, str]:
        table = ident(*self._name)
        copy = [ident(c) for c in self.p.copy_columns]
        # The document is current when its first chunk holds the row's hash and copies its
        # columns (all its chunks are written together): a change of a copied column alone
        # reads as a changed document whose chunks all reuse their vectors.
        same_copies = "".join(f" AND t.{c} IS NOT DISTINCT FROM s.{c}" for c in copy)
        return {
            "target_table": table,
            "target_join": (
                f"LEFT JOIN LATERAL (SELECT t.doc_hash FROM {table} t "
                f"WHERE {key_eq('t', 's', keys)} AND t.chunk_index = 0{same_copies} OFFSET 0) t "
                "ON true"
            ),
            "stored_hash": "t.doc_hash",
            "target_truncate": f"TRUNCATE {table};",
            "copy_cols": "".join(f", {c}" for c in copy),
            "copy_cols_s": "".join(f", s.{c}" for c in copy),
            "copy_cols_d": "".join(f", d.{c}" for c in copy),
            "copy_cols_t": "".join(f", t.{c}" for c in copy),
            "copy_cols_excluded": "".join(f", EXCLUDED.{c}" for c in copy),
            "copy_set": "".join(f", {c} = EXCLUDED.{c}" for c in copy),
            "key_cols_x": ", ".join(f"x.{ident(k)}" for k in keys),
            "reuse_scope": "" if self.p.dedupe == "global" else f"{key_eq('c', 'i', keys)} AND",
        }

    def _ddl(self, name: str, keys: Sequence[Column] = (), copies: Sequence[Column] = ()) -> str:
        p = self.p
        schema, table = self._name
        values = {
            "target_table": ident(schema, table),
            "hash_index": ident(f"{table}_chunk_hash"[:63]),
            "column": ident(p.column),
            "vector_type": p.vector_type,
            "dimensions": str(p.dimensions),
            "key_defs_not_null": ", ".join(f"{ident(c.name)} {c.type} NOT NULL" for c in keys),
            "key_cols": ", ".join(ident(c.name) for c in keys),
            "copy_defs": "".join(f", {ident(c.name)} {c.type}" for c in copies),
        }
        return render_ddl(self.statements_file, name, values)

    async def _source_columns(self, conn: asyncpg.Connection) -> dict[str, Column]:
        """The source's columns, after checking the ones the template and copies name."""
        p = self.p
        columns = await table_columns(conn, p.schema_name, p.table_name)
        for key, names in (("template", p.template_columns), ("copy_columns", p.copy_columns)):
            for c in names:
                if c not in columns:
                    raise SchemaError(
                        f"{where(p, key)}: column {c!r} does not exist in {p.table!r} "
                        f"(columns: {', '.join(columns)})"
                    )
        keys = {c.name for c in await key_columns(conn, p)}
        if clash := [c for c in p.copy_columns if c in keys]:
            raise SchemaError(
                f"{where(p, 'copy_columns')}: {clash[0]!r} is a key column (the chunk table has it)"
            )
        return columns

    async def check(self, conn: asyncpg.Connection) -> bool:
        p, (schema, table) = self.p, self._name
        source = await self._source_columns(conn)
        columns = await table_columns(conn, schema, table)
        if not columns:
            return False
        want: dict[str, str] = {
            **{c.name: c.type for c in await key_columns(conn, p)},
            "chunk_index": "integer",
            "chunk": "text",
            "start_char": "integer",
            "end_char": "integer",
            "chunk_hash": "bytea",
            "doc_hash": "bytea",
            "embedded_at": "timestamp with time zone",
            **{c: source[c].type for c in p.copy_columns},
        }
        for name, type_ in want.items():
            have = columns.get(name)
            if have is None or have.type != type_:
                found = "missing" if have is None else f"of type {have.type}"
                raise SchemaError(
                    f"{where(p, 'target_table')}: chunk table {p.target_table!r} exists but its "
                    f"column {name!r} is {found}, not {type_} (drop it, or choose another "
                    "target_table)"
                )
        if p.column not in columns:
            raise SchemaError(
                f"{where(p, 'column')}: chunk table {p.target_table!r} has no column {p.column!r}"
            )
        check_vector_column(p, str(p.target_table), columns[p.column])
        return True

    async def create(self, conn: asyncpg.Connection, keys: Sequence[Column]) -> Created:
        exists = await self.check(conn)
        if not exists:
            source = await self._source_columns(conn)
            copies = [source[c] for c in self.p.copy_columns]
            await conn.execute(self._ddl("chunks_create", keys, copies))
        if self.p.dedupe == "global":
            await conn.execute(self._ddl("chunks_hash_index"))
        return Created(table=not exists)

    async def drop(
        self, conn: asyncpg.Connection, created: Created, keep_vectors: bool
    ) -> list[str]:
        if not created.table or keep_vectors:
            return []
        await conn.execute(self._ddl("chunks_drop"))
        return [f"dropped table {self.p.target_table}"]

    def clear(self, batch: WriteBatch, row: SourceRow) -> None:
        batch.delete_keys.append(row.key)

    async def stored(
        self, conn: Connection, sql: PipelineSQL, keys: Sequence[str], hashes: Sequence[bytes]
    ) -> set[tuple[str | None, bytes]]:
        """The chunk texts that need no API call: (key, hash) stored for these documents
        and, with global dedupe, (None, hash) for those of `hashes` any document has."""
        everywhere = list(hashes) if self.p.dedupe == "global" else []
        rows = await conn.fetch(sql["chunks_stored"], list(keys), everywhere)
        return {(r[0], r[1]) for r in rows}

    async def write(
        self, conn: Connection, sql: PipelineSQL, batch: WriteBatch, vectors: list[Any]
    ) -> int:
        written = 0
        wrap = Vector if self.p.vector_type == "vector" else HalfVector
        for docs in _rounds(batch.docs):
            args: list[list[Any]] = [[], [], [], [], [], [], [], []]
            for doc in docs:
                for c, h in zip(doc.chunks, doc.hashes, strict=True):
                    v = doc.vectors.get(h)
                    args[0].append(doc.key)
                    args[1].append(c.index)
                    args[2].append(c.text if self.p.store_text else None)
                    args[3].append(c.start)
                    args[4].append(c.end)
                    args[5].append(h)
                    args[6].append(doc.hash)
                    args[7].append(None if v is None else wrap(v))
            row = await conn.fetchrow(sql["vectors_write_chunks"], *args)
            assert row is not None
            n, ready, current = row
            written += n
            # A current document that could not be written whole (a stored vector it was
            # to reuse went meanwhile): its items run again, from the start.
            ready, current = set(ready), set(current)
            again = [i for d in docs if d.key in current and d.key not in ready for i in d.ids]
            if again:
                await conn.execute(query("queue_mark_dirty"), again)
            stale = sum(len(d.ids) for d in docs if d.key not in current)
            if stale:
                batch.outcomes["embedded"] -= stale
                batch.outcomes["stale"] += stale
        if batch.delete_keys:
            await conn.execute(sql["vectors_delete_chunks"], batch.delete_keys)
        return written


def _rounds(docs: Sequence[ChunkDoc]) -> list[list[ChunkDoc]]:
    """The documents in groups where each key appears once (a statement may not write one
    row twice: two versions of a document go in two statements, older first)."""
    rounds: list[list[ChunkDoc]] = []
    seen: list[set[str]] = []
    for doc in docs:
        for keys, group in zip(seen, rounds, strict=True):
            if doc.key not in keys:
                keys.add(doc.key)
                group.append(doc)
                break
        else:
            seen.append({doc.key})
            rounds.append([doc])
    return rounds
