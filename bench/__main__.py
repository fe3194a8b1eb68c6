"""`python -m bench [--quick] [--scenario NAME ...] [--json FILE]`: see bench/RESULTS.md."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
import warnings
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from bench import (
    capture_cost,
    chaos,
    chunks,
    claim_cost,
    faults,
    freshness,
    latency,
    observe_cost,
    quota,
    report,
    splitters,
    throughput,
)
from bench.harness import TEMPLATE, Harness
from bench.report import Result

Scenario = Callable[[Harness, bool], Coroutine[Any, Any, Result]]
SCENARIOS: dict[str, Scenario] = {
    "api_bound": throughput.api_bound,
    "db_bound": throughput.db_bound,
    "latency": latency.run,
    "capture_cost": capture_cost.run,
    "claim_cost": claim_cost.run,
    "memory": throughput.memory,
    "uvloop": throughput.event_loops,
    "quota": quota.run,
    "faults": faults.run,
    "freshness": freshness.run,
    "splitters": splitters.run,
    "chunks": chunks.run,
    "observe_cost": observe_cost.run,
    "chaos": chaos.run,  # last: it restarts the database server
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a smaller run (under 2 minutes)")
    parser.add_argument(
        "--scenario",
        action="append",
        choices=list(SCENARIOS),
        help="run only this one (repeatable)",
    )
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    return parser.parse_args(argv)


async def _info(h: Harness, quick: bool) -> dict[str, Any]:
    conn = await h.connect(h.server.url(TEMPLATE))
    try:
        postgres = await conn.fetchval("SHOW server_version")
        pgvector = await conn.fetchval(
            "SELECT extversion FROM pg_extension WHERE extname = 'vector'"
        )
    finally:
        await conn.close()
    return {
        "quick": quick,
        "machine": report.machine(),
        "versions": report.versions(postgres, pgvector),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    warnings.filterwarnings("ignore", module="platformdirs")
    names = args.scenario or list(SCENARIOS)
    results: list[Result] = []
    with Harness() as h:
        info = asyncio.run(_info(h, args.quick))
        print(report.header(info), flush=True)
        for name in names:
            started = time.perf_counter()
            print(f"running {name} ...", file=sys.stderr, flush=True)
            results.append(asyncio.run(SCENARIOS[name](h, args.quick)))
            print(f"  {name} took {time.perf_counter() - started:.0f} s", file=sys.stderr)
    print()
    print(report.table(results))
    print(report.sections(results))
    if args.json:
        report.write_json(args.json, info, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
