"""Progress of a long command (`syncer backfill`, `syncer run --exit-when-idle`): a rich bar on
a terminal (items done of total, rows/s, ETA), a log line every 10 s otherwise.

The command says how far it is (`Reporter.update`); the reporter draws or logs on its own
task, so counting costs the work nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
from collections.abc import Awaitable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from syncer.observe import Event, Failed, Finished, QueueSampled

log = logging.getLogger("syncer.progress")

LOG_EVERY_S = 10.0
REFRESH_S = 0.5
T = TypeVar("T")


class RateColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        return Text(f"{task.speed or 0:,.0f} rows/s", style="progress.data.speed")


class Reporter:
    """`what` names the work in the bar and the log lines (e.g. "embedded")."""

    def __init__(
        self,
        what: str,
        console: Console | None = None,
        log_every_s: float = LOG_EVERY_S,
        refresh_s: float = REFRESH_S,
    ) -> None:
        self.what = what
        self.done = 0
        self.total: int | None = None
        self.log_every_s = log_every_s
        self.refresh_s = refresh_s
        self.started = time.monotonic()
        self._last = (self.started, 0)  # the last log line's time and count
        self.console = console
        if console is None and sys.stderr.isatty():
            self.console = Console(stderr=True)

    def update(self, done: int, total: int | None) -> None:
        self.done = done
        self.total = None if total is None else max(total, done)

    @property
    def on_terminal(self) -> bool:
        return self.console is not None

    def bar(self) -> Progress:
        return Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            RateColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=self.console,
            redirect_stderr=True,
            refresh_per_second=1 / self.refresh_s,
        )

    async def run(self) -> None:
        """Until cancelled: the bar on a terminal, else a line every `log_every_s`."""
        if not self.on_terminal:
            while True:
                await asyncio.sleep(self.log_every_s)
                self.log_line()
        with self.bar() as bar, _logs_through_bar():
            task = bar.add_task(self.what, total=self.total)
            try:
                while True:
                    bar.update(task, completed=self.done, total=self.total)
                    await asyncio.sleep(self.refresh_s)
            finally:
                bar.update(task, completed=self.done, total=self.total)

    def log_line(self) -> None:
        now = time.monotonic()
        since, before = self._last
        self._last = (now, self.done)
        rate = (self.done - before) / max(now - since, 1e-9)
        extra: dict[str, object] = {"done": self.done, "total": self.total}
        extra["rows_per_s"] = round(rate, 1)
        if self.total is not None and rate > 0:
            extra["eta_s"] = round((self.total - self.done) / rate, 1)
        log.info(f"progress: {self.what} {self.done} of {self.total or '?'}", extra=extra)


@contextmanager
def _logs_through_bar() -> Iterator[None]:
    """Log lines go through the bar's stderr proxy, so they print above it, not through it."""
    handlers = [
        h
        for name in ("syncer", "asyncpg")
        for h in logging.getLogger(name).handlers
        if isinstance(h, logging.StreamHandler)
    ]
    streams = [h.setStream(sys.stderr) for h in handlers]
    try:
        yield
    finally:
        for h, stream in zip(handlers, streams, strict=True):
            if stream is not None:
                h.setStream(stream)


async def reporting(reporter: Reporter, work: Awaitable[T]) -> T:
    """Await `work` with the reporter drawing (or logging) beside it."""
    task = asyncio.create_task(reporter.run(), name="progress")
    try:
        result = await work
        if reporter.total is None:  # no estimate came: what was done was all there was
            reporter.update(reporter.done, reporter.done)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    if not reporter.on_terminal:
        reporter.log_line()  # the last figures, once the work is done
    return result


class DrainProgress:
    """A subscriber for `run --exit-when-idle`: items finished (written, unchanged, cleared,
    stale, dead-lettered) of those finished plus what the sampler last saw queued."""

    def __init__(self, reporter: Reporter) -> None:
        self.reporter = reporter
        self.done = 0
        self.left: dict[str, int] = {}
        self.total: int | None = None  # as of the last sample (steady in between)

    def __call__(self, event: Event) -> None:
        match event:
            case Finished(_, _, n) | Failed(_, "dead_lettered", n):
                self.done += n
            case QueueSampled(pipeline, ready, leased, delayed):
                self.left[pipeline] = ready + leased + delayed
                self.total = self.done + sum(self.left.values())
            case _:
                return
        self.reporter.update(self.done, self.total)
