"""Loads the named SQL blocks from the sql/ folder (`-- name --` starts a block)."""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

SQL_DIR = Path(__file__).resolve().parent / "sql"
_BLOCK_RE = re.compile(r"^-- ([a-z_]+) --$", re.MULTILINE)


def read(name: str) -> str:
    return (SQL_DIR / name).read_text(encoding="utf-8")


@cache
def blocks(name: str) -> dict[str, str]:
    text = read(name)
    parts = _BLOCK_RE.split(text)
    # parts = [preamble, name1, body1, name2, body2, ...]
    return {parts[i]: parts[i + 1].strip() for i in range(1, len(parts), 2)}


def query(name: str) -> str:
    return blocks("queries.sql")[name]
