"""The syncer worker as `syncer run --exit-when-idle` runs it, on the event loop of your
choice: the CLI always uses uvloop, and this module needs no change to the core.

    python -m bench.child -c CONFIG --loop asyncio|uvloop
    python -m bench.child -c CONFIG --inbox-only

--inbox-only runs the worker's capture side alone (syncer.capture's Listener and
InboxMover, as `syncer run` starts them) until SIGTERM: capture_cost measures the user's
writes while a worker drains the inbox, without the embedding work competing for the cores.
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
from syncer.db import create_pool
from syncer.observe import setup_logging

LOOPS: dict[str, Callable[[Coroutine[Any, Any, app.RunResult]], app.RunResult]] = {
    "asyncio": asyncio.run,
    "uvloop": uvloop.run,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.child")
    parser.add_argument("-c", "--config", type=Path, required=True)
    parser.add_argument("--loop", choices=sorted(LOOPS), default="uvloop")
    parser.add_argument("--inbox-only", action="store_true")
    args = parser.parse_args(argv)
    setup_logging("warning")
    cfg = config.load(args.config)
    if args.inbox_only:
        uvloop.run(inbox_only(cfg))
        return 0
    embedders = app.make_embedders(cfg, args.config)
    result = LOOPS[args.loop](app.run(cfg, embedders, exit_when_idle=True))
    return result.exit_code


async def inbox_only(cfg: config.Config) -> None:
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    pool = await create_pool(cfg.database)
    wakeups = {p.name: asyncio.Event() for p in cfg.pipelines}
    try:
        await asyncio.gather(*start_capture_side(cfg, pool, wakeups, stop))
    finally:
        await pool.close()


if __name__ == "__main__":
    sys.exit(main())
