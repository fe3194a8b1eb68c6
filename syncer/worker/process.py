"""One process: every configured pipeline, one capture side, one pool."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import socket
import uuid

import asyncpg

from syncer.capture import source_for, start_capture_side
from syncer.config import Config
from syncer.db import Database
from syncer.monitor import Monitor
from syncer.observe import Events
from syncer.providers import Embedder, GuardedClient
from syncer.queue import Queue
from syncer.schema.render import PipelineSQL
from syncer.targets import store_for
from syncer.worker.pause import Pauses
from syncer.worker.runner import PipelineRunner, supervise

log = logging.getLogger("syncer.worker")


class Worker:
    """One process: every configured pipeline, one LISTEN connection, one pool."""

    def __init__(
        self,
        cfg: Config,
        pool: asyncpg.Pool,
        embedders: dict[str, Embedder],
        rendered: dict[str, PipelineSQL],
        events: Events,
        monitor: Monitor | None = None,
    ) -> None:
        self.cfg = cfg
        self.monitor = monitor
        self.embedders = embedders
        for e in embedders.values():
            if isinstance(e, GuardedClient):
                e.emit = events.emit
        self.pool = pool
        self.events = events
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.queue = Queue(pool, self.worker_id, cfg.worker.lease_s)
        # Every stage waits here while the database is away, instead of failing.
        self.db = Database(pool)
        self.wakeups = {p.name: asyncio.Event() for p in cfg.pipelines}
        self.rendered = rendered
        # Logical mode: vector writes to a watched table would come back through the slot.
        mark_own = source_for(cfg).marks_own_writes
        self.runners = [
            PipelineRunner(
                p,
                cfg.worker,
                self.queue,
                self.db,
                store_for(pool, p, rendered[p.name], mark_own),
                embedders[p.provider],
                p.provider,
                cfg.providers[p.provider],
                events,
                self.wakeups[p.name],
            )
            for p in cfg.pipelines
        ]

    async def run(self, stop: asyncio.Event, exit_when_idle: bool = False) -> None:
        pauses = Pauses(self.wakeups)
        await pauses.refresh(self.db)  # a pipeline paused before the start claims nothing
        side = start_capture_side(
            self.cfg, self.db, self.wakeups, stop, self.rendered, pauses.heard
        )
        listener, feeder = side.listener, side.feeder
        watch = asyncio.create_task(pauses.run(self.db, stop), name="pauses")
        for r in self.runners:
            r.claimer.capture_caught_up = side.caught_up
            r.claimer.pauses = pauses
            r.embedding.paused = functools.partial(pauses.is_paused, r.p.name)
        runs = [
            asyncio.create_task(r.run(stop, exit_when_idle), name=r.p.name) for r in self.runners
        ]
        if self.monitor is not None:
            source = source_for(self.cfg)
            tasks = [*runs, listener, feeder]
            self.monitor.attach(
                self.db, side, tasks, self.embedders, source.status, self.worker_id, self.rendered
            )
        log.info(
            "worker started",
            extra={"worker_id": self.worker_id, "pipelines": [r.p.name for r in self.runners]},
        )
        try:
            await supervise(asyncio.gather(*runs), [listener, feeder, watch])
        finally:
            stop.set()
            for t in runs:
                t.cancel()
            await asyncio.gather(*runs, return_exceptions=True)
            # The mover clears its "awake" on the way out, the slot reader queues what it
            # has read; the listener just goes.
            listener.cancel()
            watch.cancel()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(feeder), timeout=5.0)
            feeder.cancel()
            await asyncio.gather(listener, feeder, watch, return_exceptions=True)
