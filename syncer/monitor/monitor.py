"""A process's monitoring: started before the pool (so a bad observe.listen stops the
process before it claims anything), attached to the worker once it runs."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine, Mapping, Sequence
from typing import Any

from syncer import observe
from syncer.capture import CaptureSide
from syncer.config import Config
from syncer.db import Database
from syncer.monitor.health import Health
from syncer.monitor.loop import LoopWatch, report_allocations, tracemalloc_every_s
from syncer.monitor.sampler import Sampler, SlotLag
from syncer.monitor.server import Server
from syncer.providers import Embedder
from syncer.schema.render import PipelineSQL


class Monitor:
    def __init__(self, cfg: Config, events: observe.Events, listen: str | None) -> None:
        self.cfg = cfg
        self.events = events
        self.loop = LoopWatch(cfg.observe.loop_lag_warn_s, events.emit)
        self.health = Health(self.loop)
        self.server = Server(listen, self.health) if listen else None
        self._tasks: list[asyncio.Task[None]] = []
        self._sampler: Sampler | None = None

    async def start(self) -> None:
        asyncio.get_running_loop().slow_callback_duration = self.cfg.observe.slow_callback_s
        observe.declare(
            [p.name for p in self.cfg.pipelines], sorted({p.provider for p in self.cfg.pipelines})
        )
        if self.server is not None:
            await self.server.start()
        self._spawn(self.loop.run(), "loop-watch")
        if (every_s := tracemalloc_every_s()) is not None:
            self._spawn(report_allocations(every_s), "tracemalloc")

    def attach(
        self,
        db: Database,
        side: CaptureSide,
        tasks: Sequence[asyncio.Task[None]],
        embedders: Mapping[str, Embedder],
        slot_lag: SlotLag | None,
        worker_id: str,
        rendered: Mapping[str, PipelineSQL] | None = None,
    ) -> None:
        """The worker runs: readiness follows its database and capture, the sampler starts."""
        self.health.db = db
        self.health.tasks = tasks
        self.health.capture_state = side.state
        sampler = Sampler(db, self.health, embedders, self.events.emit, slot_lag, worker_id)
        self.events.subscribe(sampler.written)
        self._sampler = sampler
        self._spawn(sampler.run(), "sampler")
        if rendered:
            sampler.rendered = rendered
            self._spawn(sampler.run_coverage(), "coverage-sampler")

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        self._tasks.append(asyncio.create_task(coro, name=name))

    async def close(self) -> None:
        self.health.stopping.set()
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        if self._sampler is not None:
            await self._sampler.forget()
        if self.server is not None:
            await self.server.close()
