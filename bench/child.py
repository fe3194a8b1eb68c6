"""The syncer worker as `syncer run --exit-when-idle` runs it, on the event loop of your
choice: the CLI always uses uvloop, and this module needs no change to the core.

    python -m bench.child -c CONFIG --loop asyncio|uvloop
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import uvloop

from syncer import app, config
from syncer.observe import setup_logging

LOOPS: dict[str, Callable[[Coroutine[Any, Any, app.RunResult]], app.RunResult]] = {
    "asyncio": asyncio.run,
    "uvloop": uvloop.run,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.child")
    parser.add_argument("-c", "--config", type=Path, required=True)
    parser.add_argument("--loop", choices=sorted(LOOPS), default="uvloop")
    args = parser.parse_args(argv)
    setup_logging("warning")
    cfg = config.load(args.config)
    embedders = app.make_embedders(cfg, args.config)
    result = LOOPS[args.loop](app.run(cfg, embedders, exit_when_idle=True))
    return result.exit_code


if __name__ == "__main__":
    sys.exit(main())
