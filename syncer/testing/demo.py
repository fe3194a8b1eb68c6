"""`syncer demo`: an embedded PostgreSQL, a local embedder, a sample table, live sync.

Everything runs in this process or its children and is removed at the end, also on
Ctrl-C or an error. Each step commits a change, waits (with a deadline) until the
worker has finished with it, checks every vector is fresh, and prints what it cost.
An error ends the demo as it ends any command: one line, and the exit status that
syncer.errors.EXIT_CODES gives it (cli's guard).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import secrets
import shutil
import signal
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import FrameType

import asyncpg
import click
import uvloop

from syncer import app
from syncer import config as config_mod
from syncer.config import Config
from syncer.observe import Event, Events, Failed, InFlightChanged, Stats, setup_logging
from syncer.sqlfiles import query
from syncer.testing import embedded_pg
from syncer.testing.fake_embedder import FakeEmbedderProcess

PIPELINE = "articles"
LOCAL_KEY_ENV = "SYNCER_DEMO_API_KEY"
STEP_TIMEOUT_S = 60.0
POLL_S = 0.002
LATENCY_SAMPLES = 10
EXIT_INTERRUPTED = 130
# The stored vector is fresh when its hash is the hash of the row's current text, computed
# by the function install created: the same one the worker's hash guard uses.
FRESH_SQL = f"embedding_hash IS NOT DISTINCT FROM syncer.{PIPELINE}__hash(a)"
NOT_SEMANTIC = (
    "Its vectors are NOT semantic: each is derived from a hash of the text. They show the\n"
    "sync at work; similarity search on them means nothing (real ones: --base-url, --model)."
)
RETITLE = "UPDATE {t} SET title = 'HNSW or IVFFlat: choosing a vector index' WHERE id = 1"
# (label, why, SQL run in one transaction); {t} is the table, {n} the number of sample rows.
# fmt: off
STEPS = [
    ("INSERT 3 articles (one statement)", "one insert into the inbox for the statement; a NOTIFY woke the worker",
     "INSERT INTO {t} (id, title, body, views) SELECT id + {n}, title || ' (copy)', body, 0"
     " FROM {t} WHERE id <= 3"),
    ("UPDATE a title", "the title is part of the text (title, body): re-embedded", RETITLE),
    ("UPDATE views on every row", "views is not part of the text: the trigger queued nothing",
     "UPDATE {t} SET views = views + 1"),
    ("the same title UPDATE again", "the text did not change: nothing queued", RETITLE),
    ("edit + undo in one transaction", "captured twice, folded into one item; its text's hash"
     " equals the stored vector's: no call", "UPDATE {t} SET title = title || ' (draft)' WHERE id = 2;"
     " UPDATE {t} SET title = left(title, -8) WHERE id = 2"),
    ("DELETE an article", "the vector lived in the row and left with it: nothing queued",
     "DELETE FROM {t} WHERE id = 3"),
]
# fmt: on
ARTICLES = """\
Choosing an index for vector search | HNSW answers queries fast at the cost of memory and build time; IVFFlat builds quickly but needs a good list count.
Why your embeddings drift | A vector computed from last week's text silently answers this week's questions with last week's meaning.
Postgres as a job queue | FOR UPDATE SKIP LOCKED lets many workers claim rows without waiting on each other.
Rate limits without tears | Token buckets for requests and tokens per minute keep a batch job under the provider's ceiling.
Hybrid search in one query | Combine full-text ranking and cosine distance with reciprocal rank fusion, all in SQL.
Chunking long documents | Split on headings first, then on paragraphs, and keep a little overlap between chunks.
The cost of re-embedding | Most updates touch counters and timestamps; only a change of the text needs a new vector.
Triggers that scale | Statement-level triggers with transition tables do one insert per statement, not one per row.
Half-precision vectors | halfvec halves storage and index size, usually with no visible loss in recall.
Backfilling a million rows | Keyset pagination streams the work; a batch that fails is retried, not restarted.
Idempotent writes | An upsert keyed by the row's key means replaying a job changes nothing.
When to use a side table | Keep vectors apart when the source table is hot or owned by another team.
Monitoring a sync pipeline | Watch the queue's oldest item: it is the lag your users feel.
Retries and dead letters | Retry what may pass later; park what never will, with its reason, and replay it after the fix.
Listening for changes | NOTIFY wakes a worker at once; a slow poll catches whatever a lost notification missed.
Picking an embedding model | Dimensions, price per token and multilingual quality matter more than leaderboard ranks.
Testing against a real database | A template database per test keeps tests fast and isolated without mocks.
Vector search with filters | Filter first with an index on the metadata, or the nearest neighbours may all be filtered out.
Measuring recall | Compare approximate results with an exact scan on a sample of queries before tuning ef_search.
Graceful shutdown | Finish what is in flight within a deadline, hand back the rest, then exit.
"""


class Interrupted(Exception):
    """Ctrl-C or SIGTERM arrived while the worker ran."""


class DemoWatch:
    """Remembers how many items the worker holds, so "settled" can be waited on, and the
    last failure, so a broken provider ends the demo at once with its reason."""

    def __init__(self) -> None:
        self.holding = 0
        self.error: str | None = None

    def __call__(self, event: Event) -> None:
        if isinstance(event, InFlightChanged):
            self.holding = event.n
        elif isinstance(event, Failed):
            self.error = event.error


def sample_rows(n: int) -> list[tuple[int, str, str, int]]:
    pairs = [line.split(" | ", 1) for line in ARTICLES.splitlines()]
    rows = []
    for i in range(n):
        title, body = pairs[i % len(pairs)]
        if i >= len(pairs):
            title = f"{title} (part {i // len(pairs) + 1})"
        rows.append((i + 1, title, body, (i * 37) % 500))
    return rows


def demo_config(url: str, base_url: str, model: str, dimensions: int, key_env: str) -> Config:
    pipeline = dict(name=PIPELINE, table=PIPELINE, text=["title", "body"], provider="api")
    data = {
        "database": {"url": url, "min_size": 1, "max_size": 4},
        "worker": {"poll_interval_s": 1.0, "max_retries": 2, "retry_base_s": 0.5},
        "providers": {"api": {"base_url": base_url, "api_key_env": key_env}},
        "pipelines": [pipeline | {"model": model, "dimensions": dimensions}],
    }
    return config_mod.parse(data, Path("<demo>"))


class Tour:
    """The steps, on one connection, with the worker running as a task beside them."""

    def __init__(self, conn: asyncpg.Connection, fake: FakeEmbedderProcess | None) -> None:
        self.conn, self.fake = conn, fake
        self.events = Events()
        self.watch = DemoWatch()
        self.events.subscribe(self.watch)
        self.stop = asyncio.Event()
        self.worker: asyncio.Task[app.RunResult] | None = None
        self.ignored = 0  # rows updated without a change of their text
        self.number = 0

    @property
    def stats(self) -> Stats:
        return self.events.stats[PIPELINE]

    def finished(self) -> int:
        return self.stats.embedded + self.stats.unchanged + self.stats.cleared

    def start_worker(self, cfg: Config) -> None:
        embedders = app.make_embedders(cfg, "<demo>")
        run = app.run(cfg, embedders, exit_when_idle=False, stop=self.stop, events=self.events)
        self.worker = asyncio.create_task(run, name="worker")

    async def wait_until(self, cond: Callable[[], Awaitable[bool]], what: str) -> None:
        """Poll `cond`; give up after STEP_TIMEOUT_S without the worker finishing an item."""
        deadline, done = time.monotonic() + STEP_TIMEOUT_S, self.finished()
        while not await cond():
            if self.finished() != done:
                deadline, done = time.monotonic() + STEP_TIMEOUT_S, self.finished()
            if self.stop.is_set():
                raise Interrupted
            if self.watch.error:
                raise click.ClickException(f"the embedding API failed: {self.watch.error}")
            if self.worker is not None and self.worker.done():
                err = "cancelled" if self.worker.cancelled() else repr(self.worker.exception())
                raise click.ClickException(f"the worker stopped: {err}")
            if time.monotonic() > deadline:
                raise click.ClickException(f"no progress in {STEP_TIMEOUT_S:.0f} s: {what}")
            await asyncio.sleep(POLL_S)

    async def pending(self) -> int:
        n: int = await self.conn.fetchval(query("queue_pending"), [PIPELINE])
        return n

    async def settle(self, what: str) -> None:
        """Wait until the queue is empty and the worker holds nothing (it says so only after
        counting the outcome, so the figures are final), then check every vector is fresh."""

        async def idle() -> bool:
            return await self.pending() == 0 and self.watch.holding == 0

        await self.wait_until(idle, what)
        sql = f"SELECT count(*) FROM {PIPELINE} a WHERE NOT {FRESH_SQL}"
        if stale := await self.conn.fetchval(sql):
            raise click.ClickException(f"after {what}: {stale} rows have a stale vector")

    async def api_calls(self) -> int:
        if self.fake is None:
            return self.stats.api_calls
        # The local server's own count: a witness independent of syncer's bookkeeping.
        stats = await asyncio.to_thread(self.fake.stats)
        return int(stats["requests"])

    def line(self, label: str, figures: str, why: str) -> None:
        self.number += 1
        click.echo(f"{self.number}. {label:<34} {click.style(figures, bold=True)}")
        click.echo(click.style(f"   {why}", dim=True))

    async def step(self, label: str, why: str, sql: str) -> None:
        """Run `sql` in one transaction; say what it queued, embedded and cost."""
        calls, embedded = await self.api_calls(), self.stats.embedded
        async with self.conn.transaction():
            status = await self.conn.execute(sql)
            queued = await self.pending()  # this transaction's items: the queue was empty
        if queued == 0 and status.startswith("UPDATE"):
            self.ignored += int(status.split()[-1])
        await self.settle(label)
        embedded, calls = self.stats.embedded - embedded, await self.api_calls() - calls
        self.line(label, f"queued {queued:>2}, embedded {embedded:>2}, API calls {calls}", why)

    async def is_fresh(self, key: int) -> bool:
        sql = f"SELECT {FRESH_SQL} FROM {PIPELINE} a WHERE id = $1"
        return bool(await self.conn.fetchval(sql, key))


async def install_step(t: Tour, cfg: Config, n: int) -> None:
    p = cfg.pipelines[0]
    columns = "(id bigint PRIMARY KEY, title text, body text, views int)"
    await t.conn.execute(f"CREATE TABLE {PIPELINE} {columns}")
    await t.conn.copy_records_to_table(PIPELINE, records=sample_rows(n))
    click.echo(f"created table {PIPELINE}(id, title, body, views) with {n} sample rows\n")
    started = time.perf_counter()
    enqueued = await app.install(cfg, backfill=True, echo=lambda _: None)
    t.start_worker(cfg)
    await t.settle("the backfill")
    figures = f"queued {enqueued[PIPELINE]:>2}, embedded {t.stats.embedded:>2}"
    why = (
        f"install added {p.column} {p.vector_type}({p.dimensions}), {p.hash_column} and capture"
        f" triggers; install + backfill took {time.perf_counter() - started:.2f} s"
    )
    t.line(f"install + backfill of {n} rows", f"{figures}, API calls {await t.api_calls()}", why)


async def latency_step(t: Tour, n: int) -> list[float]:
    """Single-row text updates: commit, then poll until the row's stored hash is the hash
    of its new text (the vector that goes with it is written in the same statement)."""
    calls, embedded, ms = await t.api_calls(), t.stats.embedded, []
    keys = [k for k in range(1, n + 4) if k != 3]  # row 3 was deleted
    for i in range(LATENCY_SAMPLES):
        key = keys[i % len(keys)]
        sql = f"UPDATE {PIPELINE} SET body = body || $2 WHERE id = $1"
        await t.conn.execute(sql, key, f" (rev {i + 1})")
        committed = time.perf_counter()
        await t.wait_until(functools.partial(t.is_fresh, key), f"the vector of row {key}")
        ms.append((time.perf_counter() - committed) * 1000)
    await t.settle("the latency run")
    embedded, calls = t.stats.embedded - embedded, await t.api_calls() - calls
    why = "each: commit, then poll until embedding_hash is the new text's hash"
    t.line(f"{len(ms)} single-row text UPDATEs", f"embedded {embedded:>2}, API calls {calls}", why)
    return sorted(ms)


def summary(t: Tour, calls: int, ms: list[float]) -> None:
    s = t.stats
    rows = [
        ("rows embedded", s.embedded, "vectors written from an API answer"),
        ("API calls", calls, f"carrying {s.api_inputs} inputs"),
        ("calls saved", s.unchanged, "queued, but the stored vector already matched the text"),
        ("free updates", t.ignored, "rows updated without a change of their text: never queued"),
    ]
    click.echo("\ntotals")
    for name, value, why in rows:
        click.echo(f"  {name:<14}{click.style(f'{value:>5}', bold=True)}   {why}")
    latency = f"p50 {statistics.median(ms):.1f} ms, max {ms[-1]:.1f} ms"
    click.echo(f"  {'latency':<14}{click.style(latency, bold=True)}   (commit -> vector visible)")


async def tour(cfg: Config, fake: FakeEmbedderProcess | None, n: int, keep: bool) -> None:
    t = Tour(await asyncpg.connect(cfg.database.url), fake)
    try:
        await install_step(t, cfg, n)
        for label, why, sql in STEPS:
            await t.step(label, why, sql.format(t=PIPELINE, n=n))
        ms = await latency_step(t, n)
        summary(t, await t.api_calls(), ms)
        if keep and t.worker is not None:
            click.echo(f"\nthe worker keeps running; change rows with psql '{cfg.database.url}'")
            click.echo(f"(see: SELECT id, {FRESH_SQL} AS fresh FROM {PIPELINE} a)")
            click.echo("Ctrl-C stops everything and removes it")
            await asyncio.wait([t.worker])
    finally:
        t.stop.set()
        if t.worker is not None:
            await asyncio.gather(t.worker, return_exceptions=True)
        await t.conn.close()


def start_services(
    stack: contextlib.ExitStack, base_url: str | None, dimensions: int
) -> tuple[str, FakeEmbedderProcess | None]:
    started = time.perf_counter()
    datadir = Path(tempfile.mkdtemp(prefix="syncer-demo-pg-"))
    stack.callback(shutil.rmtree, datadir, ignore_errors=True)
    # Interrupted inside start(), the server is still stopped by pgserver's atexit hook.
    pg = embedded_pg.start(datadir)
    stack.callback(pg.stop)
    click.echo(f"started PostgreSQL with pgvector ({time.perf_counter() - started:.1f} s)")
    if base_url is not None:
        click.echo(f"embeddings come from {base_url}: real API calls, billed by your provider")
        return pg.url(), None
    os.environ[LOCAL_KEY_ENV] = secrets.token_hex(16)
    fake = FakeEmbedderProcess(api_key=os.environ[LOCAL_KEY_ENV], default_dimensions=dimensions)
    stack.callback(fake.stop)
    fake.start()
    click.echo(f"started a local OpenAI-compatible embedder at {fake.url}")
    click.echo(click.style(NOT_SEMANTIC, fg="yellow"))
    return pg.url(), fake


def interrupt(_signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def quiet_logs(ctx: click.Context) -> None:
    """Warnings only, as plain lines, unless `syncer --log-level` was given explicitly."""
    warnings.filterwarnings("ignore", category=UserWarning, module="platformdirs")
    if "log_level" not in ctx.find_root().meta.get("syncer.log", {}):
        setup_logging("warning", json_logs=False)


@click.command()
@click.option("--rows", type=click.IntRange(3, 100_000), default=20, show_default=True)
@click.option("--base-url", help="An OpenAI-compatible API instead of the local embedder.")
@click.option("--model", default="text-embedding-3-small", show_default=True)
@click.option("--dimensions", type=click.IntRange(1, 16_000), default=1536, show_default=True)
@click.option(
    "--api-key-env", default="OPENAI_API_KEY", help="With --base-url: the key's variable."
)
@click.option("--keep", is_flag=True, help="Keep the database and the worker running until Ctrl-C.")
@click.pass_context
def demo(
    ctx: click.Context,
    rows: int,
    base_url: str | None,
    model: str,
    dimensions: int,
    api_key_env: str,
    keep: bool,
) -> None:
    """Show syncer keeping a sample table's vectors in sync (embedded PostgreSQL)."""
    quiet_logs(ctx)
    if base_url is not None and not base_url.startswith(("http://", "https://")):
        raise click.BadParameter("must start with http:// or https://", param_hint="--base-url")
    if base_url is not None and not os.environ.get(api_key_env):
        raise click.ClickException(
            f"environment variable {api_key_env} is not set: it must hold the API key for "
            f"{base_url} (name another variable with --api-key-env)"
        )
    started = time.perf_counter()
    signal.signal(signal.SIGTERM, interrupt)  # clean up on SIGTERM too, not only on Ctrl-C
    try:
        with contextlib.ExitStack() as stack:
            url, fake = start_services(stack, base_url, dimensions)
            key_env = LOCAL_KEY_ENV if fake else api_key_env
            cfg = demo_config(url, fake.url if fake else str(base_url), model, dimensions, key_env)
            uvloop.run(tour(cfg, fake, rows, keep))
            click.echo("\nstopping the worker, the embedder and PostgreSQL; removing their files")
    except (KeyboardInterrupt, Interrupted):
        click.echo("\ninterrupted: everything stopped and removed", err=True)
        sys.exit(EXIT_INTERRUPTED)
    click.echo(f"done in {time.perf_counter() - started:.1f} s")
