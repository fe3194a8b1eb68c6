"""Capture sources: how the changes of the source tables reach the queue. capture.mode
picks one (source_for); what install, uninstall, run and status ask of it is
CaptureSource (base.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping

from syncer.capture.base import CaptureSide, CaptureSource, always_caught_up
from syncer.capture.notify import Control
from syncer.capture.trigger import TriggerCapture
from syncer.config import Config
from syncer.db import Database
from syncer.schema.render import PipelineSQL

__all__ = ["CaptureSide", "CaptureSource", "always_caught_up", "source_for", "start_capture_side"]


def _logical(cfg: Config) -> CaptureSource:
    # Imported only in logical mode: the slot reader needs psycopg2.
    from syncer.capture.logical import LogicalCapture

    return LogicalCapture(cfg)


_SOURCES: dict[str, Callable[[Config], CaptureSource]] = {
    "trigger": TriggerCapture,
    "logical": _logical,
}


def source_for(cfg: Config) -> CaptureSource:
    return _SOURCES[cfg.capture.mode](cfg)


def start_capture_side(
    cfg: Config,
    db: Database,
    wakeups: Mapping[str, asyncio.Event],
    stop: asyncio.Event,
    rendered: Mapping[str, PipelineSQL],
    control: Callable[[Control], None] | None = None,
) -> CaptureSide:
    """Start the process's capture side: its LISTEN connection and its feeder."""
    return source_for(cfg).start(db, wakeups, stop, rendered, control)
