"""What every capture source does: the one interface `install`, `uninstall`, `run` and
`status` use, so that a new way of capturing changes is a new module, not a new `if`."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

import asyncpg
from psycopg import sql

from syncer.capture.notify import Control
from syncer.config import PipelineConfig
from syncer.db import Database
from syncer.schema.render import PipelineSQL


@dataclass
class CaptureSide:
    """A process's capture side: the LISTEN connection, and what brings captured keys to
    the queue (the inbox mover, or in logical mode the slot reader)."""

    listener: asyncio.Task[None]
    feeder: asyncio.Task[None]
    caught_up: Callable[[], Awaitable[bool]]  # has everything captured so far been queued?
    # For /readyz: "reading" or "standing_by" the slot (else why not); "n/a" without one.
    state: Callable[[], str] = lambda: "n/a"


async def always_caught_up() -> bool:
    return True  # trigger mode: the inbox is counted with the queue


class CaptureSource(Protocol):
    """One capture mode. `install` calls, in order: check (before anything is created),
    install, install_pipeline for each pipeline, installed."""

    # Must the vector writes be marked, so that the source drops them? (A write to a
    # watched table would otherwise come back as a change to embed again.)
    marks_own_writes: bool

    async def check(self, conn: asyncpg.Connection) -> None:
        """What the source needs of the server, the role and the source tables."""

    async def install(self, conn: asyncpg.Connection) -> list[str]:
        """Create (or drop) what the source needs beyond the pipelines; says what it did."""

    async def install_pipeline(
        self, conn: asyncpg.Connection, p: PipelineConfig, rendered: PipelineSQL
    ) -> None:
        """The pipeline's capture, inside the transaction that installs the pipeline."""

    async def installed(self, conn: asyncpg.Connection) -> None:
        """After every pipeline is installed."""

    async def uninstall(self, conn: asyncpg.Connection) -> list[str]:
        """Drop what install made beyond the pipelines; says what it dropped."""

    async def uninstall_pipeline(self, conn: asyncpg.Connection, p: PipelineConfig) -> None:
        """Drop the pipeline's capture, inside the transaction that uninstalls it."""

    async def check_run(self, conn: asyncpg.Connection) -> None:
        """Before `run`: what install made for the source is there."""

    def start(
        self,
        db: Database,
        wakeups: Mapping[str, asyncio.Event],
        stop: asyncio.Event,
        rendered: Mapping[str, PipelineSQL],
        control: Callable[[Control], None] | None = None,
    ) -> CaptureSide:
        """Start this process's capture side; `wakeups` wake each pipeline's claimer,
        `control` hears pause and resume."""

    async def status(self, conn: asyncpg.Connection) -> asyncpg.Record | None:
        """The slot's state for `status` (logical mode; None without a slot)."""


def ident(*parts: str) -> str:
    return sql.Identifier(*parts).as_string(None)
