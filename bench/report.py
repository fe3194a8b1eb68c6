"""Figures, their targets, the table, the JSON file, and what they were measured on."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import orjson
import psutil

from bench.harness import REPO


@dataclass(frozen=True)
class Metric:
    name: str
    value: float
    unit: str
    note: str = ""  # e.g. "97.1 % of the limit"
    target: str = ""  # e.g. ">= 95 %"
    ok: bool | None = None  # None: no target


@dataclass
class Result:
    scenario: str
    metrics: list[Metric] = field(default_factory=list)
    sections: dict[str, list[str]] = field(default_factory=dict)  # e.g. a profile summary

    def add(self, name: str, value: float, unit: str, note: str = "") -> None:
        self.metrics.append(Metric(name, float(value), unit, note))

    def at_least(self, name: str, value: float, unit: str, floor: float, note: str = "") -> None:
        target = f">= {_number(floor)}"
        self.metrics.append(Metric(name, float(value), unit, note, target, bool(value >= floor)))

    def at_most(self, name: str, value: float, unit: str, ceiling: float, note: str = "") -> None:
        target = f"<= {_number(ceiling)}"
        self.metrics.append(Metric(name, float(value), unit, note, target, bool(value <= ceiling)))


def _number(value: float) -> str:
    if value != value or value in (float("inf"), float("-inf")):
        return str(value)
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}" if value else "0"


def table(results: list[Result]) -> str:
    rows = [("scenario", "metric", "value", "unit", "target", "", "note")]
    for r in results:
        for m in r.metrics:
            verdict = "" if m.ok is None else ("ok" if m.ok else "MISS")
            rows.append((r.scenario, m.name, _number(m.value), m.unit, m.target, verdict, m.note))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = [
            c.rjust(w) if i == 2 else c.ljust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def sections(results: list[Result]) -> str:
    out = []
    for r in results:
        for title, lines in r.sections.items():
            out += [f"\n{r.scenario}: {title}", *lines]
    return "\n".join(out)


def machine() -> dict[str, Any]:
    model = ""
    with open("/proc/cpuinfo", encoding="utf-8") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cores": os.cpu_count(),
        "physical_cores": psutil.cpu_count(logical=False),
        "memory_gb": round(psutil.virtual_memory().total / 1024**3, 1),
        "cpu_model": model or platform.processor(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "os": platform.platform(),
    }


def versions(postgres: str, pgvector: str) -> dict[str, str]:
    return {
        "python": sys.version.split()[0],
        "postgresql": postgres,
        "pgvector": pgvector,
        "syncer_commit": _git_commit(),
        **{name: metadata.version(name) for name in ("asyncpg", "uvloop", "aiohttp", "numpy")},
    }


def _git_commit() -> str:
    def git(*args: str) -> str:
        done = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True)
        return done.stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    return commit + ("+dirty" if git("status", "--porcelain", "--", "syncer") else "")


def header(info: dict[str, Any]) -> str:
    m, v = info["machine"], info["versions"]
    return (
        f"machine: {m['cores']} cores ({m['physical_cores']} physical), {m['memory_gb']} GB, "
        f"{m['cpu_model']}, load {m['load_average']}\n"
        f"versions: python {v['python']}, PostgreSQL {v['postgresql']}, pgvector "
        f"{v['pgvector']}, syncer {v['syncer_commit']}, asyncpg {v['asyncpg']}, "
        f"uvloop {v['uvloop']}"
    )


def write_json(path: Path, info: dict[str, Any], results: list[Result]) -> None:
    doc = {
        **info,
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "scenarios": {
            r.scenario: {"metrics": [asdict(m) for m in r.metrics], "sections": r.sections}
            for r in results
        },
    }
    path.write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2))
