"""A request's worth of texts, as the dispatcher packs it and the embedding stage sends it."""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from syncer.observe import current_trace
from syncer.providers.tokens import estimate_tokens
from syncer.queue import LIVE
from syncer.worker.inflight import TextId

if TYPE_CHECKING:
    from syncer.targets.chunks import ChunkDoc


@dataclass(frozen=True)
class EmbedJob:
    keys: list[str]
    texts: list[str]
    hashes: list[bytes]
    ids: list[list[int]]  # the queue items behind each key (a key may repeat in a claim)
    tokens: int  # estimated
    suspect: bool = False  # one input traced as failing alone: sent alone, not retried in process
    lane: int = LIVE
    # Chunk pipelines: the documents waiting for each input (a chunk text may serve several)
    docs: tuple[tuple[ChunkDoc, ...], ...] = ()
    trace_id: str = field(default_factory=current_trace)  # the claimed batch's

    def part(self, idx: Sequence[int]) -> EmbedJob:
        pick = list(idx)
        return EmbedJob(
            [self.keys[i] for i in pick],
            [self.texts[i] for i in pick],
            [self.hashes[i] for i in pick],
            [self.ids[i] for i in pick],
            sum(estimate_tokens(self.texts[i]) for i in pick),
            self.suspect,
            self.lane,
            tuple(self.docs[i] for i in pick) if self.docs else (),
            self.trace_id,
        )

    def all_ids(self) -> list[int]:
        return [i for ids in self.ids for i in ids]

    def joined(self, other: EmbedJob) -> EmbedJob:
        """One request of this job's inputs and then `other`'s (this job's lane and trace)."""
        return replace(
            self,
            keys=self.keys + other.keys,
            texts=self.texts + other.texts,
            hashes=self.hashes + other.hashes,
            ids=self.ids + other.ids,
            tokens=self.tokens + other.tokens,
            docs=self.docs + other.docs,
        )


class JobQueue(asyncio.PriorityQueue[tuple[int, int, EmbedJob]]):
    """Packed requests waiting for an embedding task: live ones first, then in order.

    Unbounded: the in-flight window already bounds what is claimed, and so what waits here.
    A bound of its own blocked the claimer in a put of bulk jobs, ~0.3 s a claim at 300 ms
    API latency, during which a live edit could not even be claimed (bench freshness)."""

    _queue: list[tuple[int, int, EmbedJob]]  # asyncio.PriorityQueue's heap

    def __init__(self, max_inputs: int = 0, max_tokens: int = 0) -> None:
        """`max_inputs`, `max_tokens`: a request's bounds, up to which a live job taken is
        filled with the next waiting inputs (0: never)."""
        super().__init__()
        self._seq = itertools.count()
        self.max_inputs, self.max_tokens = max_inputs, max_tokens

    def put_job(self, job: EmbedJob) -> None:
        self.put_nowait((job.lane, next(self._seq), job))

    def promote(self, text: TextId) -> None:
        """A live item joined the running embedding of its text: if that is a bulk request
        still waiting here, it goes out as a live one (it may be the backfill's newest)."""
        for n, (lane, seq, job) in enumerate(self._queue):
            if lane != LIVE and text in zip(job.keys, job.hashes, strict=True):
                self._queue[n] = (LIVE, seq, replace(job, lane=LIVE))
                heapq.heapify(self._queue)
                return

    async def get_job(self) -> EmbedJob:
        """The next job; a live one is filled up to a request's bounds with the next waiting
        inputs (live ones first, then bulk).

        A live edit claimed alone would otherwise take a request slot of its own: at 20
        edits/s and 300 ms of API, about 6 of 8 slots, and the backfill kept 54-65 % of its
        solo rate (bench freshness). Filled up, the edit costs the backfill one input, and
        goes out no later: it is still the first job taken. The rest of a job taken from
        keeps its place. Bulk jobs are sent as packed: filling them too made
        tests/test_isolation.py (always-failing inputs in a backfill) time out in 1 run of
        6 under CPU load, its cause not yet found."""
        return self._fill((await self.get())[2])

    def _fill(self, job: EmbedJob) -> EmbedJob:
        # Row pipelines only (a chunk job's inputs are tied to its documents' bookkeeping),
        # and never a suspect input, which goes alone.
        if job.lane != LIVE or job.suspect or job.docs:
            return job
        while self._queue and len(job.keys) < self.max_inputs:
            lane, seq, head = self._queue[0]
            if head.suspect or head.docs:
                break
            room, budget, take = self.max_inputs - len(job.keys), self.max_tokens - job.tokens, 0
            while take < min(room, len(head.keys)):
                n = estimate_tokens(head.texts[take])
                if n > budget:
                    break
                budget -= n
                take += 1
            if take == 0:
                break
            job = job.joined(head.part(range(take)))
            if take == len(head.keys):
                self.get_nowait()
            else:  # the rest keeps its place: same lane and sequence, so the heap holds
                self._queue[0] = (lane, seq, head.part(range(take, len(head.keys))))
        return job

    def drain(self) -> list[EmbedJob]:
        """Every job not yet taken (at stop: they go back to the queue unsent)."""
        out = []
        while not self.empty():
            out.append(self.get_nowait()[2])
        return out
