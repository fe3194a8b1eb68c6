"""The commands' work, one async function each; cli.py only parses and prints."""

from __future__ import annotations

import asyncio
import gc
import signal
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

import asyncpg

from syncer import config as config_mod
from syncer.backfill import backfill as enqueue_backfill
from syncer.capture import source_for
from syncer.config import Config, PipelineConfig
from syncer.db import Database, connect, ensure_vector_extension, wait_for_pool
from syncer.errors import EXIT_PROVIDER, ConfigError, SchemaError
from syncer.monitor import Monitor
from syncer.observe import Events
from syncer.providers import Embedder, make_embedder
from syncer.schema import install as schema
from syncer.schema.catalog import key_columns
from syncer.schema.migrations import installed_version, missing_versions
from syncer.schema.render import PipelineSQL, render
from syncer.sqlfiles import query
from syncer.status import PipelineStatus
from syncer.status import gather as gather_status
from syncer.targets import for_pipeline
from syncer.worker import ProviderPaused, Worker

if TYPE_CHECKING:
    from rich.console import Console

    from syncer.otel import OtelHandler


def select(cfg: Config, pipeline: str | None) -> tuple[PipelineConfig, ...]:
    return (cfg.pipeline(pipeline),) if pipeline else cfg.pipelines


async def install(
    cfg: Config, backfill: bool, echo: Callable[[str], None] = print
) -> dict[str, int]:
    """Create or update everything; returns rows enqueued per pipeline by the backfill."""
    conn = await connect(cfg.database.url)
    try:
        await ensure_vector_extension(conn)
        source = source_for(cfg)
        # Check every pipeline before creating anything, so a typo changes nothing.
        for p in cfg.pipelines:
            await schema.check_pipeline(conn, p)
        await source.check(conn)
        await schema.install_schema(conn)
        for line in await source.install(conn):
            echo(line)
        rendered_all = {}
        for p in cfg.pipelines:
            rendered_all[p.name] = await schema.install_pipeline(conn, p, source.install_pipeline)
            echo(
                f"pipeline {p.name}: installed on {p.table} "
                f"({p.target} target, {cfg.capture.mode} capture)"
            )
        await source.installed(conn)
        enqueued: dict[str, int] = {}
        for p in cfg.pipelines:
            rendered = rendered_all[p.name]
            if backfill:
                enqueued[p.name] = await enqueue_backfill(conn, rendered, everything=False)
                echo(f"pipeline {p.name}: {enqueued[p.name]} existing rows queued for embedding")
        return enqueued
    finally:
        await conn.close()


async def uninstall(cfg: Config, keep_vectors: bool, echo: Callable[[str], None] = print) -> None:
    conn = await connect(cfg.database.url)
    try:
        if await installed_version(conn) is None:
            echo("syncer is not installed in this database; nothing to do")
            return
        source = source_for(cfg)
        for line in await source.uninstall(conn):
            echo(line)
        for p in cfg.pipelines:
            for line in await schema.uninstall_pipeline(
                conn, p, keep_vectors, source.uninstall_pipeline
            ):
                echo(line)
        await schema.uninstall_schema(conn)
        echo("dropped schema syncer (queue, dead letters, registry)")
    finally:
        await conn.close()


async def targets_to_drop(cfg: Config) -> list[str]:
    conn = await connect(cfg.database.url)
    try:
        return await schema.created_targets(conn)
    finally:
        await conn.close()


async def backfill(
    cfg: Config,
    pipeline: str | None,
    everything: bool,
    echo: Callable[[str], None] = print,
    progress: Callable[[int, int | None], None] | None = None,
) -> dict[str, int]:
    """`progress(rows scanned, rows in the tables)`: after each page, the total estimated
    from the planner's statistics (None while a table has none)."""
    conn = await connect(cfg.database.url)
    try:
        out: dict[str, int] = {}
        chosen = select(cfg, pipeline)
        rendered = {p.name: await checked_pipeline(conn, p) for p in chosen}
        sizes = [await estimated_rows(conn, p.table) for p in chosen]
        total = None if None in sizes else sum(s or 0 for s in sizes)
        before = 0  # rows scanned by the pipelines done
        for p in chosen:
            last = [0]

            def page(
                scanned: int, _enqueued: int, base: int = before, last: list[int] = last
            ) -> None:
                last[0] = scanned
                if progress is not None:
                    progress(base + scanned, total)

            out[p.name] = await enqueue_backfill(conn, rendered[p.name], everything, progress=page)
            before += last[0]
            echo(f"pipeline {p.name}: {out[p.name]} rows queued")
        return out
    finally:
        await conn.close()


async def estimated_rows(conn: asyncpg.Connection, table: str) -> int | None:
    """The planner's row count for the table (no scan); None before its first ANALYZE."""
    n = await conn.fetchval(
        "SELECT reltuples::bigint FROM pg_class WHERE oid = $1::regclass", table
    )
    return None if n is None or n < 0 else int(n)


async def checked_pipeline(conn: asyncpg.Connection, p: PipelineConfig) -> PipelineSQL:
    """The pipeline's SQL, after checking that install ran with this very configuration."""
    version = await installed_version(conn)
    if version is None:
        raise SchemaError("syncer is not installed in this database: run `syncer install` first")
    if missing := await missing_versions(conn):
        raise SchemaError(
            f"syncer's objects in this database are version {version}, this syncer needs "
            f"migrations {', '.join(map(str, missing))}: run `syncer install` again to upgrade them"
        )
    row = await conn.fetchrow(query("pipeline_get"), p.name)
    if row is None:
        raise SchemaError(f"pipeline {p.name!r} is not installed: run `syncer install`")
    if row["fingerprint"] != p.fingerprint() or row["source_table"] != p.table:
        raise SchemaError(
            f"pipeline {p.name!r}: the configuration changed since install "
            "(table, text, model, dimensions or vector type): run `syncer install` again"
        )
    keys = await key_columns(conn, p)
    if not await for_pipeline(p).check(conn):
        raise SchemaError(f"pipeline {p.name!r}: its target is missing: run `syncer install`")
    return render(p, keys)


def make_embedders(cfg: Config, path: Path | str) -> dict[str, Embedder]:
    used = {p.provider for p in cfg.pipelines}
    keys = {name: config_mod.api_key(cfg, name, path) for name in sorted(used)}
    return {name: make_embedder(name, cfg.providers[name], keys[name]) for name in keys}


@dataclass
class RunResult:
    events: Events
    exit_code: int = 0
    message: str = ""


async def run(
    cfg: Config,
    embedders: dict[str, Embedder],
    exit_when_idle: bool,
    stop: asyncio.Event | None = None,
    events: Events | None = None,
    listen: str | None = None,
) -> RunResult:
    """`listen`: HOST:PORT of the HTTP endpoints (default observe.listen)."""
    stop = stop or asyncio.Event()
    result = RunResult(events or Events())
    loop = asyncio.get_running_loop()
    pool: asyncpg.Pool | None = None
    otel = start_otel(cfg.observe.otel)
    if otel is not None:
        result.events.subscribe(otel)
    # First, so that an address in use ends the run before it claims anything.
    monitor = Monitor(cfg, result.events, listen or cfg.observe.listen)
    try:
        await monitor.start()
    except BaseException:
        await monitor.close()
        raise
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        # A database that is down at start is waited for (logged), not a reason to exit.
        pool = await wait_for_pool(cfg.database, stop)
        if pool is None:
            return result
        rendered = await Database(pool).call(_checked_all, cfg, pool)
        # Start-up objects live as long as the process: keep them out of every collection.
        gc.freeze()
        worker = Worker(cfg, pool, embedders, rendered, result.events, monitor)
        await worker.run(stop, exit_when_idle)
    except ProviderPaused as err:
        result.exit_code = EXIT_PROVIDER
        result.message = f"stopped: a provider refuses requests ({err}); the queue is intact"
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        await monitor.close()
        for e in embedders.values():
            await e.close()
        if pool is not None:
            await pool.close()
        if otel is not None:
            await asyncio.to_thread(otel.shutdown)
    return result


def start_otel(cfg: config_mod.OtelConfig) -> OtelHandler | None:
    """The OpenTelemetry subscriber, when `[observe.otel] endpoint` is set."""
    if cfg.endpoint is None:
        return None
    try:
        from syncer.otel import OtelHandler
    except ImportError as err:
        raise ConfigError(
            f"observe.otel.endpoint is set, but OpenTelemetry is not installed ({err.name}): "
            "pip install 'syncer[otel]'"
        ) from None
    return OtelHandler(cfg)


async def _checked_all(cfg: Config, pool: asyncpg.Pool) -> dict[str, PipelineSQL]:
    async with pool.acquire() as conn:
        rendered = {p.name: await checked_pipeline(conn, p) for p in cfg.pipelines}  # type: ignore[arg-type]
        await source_for(cfg).check_run(conn)  # type: ignore[arg-type]
    return rendered


async def status(cfg: Config) -> tuple[list[PipelineStatus], asyncpg.Record | None]:
    """Each pipeline's status, and in logical mode the slot's state (None: missing)."""
    conn = await _installed(cfg)
    try:
        rendered = {p.name: await checked_pipeline(conn, p) for p in cfg.pipelines}
        return await gather_status(cfg, conn, rendered), await source_for(cfg).status(conn)
    finally:
        await conn.close()


async def pause(cfg: Config, pipeline: str | None, paused: bool, by: str = "") -> list[str]:
    """Pause (or resume) the pipeline, or every configured one; returns their names. Every
    replica stops claiming within seconds (see worker/pause.py)."""
    names = [p.name for p in select(cfg, pipeline)]  # an unknown name lists the known ones
    conn = await _installed(cfg)
    try:
        for name in names:
            await checked_pipeline(conn, cfg.pipeline(name))
        if paused:
            rows = await conn.fetch(query("pipeline_pause"), names, by)
        else:
            rows = await conn.fetch(query("pipeline_resume"), names)
        return [r["name"] for r in rows]
    finally:
        await conn.close()


async def watch(cfg: Config, metrics_url: str | None, console: Console) -> int:
    """`syncer status --watch` until SIGINT; returns the frames drawn."""
    from syncer.watch import watch as watch_loop  # rich: only if needed

    conn = await _installed(cfg)
    try:
        return await watch_loop(cfg, conn, metrics_url, console)
    finally:
        await conn.close()


@dataclass(frozen=True)
class DeadLetterFilter:
    pipeline: str | None = None
    error_class: str | None = None
    since: datetime | None = None
    limit: int | None = None


async def replay_dead_letters(
    cfg: Config, f: DeadLetterFilter, dry_run: bool
) -> tuple[int, list[asyncpg.Record]]:
    """Move matching dead letters back to the queue in one transaction; returns how many
    (and, for a dry run, which ones it would move)."""
    if f.pipeline:
        cfg.pipeline(f.pipeline)  # a typo in the name is an error, not "0 replayed"
    conn = await _installed(cfg)
    try:
        args = (f.pipeline, f.error_class, f.since, f.limit)
        if dry_run:
            rows = await conn.fetch(query("dead_letter_select"), *args)
            return len(rows), rows
        async with conn.transaction():
            moved = await conn.fetch(query("dead_letter_replay"), *args)
            for name in sorted({r["pipeline"] for r in moved}):
                await conn.execute("SELECT pg_notify('syncer', $1)", name)
        return len(moved), []
    finally:
        await conn.close()


async def dead_letter_report(
    cfg: Config, pipeline: str | None, newest: int
) -> tuple[list[asyncpg.Record], list[asyncpg.Record]]:
    conn = await _installed(cfg)
    try:
        counts = await conn.fetch(query("dead_letter_counts"))
        if pipeline:
            counts = [r for r in counts if r["pipeline"] == pipeline]
        return counts, await conn.fetch(query("dead_letter_newest"), pipeline, newest)
    finally:
        await conn.close()


async def _installed(cfg: Config) -> asyncpg.Connection:
    conn = await connect(cfg.database.url)
    if await installed_version(conn) is None:
        await conn.close()
        raise SchemaError("syncer is not installed in this database: run `syncer install` first")
    return conn
