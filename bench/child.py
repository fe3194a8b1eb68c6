"""The syncer worker as `syncer run --exit-when-idle` runs it, on the event loop of your
choice: the CLI always uses uvloop, and this module needs no change to the core.

    python -m bench.child -c CONFIG --loop asyncio|uvloop
    python -m bench.child -c CONFIG --capture-only

--capture-only runs the worker's capture side alone (syncer.capture's Listener and, by
capture.mode, the InboxMover or the logical SlotReader, as `syncer run` starts them) until
SIGTERM: capture_cost measures the user's writes while a worker queues what they changed,
without the embedding work competing for the cores.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import uvloop

from syncer import app, config
from syncer.capture import start_capture_side
from syncer.db import Database, create_pool
from syncer.observe import setup_logging

LOOPS: dict[str, Callable[[Coroutine[Any, Any, app.RunResult]], app.RunResult]] = {
    "asyncio": asyncio.run,
    "uvloop": uvloop.run,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.child")
    parser.add_argument("-c", "--config", type=Path, required=True)
    parser.add_argument("--loop", choices=sorted(LOOPS), default="uvloop")
    parser.add_argument("--capture-only", action="store_true")
    args = parser.parse_args(argv)
    setup_logging("warning")
    cfg = config.load(args.config)
    if args.capture_only:
        uvloop.run(capture_only(cfg))
        return 0
    embedders = app.make_embedders(cfg, args.config)
    result = LOOPS[args.loop](app.run(cfg, embedders, exit_when_idle=True))
    return result.exit_code


async def capture_only(cfg: config.Config) -> None:
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    pool = await create_pool(cfg.database)
    wakeups = {p.name: asyncio.Event() for p in cfg.pipelines}
    try:
        async with pool.acquire() as conn:
            rendered = {p.name: await app.checked_pipeline(conn, p) for p in cfg.pipelines}  # type: ignore[arg-type]
        side = start_capture_side(cfg, Database(pool), wakeups, stop, rendered)
        await asyncio.gather(side.listener, side.feeder)
    finally:
        await pool.close()


if __name__ == "__main__":
    sys.exit(main())
