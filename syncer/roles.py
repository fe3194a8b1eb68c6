"""`syncer roles`: the SQL that creates the least-privileged roles for `install` and `run`.

Rendered from sql/roles.sql for the configured tables and a capture mode. Nothing here
connects: an administrator reviews the script and runs it (psql -f), once before the first
`syncer install` and once after it, because the vector columns that `run` may update exist
only once install has added them. Passwords are never part of it (set them with \\password).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

from syncer import sqlfiles, targets
from syncer.config import Config, PipelineConfig
from syncer.schema.names import ident, literal, split_table

Mode = Literal["trigger", "logical"]
FILE = "roles.sql"


@dataclass(frozen=True)
class RoleNames:
    install: str = "syncer_install"
    run: str = "syncer_run"


def render(cfg: Config, mode: Mode, names: RoleNames) -> str:
    """The whole script, statements separated by blank lines."""
    parts = [_header(mode, names), *_roles(mode, names), *_objects(cfg, mode, names)]
    return "\n\n".join(parts) + "\n"


def _block(name: str, **values: str) -> str:
    return sqlfiles.blocks(FILE)[name].format(**values)


def _header(mode: Mode, names: RoleNames) -> str:
    return (
        f"-- syncer roles for capture mode {mode}: {names.install} runs `syncer install` "
        f"(and uninstall),\n-- {names.run} runs `syncer run` (and backfill, replay-dlq, status). "
        "Run this as an administrator\n-- before the first install and once more after it; "
        "set passwords with \\password ROLE."
    )


def _roles(mode: Mode, names: RoleNames) -> Iterator[str]:
    # Logical mode: install creates the slot and run streams it; both need REPLICATION.
    replication = "REPLICATION" if mode == "logical" else "NOREPLICATION"
    install, run = ident(names.install), ident(names.run)
    for role, comment in (
        (names.install, "Owns what install creates: the syncer schema, functions, side tables."),
        (names.run, "Claims, embeds and writes vectors; owns nothing."),
    ):
        yield _block(
            "role_create",
            comment=comment,
            role=ident(role),
            role_literal=literal(role),
            replication=replication,
        )
    yield _block(
        "database_grant",
        comment="install creates the syncer schema (and in logical mode the publication).",
        privileges="CONNECT, CREATE",
        role=install,
    )
    yield _block("database_grant", comment="run only connects.", privileges="CONNECT", role=run)
    yield _block("extension_create")
    yield _block("default_privileges", install=install, run=run)


def _objects(cfg: Config, mode: Mode, names: RoleNames) -> Iterator[str]:
    install, run = ident(names.install), ident(names.run)
    schemas = sorted({p.schema_name for p in cfg.pipelines})
    for schema in schemas:
        yield _block("schema_usage", schema=ident(schema), install=install, run=run)
    for p in cfg.pipelines:
        yield from _pipeline(p, names)
    yield _block("syncer_grant", run=run)
    if mode == "trigger":
        yield _block("inbox_maintain", run=run)


def _pipeline(p: PipelineConfig, names: RoleNames) -> Iterator[str]:
    table = ident(p.schema_name, p.table_name)
    table_literal = literal(table)
    yield _block(
        "table_owner_member",
        table=table,
        table_literal=table_literal,
        install=ident(names.install),
        install_literal=literal(names.install),
    )
    yield _block("table_select", table=table, run=ident(names.run))
    target = targets.for_pipeline(p)
    if target.writes_source:
        yield _block(
            "column_update",
            table=table,
            table_literal=table_literal,
            column=ident(p.column),
            column_literal=literal(p.column),
            hash_column=ident(target.hash_column),
            hash_literal=literal(target.hash_column),
            run=ident(names.run),
        )
    elif p.target_table:
        yield _block("row_lock_update", table=table, column=ident(p.text[0]), run=ident(names.run))
        schema, name = split_table(p.target_table)
        yield _block(
            "schema_create",
            schema=ident(schema),
            table=ident(schema, name),
            install=ident(names.install),
        )
