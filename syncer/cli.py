"""`syncer install · run · backfill · status · pause · resume · uninstall · roles · demo`."""

from __future__ import annotations

import signal
import sys


def _stopped_early(_sig: int, _frame: object) -> None:
    # A SIGTERM before the run has started (a replica stopped while it imports): nothing is
    # claimed yet, so this is a clean stop, not a kill. `run` installs its own handler.
    sys.exit(0)


signal.signal(signal.SIGTERM, _stopped_early)

import asyncio  # after the handler: the imports take the first half second
import functools
import importlib
import logging
import os
import socket
import traceback
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import asyncpg
import click
import orjson

from syncer import app
from syncer import config as config_mod
from syncer.config import Config
from syncer.errors import EXIT_THRESHOLD, SyncerError, exit_code
from syncer.observe import Events, setup_logging
from syncer.status import PipelineStatus, Thresholds

T = TypeVar("T")

log = logging.getLogger("syncer")

# Commands whose module is imported only when they run: `syncer run` never loads the demo's
# kit (syncer.testing), whose dependencies are an extra (`syncer[demo]`).
LAZY_COMMANDS = {"demo": "syncer.testing.demo"}
# Click's own ends of a command (usage errors, Ctrl-C at a prompt, ctx.exit): click reports them.
_CLICK_ENDS = (click.ClickException, click.Abort, click.exceptions.Exit)


def _run_async(coro: Coroutine[Any, Any, T]) -> T:
    try:
        import uvloop

        return uvloop.run(coro)
    except ImportError:  # pragma: no cover - uvloop is a dependency; this is a fallback
        return asyncio.run(coro)


def _one_line(err: BaseException) -> str:
    """syncer's own message as it is; any other error as its class and text, on one line."""
    if isinstance(err, SyncerError):
        return str(err)
    name = type(err).__name__
    if isinstance(err, asyncpg.PostgresError):
        name = f"database: {name}"
    text = " ".join(str(err).split())
    return f"{name}: {text}" if text else name


def _fail(err: BaseException) -> NoReturn:
    """One line on stderr and the exit status from errors.EXIT_CODES; at --log-level debug
    the traceback first, so the line stays the last thing printed."""
    if log.isEnabledFor(logging.DEBUG):
        traceback.print_exception(err)
    click.echo(f"error: {_one_line(err)}", err=True)
    sys.exit(exit_code(err))


def _guard(fn: Callable[[], T]) -> T:
    """Run `fn`; any error that escapes it, ours or not, ends the command through _fail."""
    try:
        return fn()
    except _CLICK_ENDS:
        raise
    except Exception as err:
        _fail(err)


LOG_LEVELS = click.Choice(["debug", "info", "warning", "error"], case_sensitive=False)
LOG_FORMATS = click.Choice(["json", "text"], case_sensitive=False)


def _set_log(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    """--log-format / --log-level, before or after the command's name: the last one given
    wins over the config's [observe] (applied when the config is read)."""
    if value is None:
        return
    root = ctx.find_root()
    chosen: dict[str, str] = root.meta.setdefault("syncer.log", {})
    chosen[str(param.name)] = value.lower()
    setup_logging(chosen.get("log_level", "info"), chosen.get("log_format", "json") == "json")


def _log_params() -> list[click.Parameter]:
    return [
        click.Option(
            [name],
            type=choice,
            default=None,
            expose_value=False,
            is_eager=True,
            callback=_set_log,
            help=f"Overrides [observe] {name[2:].replace('-', '_')}.",
        )
        for name, choice in (("--log-format", LOG_FORMATS), ("--log-level", LOG_LEVELS))
    ]


class Command(click.Command):
    """Every command takes --log-format and --log-level too (`syncer run --log-level debug`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.params += _log_params()


class Commands(click.Group):
    """syncer's command group: every command runs under _guard, and LAZY_COMMANDS are
    imported only when asked for."""

    command_class = Command
    group_class = type  # subgroups (dlq) are Commands too

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.params += _log_params()

    def invoke(self, ctx: click.Context) -> Any:
        return _guard(functools.partial(super().invoke, ctx))

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *LAZY_COMMANDS})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in LAZY_COMMANDS:
            return super().get_command(ctx, cmd_name)
        command: click.Command = getattr(importlib.import_module(LAZY_COMMANDS[cmd_name]), cmd_name)
        if not any(p.name == "log_level" for p in command.params):
            command.params += _log_params()
        return command


class Ctx:
    def __init__(self, path: Path, chosen_log: dict[str, str]) -> None:
        self.path = path
        self.chosen_log = chosen_log  # what --log-format / --log-level said

    def config(self) -> Config:
        cfg = config_mod.load(self.path)
        obs = cfg.observe
        level = self.chosen_log.get("log_level", obs.log_level)
        setup_logging(level, self.chosen_log.get("log_format", obs.log_format) == "json")
        return cfg


@click.group(cls=Commands)
@click.option(
    "-c",
    "--config",
    "config_path",
    type=click.Path(path_type=Path, readable=False),  # config.load says what is wrong
    default=config_mod.DEFAULT_PATH,
    show_default=True,
    help="The TOML configuration file.",
)
@click.pass_context
def main(ctx: click.Context, config_path: Path) -> None:
    """Keeps pgvector embeddings in sync with the rows they are computed from."""
    if ctx.invoked_subcommand != "run":
        # Only a starting `run` has nothing to lose: any other command stopped is a failure.
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    chosen: dict[str, str] = ctx.meta.setdefault("syncer.log", {})
    if not chosen:
        setup_logging()
    ctx.obj = Ctx(config_path, chosen)


@main.command()
@click.option("--no-backfill", is_flag=True, help="Do not queue the rows that already exist.")
@click.pass_obj
def install(obj: Ctx, no_backfill: bool) -> None:
    """Create the syncer schema, target columns or tables, and capture triggers (idempotent)."""
    cfg = obj.config()
    _run_async(app.install(cfg, backfill=not no_backfill, echo=click.echo))


@main.command()
@click.option("--keep-vectors", is_flag=True, help="Keep the vector columns and side tables.")
@click.option("--yes", is_flag=True, help="Do not ask before dropping vectors.")
@click.pass_obj
def uninstall(obj: Ctx, keep_vectors: bool, yes: bool) -> None:
    """Remove syncer's triggers, functions and schema; user data stays."""
    cfg = obj.config()
    if not keep_vectors and not yes:
        doomed = _run_async(app.targets_to_drop(cfg))
        if doomed:
            click.confirm(
                f"Drop the vectors syncer created for pipelines {', '.join(doomed)}?",
                abort=True,
            )
    _run_async(app.uninstall(cfg, keep_vectors, echo=click.echo))


@main.command()
@click.option("--pipeline", "pipeline", default=None, help="Only this pipeline.")
@click.option("--all", "everything", is_flag=True, help="Every row, not only stale ones.")
@click.pass_obj
def backfill(obj: Ctx, pipeline: str | None, everything: bool) -> None:
    """Queue the rows whose vector is missing or stale."""
    from syncer.progress import Reporter, reporting  # rich: only if needed

    cfg = obj.config()
    reporter = Reporter("scanned")
    _run_async(
        reporting(reporter, app.backfill(cfg, pipeline, everything, click.echo, reporter.update))
    )


@main.command()
@click.option(
    "--exit-when-idle", is_flag=True, help="Drain the queue, then exit 0 (for jobs and tests)."
)
@click.option(
    "--listen",
    default=None,
    metavar="HOST:PORT",
    callback=lambda _c, _p, v: _listen(v),
    help="Serve /metrics, /healthz and /readyz here (overrides [observe] listen).",
)
@click.pass_obj
def run(obj: Ctx, exit_when_idle: bool, listen: str | None) -> None:
    """Run every configured pipeline until SIGTERM or SIGINT."""
    cfg = obj.config()
    embedders = app.make_embedders(cfg, obj.path)
    from syncer.progress import DrainProgress, Reporter, reporting  # rich: only if needed

    events = Events()
    work = app.run(cfg, embedders, exit_when_idle, events=events, listen=listen)
    if exit_when_idle:  # a drain: a bar on a terminal, a line every 10 s otherwise
        reporter = Reporter("embedded")
        events.subscribe(DrainProgress(reporter))
        work = reporting(reporter, work)
    result = _run_async(work)
    for name, s in sorted(result.events.stats.items()):  # log lines: JSON under log_format
        counts = {"embedded": s.embedded, "unchanged": s.unchanged, "cleared": s.cleared}
        counts.update(dead_lettered=s.dead_lettered, api_calls=s.api_calls)
        log.info(
            f"pipeline {name}: embedded {s.embedded}, unchanged {s.unchanged}, "
            f"cleared {s.cleared}, dead-lettered {s.dead_lettered}, API calls {s.api_calls}",
            extra={"pipeline": name, **counts},
        )
    if result.message:
        log.warning(result.message)
    sys.exit(result.exit_code)


def _listen(value: str | None) -> str | None:
    if value is not None:
        try:
            config_mod.parse_listen(value)
        except ValueError as err:
            raise click.BadParameter(str(err), param_hint="'--listen'") from None
    return value


def _who() -> str:
    try:
        user = os.getlogin()
    except OSError:
        user = os.environ.get("USER", "?")
    return f"{user}@{socket.gethostname()}"


@main.command()
@click.option("--pipeline", default=None, help="Only this pipeline (default: every one).")
@click.pass_obj
def pause(obj: Ctx, pipeline: str | None) -> None:
    """Stop claiming (capture goes on): every replica within 2 s; in-flight requests finish."""
    names = _run_async(app.pause(obj.config(), pipeline, paused=True, by=_who()))
    click.echo(f"paused: {', '.join(names)}")


@main.command()
@click.option("--pipeline", default=None, help="Only this pipeline (default: every one).")
@click.pass_obj
def resume(obj: Ctx, pipeline: str | None) -> None:
    """Claim again what `pause` held back."""
    names = _run_async(app.pause(obj.config(), pipeline, paused=False))
    click.echo(f"resumed: {', '.join(names)}")


@main.command()
@click.option("--json", "as_json", is_flag=True, help="One JSON object with a `pipelines` array.")
@click.option(
    "--max-lag-s",
    type=click.FloatRange(min=0),
    default=None,
    help="Exit 3 if the oldest ready item is older than this.",
)
@click.option(
    "--max-dead-letters",
    type=click.IntRange(min=0),
    default=None,
    help="Exit 3 if a pipeline has more dead letters than this.",
)
@click.option(
    "--min-coverage",
    type=click.FloatRange(0, 1),
    default=None,
    help="Exit 3 if fewer rows with text than this share have their vector (0-1).",
)
@click.option("--require-runner", is_flag=True, help="Exit 3 if no worker was seen in 30 s.")
@click.option(
    "--watch", is_flag=True, help="A live view, refreshed every second, until Ctrl-C (exit 0)."
)
@click.option(
    "--metrics-url",
    default=None,
    metavar="URL",
    help="With --watch: a runner's /metrics (default: from [observe] listen).",
)
@click.pass_obj
def status(
    obj: Ctx,
    as_json: bool,
    max_lag_s: float | None,
    max_dead_letters: int | None,
    min_coverage: float | None,
    require_runner: bool,
    watch: bool,
    metrics_url: str | None,
) -> None:
    """Each pipeline: backlog, lag, dead letters, coverage, runners (exit 3: a threshold)."""
    if watch and as_json:
        raise click.UsageError("--watch draws a live view: it takes no --json")
    if metrics_url is not None and not watch:
        raise click.UsageError("--metrics-url goes with --watch")
    cfg = obj.config()
    if watch:
        from rich.console import Console

        from syncer.watch import metrics_url as default_metrics_url

        _run_async(app.watch(cfg, default_metrics_url(cfg, metrics_url), Console()))
        sys.exit(0)
    limits = Thresholds(max_lag_s, max_dead_letters, min_coverage, require_runner)
    pipelines, slot = _run_async(app.status(cfg))
    if as_json:
        doc = {"pipelines": [p.doc() for p in pipelines]}
        click.echo(orjson.dumps(doc, default=str).decode())
    else:
        status_table(cfg, pipelines, slot)
    failed = [f"pipeline {p.name}: {why}" for p in pipelines for why in limits.passed(p)]
    for line in failed:
        click.echo(line, err=True)
    sys.exit(EXIT_THRESHOLD if failed else 0)


def status_table(cfg: Config, pipelines: list[PipelineStatus], slot: Any) -> None:
    click.echo(
        f"{'pipeline':20} {'state':>7} {'queued':>8} {'working':>8} {'retry':>8} "
        f"{'oldest_s':>9} {'dead':>6} {'coverage':>9} {'runners':>7}"
    )
    for p in pipelines:
        cov = "-" if p.coverage is None else f"{100 * p.coverage:.2f}%"
        cov += "" if p.coverage_exact else "~"
        click.echo(
            f"{p.name:20} {'paused' if p.paused else 'active':>7} {p.queued:>8} "
            f"{p.in_progress:>8} {p.delayed:>8} {p.oldest_age_s:>9.1f} "
            f"{sum(p.dead_letters.values()):>6} {cov:>9} {len(p.runners):>7}"
        )
    if cfg.capture.mode == "logical":
        name = cfg.capture.slot
        if slot is None:
            click.echo(f"logical slot {name}: MISSING (run `syncer install`)")
        else:
            state = "read by a worker" if slot["active"] else "NOT READ by any worker"
            click.echo(
                f"logical slot {name}: {state}, {slot['behind']} bytes of WAL not yet read, "
                f"{slot['retained']} bytes retained"
            )


@main.command()
@click.option(
    "--mode",
    type=click.Choice(["trigger", "logical"]),
    default=None,
    help="The capture mode to grant for (default: the config's [capture] mode).",
)
@click.option("--install-role", default="syncer_install", show_default=True)
@click.option("--run-role", default="syncer_run", show_default=True)
@click.pass_obj
def roles(obj: Ctx, mode: str | None, install_role: str, run_role: str) -> None:
    """Print the SQL that creates least-privileged roles for install and run."""
    from syncer import roles as roles_mod

    cfg = obj.config()
    chosen: roles_mod.Mode = "logical" if (mode or cfg.capture.mode) == "logical" else "trigger"
    click.echo(roles_mod.render(cfg, chosen, roles_mod.RoleNames(install_role, run_role)), nl=False)


@main.command("replay-dlq")
@click.option("--pipeline", default=None, help="Only this pipeline.")
@click.option("--error-class", default=None, help="Only this error class (see `dlq list`).")
@click.option(
    "--since",
    type=click.DateTime(["%Y-%m-%d", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M:%S"]),
    default=None,
    help="Only dead letters that last failed at or after this time (UTC).",
)
@click.option("--limit", type=click.IntRange(min=1), default=None, help="At most this many.")
@click.option("--dry-run", is_flag=True, help="Show what would move; move nothing.")
@click.pass_obj
def replay_dlq(
    obj: Ctx,
    pipeline: str | None,
    error_class: str | None,
    since: datetime | None,
    limit: int | None,
    dry_run: bool,
) -> None:
    """Move dead letters back to the queue (one transaction)."""
    cfg = obj.config()
    since_utc = since.replace(tzinfo=UTC) if since else None
    f = app.DeadLetterFilter(pipeline, error_class, since_utc, limit)
    n, rows = _run_async(app.replay_dead_letters(cfg, f, dry_run))
    if dry_run:
        for r in rows:
            click.echo(f"{r['pipeline']}\t{r['key']}\t{r['error_class']}\t{r['error'][:120]}")
        click.echo(f"would replay {n} dead letters")
    else:
        click.echo(f"replayed {n} dead letters")


@main.group()
def dlq() -> None:
    """Inspect the dead-letter table."""


@dlq.command("list")
@click.option("--pipeline", default=None, help="Only this pipeline.")
@click.option("--newest", type=click.IntRange(min=0), default=20, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_obj
def dlq_list(obj: Ctx, pipeline: str | None, newest: int, as_json: bool) -> None:
    """Counts by pipeline and error class, and the newest errors (never row text)."""
    cfg = obj.config()
    counts, latest = _run_async(app.dead_letter_report(cfg, pipeline, newest))
    if as_json:
        doc = {
            "counts": [dict(r) for r in counts],
            "newest": [{**dict(r), "key": orjson.loads(r["key"])} for r in latest],
        }
        click.echo(orjson.dumps(doc, default=str).decode())
        return
    click.echo(f"{'pipeline':20} {'error_class':20} {'count':>7}  newest")
    for r in counts:
        click.echo(
            f"{r['pipeline']:20} {r['error_class']:20} {r['n']:>7}  {r['newest']:%Y-%m-%d %H:%M:%S}"
        )
    for r in latest:
        click.echo(
            f"{r['last_failed_at']:%Y-%m-%d %H:%M:%S} {r['pipeline']} {r['key']} {r['error_class']}: {r['error'][:200]}"
        )


@main.group()
def chunks() -> None:
    """Chunk pipelines: see how documents split."""


@chunks.command("preview")
@click.option("--pipeline", required=True, help="A pipeline with target = 'chunks'.")
@click.option("--key", required=True, help="The row's key as JSON, like '{\"id\": 42}'.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_obj
def chunks_preview(obj: Ctx, pipeline: str, key: str, as_json: bool) -> None:
    """How a row splits: indices, offsets, sizes, and which chunks would be embedded."""
    from syncer.preview import preview

    cfg = obj.config()
    pv = _run_async(preview(cfg, pipeline, key))
    if as_json:
        doc = {**pv.__dict__, "chunks": [c.__dict__ for c in pv.chunks], "to_embed": pv.to_embed}
        click.echo(orjson.dumps(doc).decode())
        return
    if not pv.present:
        click.echo(f"row {pv.key}: not found or no text ({pv.stored_chunks} chunks stored)")
        return
    state = "current" if pv.current else "not current"
    click.echo(
        f"row {pv.key}: {len(pv.chunks)} chunks, {pv.to_embed} to embed, "
        f"{len(pv.chunks) - pv.to_embed} reuse a stored vector (stored chunks: {state})"
    )
    click.echo(
        f"{'index':>5} {'start':>8} {'end':>8} {'units':>6} {'tokens':>6}  {'vector':8} text"
    )
    for c in pv.chunks:
        click.echo(
            f"{c.index:>5} {c.start:>8} {c.end:>8} {c.units:>6} {c.tokens:>6}  "
            f"{'stored' if c.stored else 'embed':8} {c.preview}"
        )


if __name__ == "__main__":  # pragma: no cover
    main()
