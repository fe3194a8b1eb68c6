"""`syncer chunks preview`: how one row splits, and which chunks an embedding would send."""

from __future__ import annotations

from dataclasses import dataclass

import orjson

from syncer.app import checked_pipeline
from syncer.config import Config
from syncer.db import connect
from syncer.errors import ConfigError
from syncer.providers.tokens import estimate_tokens
from syncer.targets.chunks import ChunksTarget
from syncer.targets.store import SourceRow
from syncer.worker.chunks import chunk_hash, compose, splitter_for


@dataclass(frozen=True)
class ChunkLine:
    index: int
    start: int
    end: int
    units: int
    tokens: int  # estimated, of the text as embedded
    stored: bool  # its vector is stored already: no API call
    preview: str


@dataclass(frozen=True)
class Preview:
    key: str
    present: bool
    current: bool  # the stored chunks are of this very text
    stored_chunks: int
    chunks: list[ChunkLine]

    @property
    def to_embed(self) -> int:
        return sum(not c.stored for c in self.chunks)


async def preview(cfg: Config, pipeline: str, key: str) -> Preview:
    p = cfg.pipeline(pipeline)
    if p.target != "chunks":
        raise ConfigError(f"pipeline {p.name!r} has target = {p.target!r}, not 'chunks'")
    try:
        key_doc = orjson.loads(key)
    except orjson.JSONDecodeError:
        raise ConfigError(f"--key: not JSON: {key!r} (like '{{\"id\": 42}}')") from None
    conn = await connect(cfg.database.url)
    try:
        sql = await checked_pipeline(conn, p)
        if not isinstance(key_doc, dict) or set(key_doc) != set(sql.keys):
            raise ConfigError(
                f"--key: must be a JSON object of the key columns {list(sql.keys)} "
                f"(like {orjson.dumps(dict.fromkeys(sql.keys, 42)).decode()})"
            )
        r = (await conn.fetch(sql["rows_fetch"], [orjson.dumps(key_doc).decode()]))[0]
        row = SourceRow(r[0], r[1], r[2], r[3], r[4], r[5])
        target = ChunksTarget(p)
        if not row.present or row.text is None:
            stored = await target.stored(conn, sql, [row.key], [])
            return Preview(row.key, row.present, False, len(stored), [])
        splitter = splitter_for(p, cfg.providers[p.provider])
        chunks = splitter.split(row.text)
        texts = [compose(p, c, row.extra) for c in chunks]
        hashes = [chunk_hash(p, t) for t in texts]
        stored = await target.stored(conn, sql, [row.key], hashes)
    finally:
        await conn.close()
    lines = [
        ChunkLine(
            c.index,
            c.start,
            c.end,
            c.units,
            estimate_tokens(t),
            (row.key, h) in stored or (None, h) in stored,
            c.text[:40].replace("\n", " "),
        )
        for c, t, h in zip(chunks, texts, hashes, strict=True)
    ]
    mine = sum(1 for k, _ in stored if k is not None)
    return Preview(row.key, True, row.hash == row.stored_hash, mine, lines)
