"""Small asyncio helpers shared by the capture side and the worker."""

from __future__ import annotations

import asyncio


async def wait_first(*events: asyncio.Event, timeout_s: float | None = None) -> None:
    """Return when any event is set, or after timeout_s."""
    waits = [asyncio.create_task(e.wait()) for e in events]
    try:
        await asyncio.wait(waits, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in waits:
            t.cancel()
