"""Connections: the asyncpg pool with pgvector's binary codecs, sized for a sidecar."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any, ParamSpec, TypeVar

import asyncpg
from pgvector.asyncpg import register_vector

from syncer.config import DatabaseConfig
from syncer.errors import DatabaseError, DatabaseUnavailable

log = logging.getLogger("syncer.db")


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


def _pool_kwargs(cfg: DatabaseConfig) -> dict[str, Any]:
    """The worker's pool: its statements have timeouts (install's long DDL does not)."""
    settings = connect_kwargs()["server_settings"] | {
        "statement_timeout": f"{int(cfg.statement_timeout_s * 1000)}ms",
        "lock_timeout": f"{int(cfg.lock_timeout_s * 1000)}ms",
    }
    return {"server_settings": settings}


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
            **_pool_kwargs(cfg),
        )
    except (OSError, asyncpg.PostgresError) as err:
        kind = DatabaseUnavailable if isinstance(err, LOST) else DatabaseError
        raise kind(f"cannot connect to the database ({type(err).__name__}: {err})") from None
    assert pool is not None
    return pool


# --- riding through an outage --------------------------------------------------------------

# The connection or the server went away (a restart, a failover, a network cut), or the
# server cannot take us now: not a statement's fault, so the statement is run again later.
LOST = (
    OSError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,  # asyncpg's state after a connection broke mid-operation
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    asyncpg.TooManyConnectionsError,
    # statement_timeout or lock_timeout: a held lock or a stuck server, run it again later
    asyncpg.QueryCanceledError,
    asyncpg.LockNotAvailableError,
)
RETRY_NOW = (asyncpg.DeadlockDetectedError, asyncpg.SerializationError)
RETRY_NOW_MAX_S = 0.05
PROBE_MIN_S = 0.1
PROBE_MAX_S = 5.0
PROBE_TIMEOUT_S = 5.0

T = TypeVar("T")
P = ParamSpec("P")


async def retry_aborts(fn: Callable[P, Awaitable[T]], *args: P.args, **kwargs: P.kwargs) -> T:
    """`await fn(*args, **kwargs)`, run again while PostgreSQL aborts it for a deadlock or a
    serialization failure: two transactions locked rows in opposite orders (a write
    finishing its items while the capture marks them), and the aborted one may simply rerun."""
    while True:
        try:
            return await fn(*args, **kwargs)
        except RETRY_NOW:
            await asyncio.sleep(random.uniform(0, RETRY_NOW_MAX_S))


class Database:
    """The pool, and what every stage does when the database goes away: wait until it is
    back, then run its statement again. Every statement syncer runs on its own tables and
    targets is safe to run twice (claims are leased, writes hash-guarded and keyed).

    One line is logged when an outage starts and one when it ends; meanwhile one probe, with
    jittered backoff, asks the database whether it is back.
    """

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool
        self.up = asyncio.Event()
        self.up.set()
        self._down_at = 0.0
        self._probe: asyncio.Task[None] | None = None

    async def call(self, fn: Callable[P, Awaitable[T]], *args: P.args, **kwargs: P.kwargs) -> T:
        """`await fn(*args, **kwargs)`, again once the database is back if it went away."""
        while True:
            await self.up.wait()
            try:
                return await retry_aborts(fn, *args, **kwargs)
            except LOST as err:
                self.lost(err)

    def lost(self, err: BaseException) -> None:
        if not self.up.is_set():
            return
        self.up.clear()
        self._down_at = time.monotonic()
        log.warning("database unavailable; waiting for it", extra={"error": _brief(err)})
        self._probe = asyncio.create_task(self._wait_back(), name="database-probe")

    async def _wait_back(self) -> None:
        delay_s = PROBE_MIN_S
        while True:
            await asyncio.sleep(delay_s * random.uniform(0.5, 1.0))
            try:
                async with self.pool.acquire(timeout=PROBE_TIMEOUT_S) as conn:
                    await conn.fetchval("SELECT 1", timeout=PROBE_TIMEOUT_S)
            except (*LOST, asyncpg.PostgresError, TimeoutError):
                delay_s = min(delay_s * 2, PROBE_MAX_S)
                continue
            down_s = round(time.monotonic() - self._down_at, 3)
            log.warning("database is back", extra={"down_s": down_s})
            self.up.set()
            return

    async def close(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._probe


async def wait_for_pool(cfg: DatabaseConfig, stop: asyncio.Event) -> asyncpg.Pool | None:
    """The pool, once the database answers: start-up does not fail while it is down (it
    waits, logged, with jittered backoff). None if stop was asked first."""
    delay_s = PROBE_MIN_S
    logged = False
    while not stop.is_set():
        try:
            return await create_pool(cfg)
        except DatabaseUnavailable as err:
            if not logged:
                log.warning(
                    "database unavailable at start; waiting for it", extra={"error": str(err)}
                )
                logged = True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), delay_s * random.uniform(0.5, 1.0))
        delay_s = min(delay_s * 2, PROBE_MAX_S)
    return None


def _brief(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}".splitlines()[0][:300]
