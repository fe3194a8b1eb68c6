"""syncer.capture.notify: each channel's payload parsed into its message, dispatched to its
handler, and a real LISTEN connection that hears them and looks again after a reconnect."""

from __future__ import annotations

import asyncio
from typing import Any

import psycopg

from syncer.capture.notify import (
    CHANNELS,
    Captured,
    Control,
    Handlers,
    Listener,
    Message,
    Wakeup,
    parse,
    worker_handlers,
)
from syncer.db import connect_kwargs


def test_each_channel_is_parsed_into_its_message() -> None:
    # The channels and payloads the triggers, the slot reader and the commands send.
    assert CHANNELS == ("syncer", "syncer_inbox", "syncer_control")
    assert parse("syncer", "docs") == Wakeup("docs")
    assert parse("syncer_inbox", "docs") == Captured("docs")
    assert parse("syncer_control", "pause:docs") == Control("docs", paused=True)
    assert parse("syncer_control", "resume:a:b") == Control("a:b", paused=False)
    assert parse("syncer_control", "stop:docs") is None
    assert parse("syncer_control", "pause:") is None
    assert parse("somebody_else", "docs") is None


def test_messages_go_to_their_handlers() -> None:
    seen: list[Message | str] = []
    handlers = Handlers(seen.append, seen.append, lambda: seen.append("connected"))
    handlers.dispatch(Captured("a"))
    handlers.dispatch(Wakeup("b"))
    handlers.dispatch(Control("c", paused=True))  # no control handler: ignored
    assert seen == [Captured("a"), Wakeup("b")]
    Handlers(seen.append, seen.append, seen.clear, seen.append).dispatch(Control("c", False))
    assert seen[-1] == Control("c", False)


def test_worker_handlers_wake_the_claimer_the_mover_or_everyone() -> None:
    wakeups = {"a": asyncio.Event(), "b": asyncio.Event()}
    kick = asyncio.Event()
    handlers = worker_handlers(wakeups, kick)
    handlers.dispatch(Wakeup("a"))
    handlers.dispatch(Wakeup("not_configured_here"))
    assert [wakeups["a"].is_set(), wakeups["b"].is_set(), kick.is_set()] == [True, False, False]
    handlers.dispatch(Captured("b"))
    assert kick.is_set() and not wakeups["b"].is_set()
    wakeups["a"].clear()
    kick.clear()
    handlers.connected()
    assert all(e.is_set() for e in wakeups.values()) and kick.is_set()
    worker_handlers(wakeups).dispatch(Captured("a"))  # logical mode: no mover to wake


async def _next(queue: asyncio.Queue[Message | str]) -> Message | str:
    return await asyncio.wait_for(queue.get(), timeout=10)


async def test_listener_hears_every_channel_and_looks_again_after_a_reconnect(
    db: psycopg.Connection[Any], db_url: str
) -> None:
    got: asyncio.Queue[Message | str] = asyncio.Queue()
    handlers = Handlers(got.put_nowait, got.put_nowait, lambda: got.put_nowait("connected"))
    stop = asyncio.Event()
    task = asyncio.create_task(Listener(db_url, handlers, connect_kwargs()).run(stop))
    try:
        assert await _next(got) == "connected"
        db.execute("SELECT pg_notify('syncer_inbox', 'docs'), pg_notify('other', 'x')")
        db.execute("SELECT pg_notify('syncer', 'docs')")
        assert [await _next(got), await _next(got)] == [Captured("docs"), Wakeup("docs")]
        # The connection is lost: what was sent meanwhile is gone, so it says to look.
        db.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND query LIKE 'LISTEN%'"
        )
        assert await _next(got) == "connected"
        db.execute("SELECT pg_notify('syncer', 'again')")
        assert await _next(got) == Wakeup("again")
        assert got.empty()
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
