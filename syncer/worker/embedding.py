"""The embedding stage: send each packed request, retry it or split it as the retry
policy says, and hand the vectors to the writers."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

from syncer.config import PipelineConfig
from syncer.errors import (
    CircuitOpenError,
    InputError,
    PausedError,
    ProviderError,
    RetryableError,
    SyncerError,
)
from syncer.observe import ApiRequest, Events, tracing
from syncer.providers import Embedder, EmbedRequest, Vectors
from syncer.retry import RetryPolicy
from syncer.targets.store import WriteBatch
from syncer.worker.failures import FailureRouter
from syncer.worker.inflight import InFlight, TextId
from syncer.worker.jobs import EmbedJob, JobQueue

Failures = list[tuple[int, SyncerError]]


class Results(Protocol):
    """What an answered request means for its items (rows or chunked documents)."""

    def done(self, job: EmbedJob, vectors: Vectors, batch: WriteBatch) -> None:
        """The job's vectors arrived: put what they complete into `batch`."""

    def failed_ids(self, job: EmbedJob, inputs: Iterable[int]) -> list[int]:
        """These inputs of the job failed for good in this process: the items to route."""


class RowResults:
    """One input per row: its vector is the row's."""

    def __init__(self, in_flight: InFlight) -> None:
        self.in_flight = in_flight

    def done(self, job: EmbedJob, vectors: Vectors, batch: WriteBatch) -> None:
        for i, key in enumerate(job.keys):
            batch.add_vector(key, vectors[i], job.hashes[i])
            batch.done_ids += job.ids[i]
            # Until the vector is written, an item for the same text still joins it.
            late = self.in_flight.hand_over((key, job.hashes[i]), job.ids[i])
            if late is not None:
                batch.joins.append(((key, job.hashes[i]), late))
        batch.outcomes["embedded"] += len(job.keys)

    def failed_ids(self, job: EmbedJob, inputs: Iterable[int]) -> list[int]:
        return [i for n in inputs for i in job.ids[n]]


@dataclass
class _Trace:
    """What one split request found: did any part succeed, which inputs failed alone."""

    succeeded: bool = False
    failed_alone: list[TextId] = field(default_factory=list)


class Embedding:
    def __init__(
        self,
        p: PipelineConfig,
        provider: str,
        embedder: Embedder,
        policy: RetryPolicy,
        item_deadline_s: float,
        in_flight: InFlight,
        failures: FailureRouter,
        events: Events,
        embed_q: JobQueue,
        write_q: asyncio.Queue[WriteBatch],
        results: Results | None = None,
    ) -> None:
        self.p = p
        self.results = results or RowResults(in_flight)
        self.provider = provider
        self.embedder = embedder
        self.policy = policy
        self.item_deadline_s = item_deadline_s
        self.in_flight = in_flight
        self.failures = failures
        self.events = events
        self.embed_q = embed_q
        self.write_q = write_q
        self.paused: Callable[[], bool] = lambda: False  # `syncer pause`: send nothing new

    async def run(self) -> None:
        while True:
            job = await self.embed_q.get_job()
            with tracing(job.trace_id, self.p.name):
                batch = WriteBatch()
                failed: Failures = []
                await self._embed(job, batch, failed)
                if failed:
                    await self.failures.route(failed)
                if len(batch):
                    await self.write_q.put(batch)

    async def _embed(
        self, job: EmbedJob, batch: WriteBatch, failed: Failures, trace: _Trace | None = None
    ) -> None:
        """Send the job; on failure, split it (as the policy says) or fail its items. `trace`:
        the job is a part of a split request."""
        try:
            vectors = await self._send(job, trace is not None)
        except (RetryableError, InputError, ProviderError) as err:
            self._release(job)
            if self.policy.split(err, len(job.keys)):
                await self._split(job, err, batch, failed, trace)
                return
            if job.suspect:
                self.in_flight.suspect((job.keys[0], job.hashes[0]), self.policy.traced(err))
            elif trace is not None and len(job.keys) == 1 and self.policy.traced(err):
                trace.failed_alone.append((job.keys[0], job.hashes[0]))
            failed += [(i, err) for i in self.results.failed_ids(job, range(len(job.keys)))]
            return
        if trace is not None:
            trace.succeeded = True
        if job.suspect:
            self.in_flight.suspect((job.keys[0], job.hashes[0]), False)
        self.results.done(job, vectors, batch)

    def _release(self, job: EmbedJob) -> None:
        """The job's results are being taken: later items for its texts embed anew. (No
        await between this and reading job.ids, so no joined item is left behind.)"""
        for key, hash_, ids in zip(job.keys, job.hashes, job.ids, strict=True):
            self.in_flight.forget((key, hash_), ids)

    async def _split(
        self,
        job: EmbedJob,
        err: SyncerError,
        batch: WriteBatch,
        failed: Failures,
        trace: _Trace | None,
    ) -> None:
        """Isolate the input at fault (by the index the provider named, or by halves) and
        embed the rest. The halves go out side by side, so the healthy one's answer comes in
        between the failing one's and one bad input does not open the breaker. In an outage
        nothing succeeds and the breaker, opening, ends the split."""
        top = trace is None
        trace = trace or _Trace()
        n = len(job.keys)
        index = getattr(err, "index", None)
        if index is not None and 0 <= index < n:
            failed += [(i, err) for i in self.results.failed_ids(job, [index])]
            await self._embed(job.part([i for i in range(n) if i != index]), batch, failed, trace)
        else:
            half = n // 2
            await asyncio.gather(
                self._embed(job.part(range(half)), batch, failed, trace),
                self._embed(job.part(range(half, n)), batch, failed, trace),
            )
        if top and trace.succeeded:
            # The provider answered others of the same request: these inputs failed for
            # their own sake, and are sent alone from now on (see RetryPolicy.traced).
            for text in trace.failed_alone:
                self.in_flight.suspect(text, True)

    async def _send(self, job: EmbedJob, part: bool) -> Vectors:
        """In-process retries under a per-batch deadline, as the policy says."""
        req = EmbedRequest(
            job.texts,
            self.p.model,
            self.p.dimensions,
            self.p.send_dimensions,
            job.tokens,
            suspect=job.suspect,
        )
        deadline = time.monotonic() + self.item_deadline_s
        retry = 0
        while True:
            if self.paused():
                raise PausedError(f"pipeline {self.p.name} is paused")
            started = time.perf_counter()
            try:
                vectors = await self.embedder.embed(req)
            except (RetryableError, InputError, ProviderError) as err:
                if not isinstance(err, CircuitOpenError):  # never sent: no request to count
                    self._count(job, started, err.error_class)
                retry += 1
                left_s = deadline - time.monotonic()
                delay_s = self.policy.retry_in_s(
                    err, retry, left_s, len(job.keys), part or job.suspect
                )
                if delay_s is None:
                    raise
                await asyncio.sleep(delay_s)
                continue
            self._count(job, started, "ok")
            return vectors

    def _count(self, job: EmbedJob, started: float, result: str) -> None:
        elapsed = time.perf_counter() - started
        key = job.keys[0] if len(job.keys) == 1 else None
        self.events.emit(
            ApiRequest(self.provider, self.p.name, len(job.texts), elapsed, result, key)
        )
