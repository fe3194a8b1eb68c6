"""The checks behind /healthz (is this process alive and turning?) and /readyz (can it do
its work: the database answers, the schema is current, the slot is read or stood by for)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from syncer.db import Database
from syncer.monitor.loop import LoopWatch
from syncer.schema.migrations import SCHEMA_VERSION

# What a logical-mode capture side may say of the slot; both mean this replica is fine.
SLOT_OK = ("reading", "standing_by", "n/a")


@dataclass(frozen=True)
class Verdict:
    ok: bool
    reasons: tuple[str, ...] = ()

    def doc(self, what: str) -> dict[str, object]:
        return {what: self.ok, "reasons": list(self.reasons)}


@dataclass
class Health:
    loop: LoopWatch
    db: Database | None = None  # None until the pool is up
    tasks: Sequence[asyncio.Task[None]] = ()  # the supervised ones
    capture_state: Callable[[], str] = lambda: "n/a"
    schema_version: int | None = None  # as the sampler last read it
    stopping: asyncio.Event = field(default_factory=asyncio.Event)

    def live(self) -> Verdict:
        reasons = []
        if not self.loop.healthy:
            reasons.append(
                f"event loop lag {self.loop.lag_s:.3f}s over observe.loop_lag_warn_s "
                f"({self.loop.warn_s}s) for 10 s or more"
            )
        dead = [t.get_name() for t in self.tasks if t.done()]
        if dead and not self.stopping.is_set():
            reasons.append(f"supervised tasks ended: {', '.join(sorted(dead))}")
        return Verdict(not reasons, tuple(reasons))

    def ready(self) -> Verdict:
        if self.stopping.is_set():
            return Verdict(False, ("stopping",))
        if self.db is None:
            return Verdict(False, ("starting: waiting for the database",))
        if not self.db.up.is_set():
            return Verdict(False, ("the database does not answer",))
        reasons = []
        if self.schema_version is None:
            reasons.append("starting: the schema version is not read yet")
        elif self.schema_version != SCHEMA_VERSION:
            reasons.append(
                f"the schema is at version {self.schema_version}, this syncer needs "
                f"{SCHEMA_VERSION}: run `syncer install`"
            )
        state = self.capture_state()
        if state not in SLOT_OK:
            reasons.append(f"the logical slot is neither read nor stood by for ({state})")
        return Verdict(not reasons, tuple(reasons))
