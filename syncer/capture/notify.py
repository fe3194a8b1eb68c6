"""The LISTEN connection: syncer's notifications, parsed into typed messages in one place
and handed to handlers.

What is sent (by the capture triggers, the slot reader, backfill and replay-dlq), one
message kind per channel, the payload a pipeline's name:
- `syncer`: the pipeline's queue has new items (Wakeup), for its claimer;
- `syncer_inbox`: the pipeline's rows were captured into the inbox (Captured), for the
  inbox mover;
- `syncer_control`: `pause:<pipeline>` or `resume:<pipeline>` (Control), sent by
  `syncer pause` and `syncer resume`, for the process's pause state.
A NOTIFY only wakes a waiter early: everything it announces is also found by a poll, so a
lost one only delays. A new kind is a dataclass here, its channel in `_KINDS`, and a field
of Handlers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, assert_never

import asyncpg

from syncer.aio import wait_first
from syncer.db import LOST, PROBE_MAX_S, PROBE_MIN_S, connect_kwargs

log = logging.getLogger("syncer.capture")
CHANNEL = "syncer"  # payload: a pipeline whose queue has new items
INBOX_CHANNEL = "syncer_inbox"  # payload: a pipeline whose rows were captured
CONTROL_CHANNEL = "syncer_control"  # payload: "pause:<pipeline>" or "resume:<pipeline>"


@dataclass(frozen=True)
class Wakeup:
    """The pipeline's queue has new items."""

    pipeline: str


@dataclass(frozen=True)
class Captured:
    """The pipeline's rows were captured into the inbox."""

    pipeline: str


@dataclass(frozen=True)
class Control:
    """The pipeline was paused (or resumed): the state is in syncer.pipelines."""

    pipeline: str
    paused: bool


def _control(payload: str) -> Control | None:
    action, _, pipeline = payload.partition(":")
    if action not in ("pause", "resume") or not pipeline:
        return None  # not ours: ignored, the poll reads the state anyway
    return Control(pipeline, action == "pause")


Message = Wakeup | Captured | Control

_KINDS: dict[str, Callable[[str], Message | None]] = {
    CHANNEL: Wakeup,
    INBOX_CHANNEL: Captured,
    CONTROL_CHANNEL: _control,
}
CHANNELS = tuple(_KINDS)


def parse(channel: str, payload: str) -> Message | None:
    """The message a notification carries; None for a channel syncer does not know."""
    kind = _KINDS.get(channel)
    return kind(payload) if kind is not None else None


@dataclass(frozen=True)
class Handlers:
    """What to do with each kind of message, and after each (re)connect: notifications
    sent while nobody listened are lost, so whatever they would have woken must look now."""

    wakeup: Callable[[Wakeup], None]
    captured: Callable[[Captured], None]
    connected: Callable[[], None]
    control: Callable[[Control], None] = lambda _msg: None

    def dispatch(self, msg: Message) -> None:
        match msg:
            case Wakeup():
                self.wakeup(msg)
            case Captured():
                self.captured(msg)
            case Control():
                self.control(msg)
            case _:
                assert_never(msg)


def worker_handlers(
    wakeups: Mapping[str, asyncio.Event],
    kick: asyncio.Event | None = None,
    control: Callable[[Control], None] | None = None,
) -> Handlers:
    """A worker's: a Wakeup wakes its pipeline's claimer, a Captured wakes the inbox mover
    (`kick`; logical mode has none), a Control goes to the pause state (`control`), a
    (re)connect wakes them all."""

    def wakeup(msg: Wakeup) -> None:
        event = wakeups.get(msg.pipeline)
        if event is not None:
            event.set()

    def captured(_msg: Captured) -> None:
        if kick is not None:
            kick.set()

    def connected() -> None:
        if kick is not None:
            kick.set()
        for event in wakeups.values():
            event.set()

    return Handlers(wakeup, captured, connected, control or (lambda _msg: None))


class Listener:
    """One dedicated connection LISTENing on syncer's channels; reconnects when lost."""

    def __init__(self, dsn: str, handlers: Handlers, connect_kwargs: dict[str, Any]) -> None:
        self.dsn = dsn
        self.handlers = handlers
        self.connect_kwargs = connect_kwargs

    def _on_notify(self, _conn: Any, _pid: int, channel: str, payload: str) -> None:
        msg = parse(channel, payload)
        if msg is not None:
            self.handlers.dispatch(msg)

    async def run(self, stop: asyncio.Event) -> None:
        delay_s = PROBE_MIN_S
        lost_at: float | None = None
        while not stop.is_set():
            lost = asyncio.Event()
            try:
                conn = await asyncpg.connect(self.dsn, **self.connect_kwargs)
            except (*LOST, asyncpg.PostgresError) as err:
                if lost_at is None:  # one line an outage, not one a try
                    lost_at = time.monotonic()
                    log.warning("listener cannot connect, retrying", extra={"error": str(err)})
                await wait_first(stop, timeout_s=delay_s * random.uniform(0.5, 1.0))
                delay_s = min(delay_s * 2, PROBE_MAX_S)
                continue
            delay_s = PROBE_MIN_S
            if lost_at is not None:
                log.info(
                    "listener connected again",
                    extra={"down_s": round(time.monotonic() - lost_at, 3)},
                )
                lost_at = None
            try:
                conn.add_termination_listener(lambda _c, lost=lost: lost.set())
                for channel in CHANNELS:
                    await conn.add_listener(channel, self._on_notify)
                # Notifications sent while we were not listening are lost: look once now.
                self.handlers.connected()
                await wait_first(stop, lost)
            except LOST:
                pass  # the server went away meanwhile: connect again
            finally:
                if not conn.is_closed():
                    with contextlib.suppress(*LOST):
                        await conn.close(timeout=5)


def start_listener(dsn: str, handlers: Handlers, stop: asyncio.Event) -> asyncio.Task[None]:
    listener = Listener(dsn, handlers, connect_kwargs())
    return asyncio.create_task(listener.run(stop), name="listener")
