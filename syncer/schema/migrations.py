"""The numbered migrations of syncer's own schema, and the runner that applies them.

sql/migrations/NNN_name.sql, numbered upward from 001, each number once; the highest is the
version this syncer reports (SCHEMA_VERSION). A number may be missing (migrations written on
two branches at once land in either order): the runner applies, in order, every file whose
number is not recorded in syncer.schema_version, so a file merged later with a lower number
still runs, and a database is current only when every file's number is recorded.
Adding a migration is adding a file. Per-pipeline objects are not migrated: install
renders and re-creates them every time.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache

import asyncpg

from syncer import sqlfiles
from syncer.schema.catalog import relation_exists

_FILE_RE = re.compile(r"^(\d{3})_[a-z0-9_]+\.sql$")


@dataclass(frozen=True)
class Migration:
    version: int
    file: str  # its path in sql/

    def sql(self) -> str:
        return sqlfiles.read(self.file)


@cache
def migrations() -> tuple[Migration, ...]:
    found = []
    for entry in (sqlfiles.sql_dir() / "migrations").iterdir():
        if m := _FILE_RE.match(entry.name):
            found.append(Migration(int(m.group(1)), f"migrations/{entry.name}"))
    found.sort(key=lambda m: m.version)
    numbers = [m.version for m in found]
    if not numbers or numbers[0] < 1 or len(set(numbers)) != len(numbers):
        raise RuntimeError(f"sql/migrations/ must be numbered 001, 002, ..., each once ({numbers})")
    return tuple(found)


VERSIONS = tuple(m.version for m in migrations())
SCHEMA_VERSION = VERSIONS[-1]


def _sql(name: str) -> str:
    return sqlfiles.blocks("install.sql")[name]


async def installed_version(conn: asyncpg.Connection) -> int | None:
    """The version of syncer's schema in this database (None: not installed)."""
    if not await relation_exists(conn, "syncer.schema_version"):
        return None
    v = await conn.fetchval(_sql("schema_version_get"))
    return int(v) if v is not None else None


async def missing_versions(conn: asyncpg.Connection) -> list[int]:
    """The migrations this syncer has and the database lacks (all of them: not installed)."""
    if not await relation_exists(conn, "syncer.schema_version"):
        return list(VERSIONS)
    recorded = {r[0] for r in await conn.fetch(_sql("schema_versions_get"))}
    return [v for v in VERSIONS if v not in recorded]


async def migrate(conn: asyncpg.Connection, upto: int = SCHEMA_VERSION) -> list[int]:
    """Apply the migrations the database lacks, up to `upto`, in order; returns them.

    Each runs in its own transaction under the install lock, and is recorded in
    syncer.schema_version in that transaction: an upgrade stopped halfway resumes.
    """
    applied = []
    for m in migrations():
        if m.version > upto:
            break
        async with conn.transaction():
            await conn.execute(_sql("install_lock"))
            if m.version not in await missing_versions(conn):
                continue
            await conn.execute(m.sql())
            await conn.execute(_sql("schema_version_record"), m.version)
            applied.append(m.version)
    return applied
