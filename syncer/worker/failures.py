"""Items whose work failed: the retry policy decides, the queue carries it out."""

from __future__ import annotations

from collections.abc import Sequence

from syncer.db import Database
from syncer.errors import SyncerError
from syncer.observe import Events, Failed
from syncer.queue import Failure, Queue
from syncer.retry import Decision, RetryPolicy
from syncer.worker.inflight import InFlight


class FailureRouter:
    def __init__(
        self,
        pipeline: str,
        queue: Queue,
        db: Database,
        policy: RetryPolicy,
        in_flight: InFlight,
        events: Events,
    ) -> None:
        self.pipeline = pipeline
        self.queue = queue
        self.db = db
        self.policy = policy
        self.in_flight = in_flight
        self.events = events

    async def route(self, failed: Sequence[tuple[int, SyncerError]]) -> None:
        """Each item by its own attempts: to the dead-letter table, or back to the queue."""
        final: list[Failure] = []
        later: list[Failure] = []
        # One decision per error and attempt count: items that failed together and come
        # back together stay one request (a delay drawn per item would scatter them).
        decided: dict[tuple[int, int], Decision] = {}
        for item_id, err in failed:
            attempts = self.in_flight.attempts.get(item_id, 1)
            d = decided.get((id(err), attempts))
            if d is None:
                d = decided[(id(err), attempts)] = self.policy.decide(err, attempts)
            f = Failure(item_id, err.error_class, str(err), d.delay_s, d.counts)
            (final if d.dead_letter else later).append(f)
        await self.db.call(self.queue.dead_letter, final)
        await self.db.call(self.queue.retry, later)
        for outcome, group in (("dead_lettered", final), ("retried", later)):
            if group:
                self.events.emit(Failed(self.pipeline, outcome, len(group), group[0].error))
        self.in_flight.finish([item_id for item_id, _ in failed])
