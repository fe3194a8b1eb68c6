"""Connections: the asyncpg pool with pgvector's binary codecs, sized for a sidecar."""

from __future__ import annotations

from typing import Any

import asyncpg
from pgvector.asyncpg import register_vector

from syncer.config import DatabaseConfig
from syncer.errors import DatabaseError


async def _vector_schema(conn: asyncpg.Connection) -> str | None:
    schema: str | None = await conn.fetchval(
        "SELECT extnamespace::regnamespace::text FROM pg_extension WHERE extname = 'vector'"
    )
    return schema


async def _init(conn: asyncpg.Connection) -> None:
    schema = await _vector_schema(conn)
    if schema is not None:
        await register_vector(conn, schema=schema)


def connect_kwargs() -> dict[str, Any]:
    # Statements are cached per connection; jsonb stays text (keys are opaque to Python).
    return {"server_settings": {"application_name": "syncer"}}


async def connect(url: str) -> asyncpg.Connection:
    try:
        conn: asyncpg.Connection = await asyncpg.connect(url, **connect_kwargs())
    except (OSError, asyncpg.PostgresError) as err:
        raise DatabaseError(
            f"cannot connect to the database ({type(err).__name__}: {err})"
        ) from None
    return conn


async def ensure_vector_extension(conn: asyncpg.Connection) -> None:
    if await _vector_schema(conn) is not None:
        return
    try:
        await conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
    except asyncpg.PostgresError as err:
        raise DatabaseError(
            f"the pgvector extension is not installed and cannot be created: {err} "
            "(ask a superuser to run CREATE EXTENSION vector)"
        ) from None
    await _init(conn)


async def create_pool(cfg: DatabaseConfig, url: str | None = None) -> asyncpg.Pool:
    try:
        pool = await asyncpg.create_pool(
            url or cfg.url,
            min_size=cfg.min_size,
            max_size=cfg.max_size,
            max_queries=cfg.max_queries,
            max_inactive_connection_lifetime=cfg.max_inactive_connection_lifetime_s,
            init=_init,
            **connect_kwargs(),
        )
    except (OSError, asyncpg.PostgresError) as err:
        raise DatabaseError(
            f"cannot connect to the database ({type(err).__name__}: {err})"
        ) from None
    assert pool is not None
    return pool
