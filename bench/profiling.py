"""A CPU profile of the real `syncer run` command, taken with py-spy (native frames too, so
asyncpg's Cython codecs, base64 and the garbage collector show up), and its summary.

py-spy is optional (`pip install py-spy`): without it the summary says so and the figures
are unaffected. Sampling pauses the process, so a profiled run is never a measured run.
"""

from __future__ import annotations

import shutil
import sys
from collections import Counter
from pathlib import Path

SAMPLES_PER_S = 250
TOP = 15
_LOOP_RUNNERS = ("Runner.run ", "run (uvloop/", "run (asyncio/")


def py_spy() -> str | None:
    return shutil.which("py-spy") or _beside_python("py-spy")


def _beside_python(name: str) -> str | None:
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else None


def wrap(command: list[str], output: Path) -> list[str]:
    """`command` under py-spy, writing collapsed stacks ("f1;f2;f3 count") to `output`."""
    spy = py_spy()
    assert spy is not None
    options = ["--rate", str(SAMPLES_PER_S), "--native", "--function", "--format", "raw"]
    return [spy, "record", *options, "--output", str(output), "--", *command]


def _stacks(path: Path) -> list[tuple[list[str], int]]:
    out = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            out.append((stack.split(";"), int(count)))
    return out


def _short(frame: str) -> str:
    """A leaf's name; native frames lose their line (one C function, one entry)."""
    name, _, where = frame.partition(" (")
    if name.startswith("0x"):  # an address py-spy could not resolve: name its library
        return f"[native] ({where}"
    if ".py:" in where:
        return frame
    return f"{name} ({where.rpartition(':')[0] or where.rstrip(')')})"


def _stage(frames: list[str]) -> str:
    """What the process was doing: start-up, the innermost of syncer's own functions, or
    the event loop's own native work (polling, socket I/O, the driver's Cython callbacks)."""
    if any(f.startswith("_find_and_load ") for f in frames):
        return "start-up: imports"
    python = [f for f in frames if ".py:" in f and "(syncer/cli.py:" not in f]
    syncer = [f for f in python if "(syncer/" in f]
    if syncer:
        return syncer[-1]
    if python and python[-1].startswith(_LOOP_RUNNERS):
        return "event loop: poll, socket I/O, protocol callbacks (native)"
    if python:
        return f"loop callback: {python[-1]}"
    return f"native: {_short(frames[-1])}"


def summarize(path: Path, top: int = TOP) -> list[str]:
    stacks = _stacks(path) if path.exists() else []
    total = sum(n for _, n in stacks)
    if not total:
        return ["  (no samples: py-spy could not read the process)"]
    stages: Counter[str] = Counter()
    leaves: Counter[str] = Counter()
    for frames, n in stacks:
        stages[_stage(frames)] += n
        leaves[_short(frames[-1])] += n
    cpu_s = total / SAMPLES_PER_S
    lines = [f"  {total} samples of the busy process, ~{cpu_s:.1f} s of CPU (py-spy --native)"]
    lines += ["", "  share  where: innermost syncer function (or start-up, or loop callback)"]
    lines += [f"  {n / total:5.1%}  {name}" for name, n in stages.most_common(top)]
    lines += ["", "  share  top functions by own time (leaf frames)"]
    lines += [f"  {n / total:5.1%}  {name}" for name, n in leaves.most_common(top)]
    return lines
