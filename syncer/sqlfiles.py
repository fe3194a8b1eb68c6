"""Loads the SQL files shipped in the package's sql/ folder; `-- name --` starts a named block.

Read through importlib.resources, so an installed wheel (no source tree, maybe a zip)
finds them as well as a checkout does.
"""

from __future__ import annotations

import re
from functools import cache
from importlib.resources import files
from importlib.resources.abc import Traversable

_BLOCK_RE = re.compile(r"^-- ([a-z_]+) --$", re.MULTILINE)


def sql_dir() -> Traversable:
    return files("syncer") / "sql"


def read(name: str) -> str:
    """A file of the sql/ folder by its path there ('queries.sql', 'migrations/001_x.sql')."""
    path = sql_dir()
    for part in name.split("/"):
        path = path / part
    return path.read_text(encoding="utf-8")


@cache
def blocks(name: str) -> dict[str, str]:
    text = read(name)
    parts = _BLOCK_RE.split(text)
    # parts = [preamble, name1, body1, name2, body2, ...]
    return {parts[i]: parts[i + 1].strip() for i in range(1, len(parts), 2)}


def query(name: str) -> str:
    return blocks("queries.sql")[name]
