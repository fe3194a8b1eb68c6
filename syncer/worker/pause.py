"""Which pipelines are paused (`syncer pause`), as the database says, for one process.

The state lives in syncer.pipelines, so every replica honours it. A process reads it at start,
on every NOTIFY of the control channel, and every PAUSE_POLL_S (a lost NOTIFY or one sent
while the listener reconnected only delays). A paused pipeline's claimer claims nothing and
its embedding tasks send nothing: a request not yet sent goes back to the queue, one on its
way finishes.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Iterable

from syncer.aio import wait_first
from syncer.capture.notify import Control
from syncer.db import Database
from syncer.sqlfiles import query

log = logging.getLogger("syncer.worker")

PAUSE_POLL_S = 1.0  # with a NOTIFY lost, a pause still holds within two of these


class Pauses:
    def __init__(self, pipelines: Iterable[str]) -> None:
        self._resumed = {name: asyncio.Event() for name in pipelines}
        for event in self._resumed.values():
            event.set()
        self._look = asyncio.Event()

    def is_paused(self, pipeline: str) -> bool:
        event = self._resumed.get(pipeline)
        return event is not None and not event.is_set()

    def resumed(self, pipeline: str) -> asyncio.Event:
        """Set while the pipeline runs: a paused claimer waits on it."""
        return self._resumed[pipeline]

    def heard(self, _msg: Control) -> None:
        """A control NOTIFY: read the state again now (the database, not the message, is
        the truth: a pause and a resume sent close together arrive in either order)."""
        self._look.set()

    def apply(self, paused: set[str]) -> None:
        for name, event in self._resumed.items():
            if name in paused and event.is_set():
                event.clear()
                log.info("pipeline paused: claims stop", extra={"pipeline": name})
            elif name not in paused and not event.is_set():
                event.set()
                log.info("pipeline resumed", extra={"pipeline": name})

    async def refresh(self, db: Database) -> None:
        rows = await db.call(db.pool.fetch, query("pipelines_paused"))
        self.apply({r["name"] for r in rows})

    async def run(self, db: Database, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self._look.clear()
            await self.refresh(db)
            await wait_first(stop, self._look, timeout_s=PAUSE_POLL_S * random.uniform(0.8, 1.0))
