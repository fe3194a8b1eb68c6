"""Trigger-mode capture, worker side: LISTEN for wake-ups, with polling as the fallback.

The triggers themselves (installed by syncer.schema) put keys in the queue inside the
user's transaction; a NOTIFY only wakes workers early, so a lost one only delays.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any

import asyncpg

log = logging.getLogger("syncer.capture")
CHANNEL = "syncer"


class Listener:
    """One dedicated connection LISTENing on the `syncer` channel; reconnects when lost."""

    def __init__(
        self, dsn: str, wakeups: Mapping[str, asyncio.Event], connect_kwargs: dict[str, Any]
    ) -> None:
        self.dsn = dsn
        self.wakeups = wakeups
        self.connect_kwargs = connect_kwargs

    def _on_notify(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        event = self.wakeups.get(payload)
        if event is not None:
            event.set()

    def _wake_all(self) -> None:
        for event in self.wakeups.values():
            event.set()

    async def run(self, stop: asyncio.Event) -> None:
        delay_s = 0.5
        while not stop.is_set():
            lost = asyncio.Event()
            try:
                conn = await asyncpg.connect(self.dsn, **self.connect_kwargs)
            except (OSError, asyncpg.PostgresError) as err:
                log.warning("listener cannot connect, retrying", extra={"error": str(err)})
                await wait_first(stop, timeout_s=delay_s)
                delay_s = min(delay_s * 2, 30.0)
                continue
            delay_s = 0.5
            try:
                conn.add_termination_listener(lambda _c, lost=lost: lost.set())
                await conn.add_listener(CHANNEL, self._on_notify)
                # Notifications sent while we were not listening are lost: look once now.
                self._wake_all()
                await wait_first(stop, lost)
            finally:
                if not conn.is_closed():
                    await conn.close(timeout=5)


async def wait_first(*events: asyncio.Event, timeout_s: float | None = None) -> None:
    """Return when any event is set, or after timeout_s."""
    waits = [asyncio.create_task(e.wait()) for e in events]
    try:
        await asyncio.wait(waits, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in waits:
            t.cancel()
