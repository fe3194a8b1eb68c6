"""Wires inbox → claim → fetch → embed → write with bounded queues; stops softly, then hard.

Per pipeline: one claimer (claims only as many items as there are free slots), a pool
of embedding tasks (the provider's semaphore bounds requests in flight), one writer
(coalesces results into one transaction) and a heartbeat that extends leases. Per
process: one LISTEN connection and one inbox mover (syncer.capture), which queues what the
triggers captured and wakes the claimers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg

from syncer.capture import always_caught_up, start_capture_side, wait_first
from syncer.config import Config, PipelineConfig, ProviderConfig, WorkerConfig
from syncer.embed import Embedder, EmbedRequest, Vectors
from syncer.errors import (
    CircuitOpenError,
    InputError,
    ProviderError,
    RateLimitedError,
    RetryableError,
)
from syncer.limits import estimate_tokens, pack_requests, truncate_to_tokens
from syncer.observe import Events
from syncer.queue import Failure, Item, Queue
from syncer.retry import backoff_s
from syncer.schema.render import PipelineSQL
from syncer.targets import SourceRow, VectorStore, WriteBatch, store_for

log = logging.getLogger("syncer.worker")

MAX_WRITE_ROWS = 256
WRITERS = 2
STOP_CLAIMER_S = 0.5  # a claim in flight finishes (never strand one); a blocked put does not
# Errors no retry can fix: straight to the dead-letter table.
FINAL_CLASSES = frozenset({"invalid_input", "input_too_long"})


@dataclass(frozen=True)
class EmbedJob:
    keys: list[str]
    texts: list[str]
    hashes: list[bytes]
    ids: list[list[int]]  # the queue items behind each key (a key may repeat in a claim)
    attempts: int  # the most attempts among the items, counted at claim
    tokens: int  # estimated

    def part(self, idx: Sequence[int]) -> EmbedJob:
        pick = list(idx)
        return EmbedJob(
            [self.keys[i] for i in pick],
            [self.texts[i] for i in pick],
            [self.hashes[i] for i in pick],
            [self.ids[i] for i in pick],
            self.attempts,
            sum(estimate_tokens(self.texts[i]) for i in pick),
        )

    def all_ids(self) -> list[int]:
        return [i for ids in self.ids for i in ids]


def window(p: PipelineConfig, provider: ProviderConfig, wcfg: WorkerConfig) -> tuple[int, int, int]:
    """(texts per API request, items in flight at most, items per claim while busy)."""
    request_inputs = min(p.batch_size, provider.max_inputs_per_request)
    capacity = provider.max_concurrency * request_inputs * wcfg.in_flight_batches
    # While busy, claim in chunks of a quarter of the window: every claim costs a claim and
    # a fetch round trip, and 64-row claims cannot keep 8 requests busy.
    return request_inputs, capacity, max(request_inputs, capacity // 4)


class ProviderPaused(Exception):
    """Raised out of an --exit-when-idle run when a provider refuses every request."""


class PipelineRunner:
    def __init__(
        self,
        p: PipelineConfig,
        wcfg: WorkerConfig,
        queue: Queue,
        store: VectorStore,
        embedder: Embedder,
        provider_name: str,
        provider: ProviderConfig,
        events: Events,
        wakeup: asyncio.Event,
    ) -> None:
        self.p = p
        self.wcfg = wcfg
        self.queue = queue
        self.store = store
        self.embedder = embedder
        self.provider = provider_name
        self.events = events
        self.wakeup = wakeup
        self.pcfg = provider
        max_concurrency = provider.max_concurrency
        self.n_embedders = max_concurrency
        self.request_inputs, self.capacity, self.claim_min = window(p, provider, wcfg)
        self.in_flight: set[int] = set()
        # (key, hash) being embedded -> the queue items its result completes: an item for
        # the same text claimed meanwhile joins them instead of paying for a second call.
        self.embedding: dict[tuple[str, bytes], list[int]] = {}
        self.slot_freed = asyncio.Event()
        self.embed_q: asyncio.Queue[EmbedJob] = asyncio.Queue(maxsize=max_concurrency * 2)
        self.write_q: asyncio.Queue[WriteBatch] = asyncio.Queue(maxsize=max_concurrency * 4)
        self.capture_caught_up: Callable[[], Awaitable[bool]] = always_caught_up

    # --- bookkeeping --------------------------------------------------------------------

    def _finish(self, ids: Sequence[int]) -> None:
        self.in_flight.difference_update(ids)
        self.events.in_flight(self.p.name, len(self.in_flight))
        self.slot_freed.set()

    async def _wait_drained(self) -> None:
        while self.in_flight:
            self.slot_freed.clear()
            await self.slot_freed.wait()

    # --- the stages -------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event, exit_when_idle: bool) -> None:
        """Run until stop is set (or, with exit_when_idle, until nothing is left)."""
        tasks = [
            asyncio.create_task(self._embed_loop(), name=f"{self.p.name}-embed-{i}")
            for i in range(self.n_embedders)
        ]
        # Two writers: one transaction commits while the next batch is being sent.
        tasks += [
            asyncio.create_task(self._write_loop(), name=f"{self.p.name}-write-{i}")
            for i in range(WRITERS)
        ]
        tasks.append(asyncio.create_task(self._heartbeat(), name=f"{self.p.name}-heartbeat"))
        claimer = asyncio.create_task(
            self._claim_loop(stop, exit_when_idle), name=f"{self.p.name}-claim"
        )
        tasks.append(asyncio.create_task(self._cancel_claimer_on_stop(claimer, stop)))
        try:
            try:
                await _supervise(claimer, tasks)
            except asyncio.CancelledError:
                if not (stop.is_set() and claimer.cancelled()):
                    raise
            await _supervise(asyncio.create_task(self._soft_stop()), tasks)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if self.in_flight:
                # Hard stop: hand unfinished items back now instead of at lease end.
                await self.queue.release(sorted(self.in_flight))
                log.warning(
                    "released unfinished items",
                    extra={"pipeline": self.p.name, "n": len(self.in_flight)},
                )

    async def _cancel_claimer_on_stop(
        self, claimer: asyncio.Task[None], stop: asyncio.Event
    ) -> None:
        """The claimer may be blocked on a full embedding queue (the rate limiter holding
        every request) and not see the stop: cancel it. Its claimed items are in flight, so
        they are finished or released like the others."""
        await stop.wait()
        done, _ = await asyncio.wait([claimer], timeout=STOP_CLAIMER_S)
        if not done:
            claimer.cancel()

    async def _soft_stop(self) -> None:
        # Batches not yet sent go back at once (another replica may take them); the
        # deadline is for the requests already on their way.
        unsent: list[int] = []
        while not self.embed_q.empty():
            unsent += self.embed_q.get_nowait().all_ids()
        if unsent:
            await self.queue.release(unsent)
            self._finish(unsent)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.wcfg.shutdown_timeout_s):
                await self._wait_drained()

    async def _claim_loop(self, stop: asyncio.Event, exit_when_idle: bool) -> None:
        while not stop.is_set():
            wait_s = self.embedder.ready_in_s()
            if wait_s > 0:
                # Open breaker, 429 pause or a refusing provider: claim nothing meanwhile.
                if exit_when_idle and self.embedder.refused_error:
                    raise ProviderPaused(self.embedder.refused_error)
                await wait_first(stop, timeout_s=wait_s)
                continue
            free = self.capacity - len(self.in_flight)
            if free < self.claim_min and self.in_flight:
                self.slot_freed.clear()
                await wait_first(stop, self.slot_freed)
                continue
            self.wakeup.clear()
            items = await self.queue.claim(self.p.name, free)
            if items:
                self.events.claimed(self.p.name, len(items))
                self.in_flight.update(i.id for i in items)
                self.events.in_flight(self.p.name, len(self.in_flight))
                await self._dispatch(items)
                if len(items) == free:
                    continue  # a full claim: more is likely waiting
            elif exit_when_idle and not self.in_flight and await self._idle():
                return
            wake = [stop, self.wakeup]
            if exit_when_idle and self.in_flight:
                # The last items finishing may leave nothing to do: look again then.
                self.slot_freed.clear()
                wake.append(self.slot_freed)
            await wait_first(*wake, timeout_s=await self._poll_s(exit_when_idle))

    async def _idle(self) -> bool:
        # Capture first: what it has caught up with is queued by then, so the count sees it.
        return await self.capture_caught_up() and await self.queue.pending([self.p.name]) == 0

    async def _poll_s(self, exit_when_idle: bool) -> float:
        poll_s = self.wcfg.poll_interval_s * random.uniform(0.8, 1.2)
        if exit_when_idle and not self.in_flight:
            nxt = await self.queue.next_ready_s([self.p.name])
            if nxt is not None:
                poll_s = min(poll_s, max(0.01, nxt))
        return poll_s

    async def _dispatch(self, items: list[Item]) -> None:
        """Read current texts; finish what needs no API call; queue the rest for embedding."""
        ids_by_key: dict[str, list[int]] = {}
        attempts = max(i.attempts for i in items)
        for item in items:
            ids_by_key.setdefault(item.key, []).append(item.id)
        rows = await self.store.fetch(list(ids_by_key))
        now = WriteBatch()
        todo: list[int] = []
        for idx, row in enumerate(rows):
            ids = ids_by_key[row.key]
            if not row.present or row.text is None:
                self.store.clear(now, row)
                now.done_ids += ids
                now.outcomes["cleared"] += len(ids)
            elif row.hash == row.stored_hash:
                now.done_ids += ids
                now.outcomes["unchanged"] += len(ids)
            elif (same := self.embedding.get((row.key, row.hash or b""))) is not None:
                same += ids  # this very text is being embedded: its vector serves these too
            else:
                todo.append(idx)
        if len(now):
            await self.write_q.put(now)
        await self._enqueue_embeds([rows[i] for i in todo], ids_by_key, attempts)

    async def _enqueue_embeds(
        self, rows: list[SourceRow], ids_by_key: dict[str, list[int]], attempts: int
    ) -> None:
        """Cut or refuse texts over the model's limit; pack requests by count and tokens."""
        texts: list[str] = []
        kept: list[SourceRow] = []
        too_long: list[Failure] = []
        limit = self.pcfg.max_tokens_per_input
        tokens: list[int] = []
        for row in rows:
            text = row.text or ""
            n_tokens = estimate_tokens(text)
            if n_tokens > limit:
                if self.p.on_too_long == "dead_letter":
                    msg = f"text estimated over {limit} tokens (on_too_long = dead_letter)"
                    too_long += [Failure(i, "input_too_long", msg) for i in ids_by_key[row.key]]
                    continue
                text = truncate_to_tokens(text, limit)
                n_tokens = estimate_tokens(text)
                log.info(
                    "text truncated",
                    extra={"pipeline": self.p.name, "key": row.key, "max_tokens": limit},
                )
            texts.append(text)
            tokens.append(n_tokens)
            kept.append(row)
        if too_long:
            await self._fail(too_long, attempts)
        for request in pack_requests(tokens, self.request_inputs, self.pcfg.max_tokens_per_request):
            job = EmbedJob(
                [kept[i].key for i in request],
                [texts[i] for i in request],
                [kept[i].hash or b"" for i in request],
                [ids_by_key[kept[i].key] for i in request],
                attempts,
                sum(tokens[i] for i in request),
            )
            for key, hash_, ids in zip(job.keys, job.hashes, job.ids, strict=True):
                self.embedding[(key, hash_)] = ids
            await self.embed_q.put(job)

    async def _embed_loop(self) -> None:
        while True:
            job = await self.embed_q.get()
            batch = WriteBatch()
            failures: list[Failure] = []
            await self._embed_job(job, batch, failures)
            if failures:
                await self._fail(failures, job.attempts)
            if len(batch):
                await self.write_q.put(batch)

    async def _embed_job(self, job: EmbedJob, batch: WriteBatch, failures: list[Failure]) -> None:
        try:
            vectors = await self._embed_with_retries(job)
        except InputError as err:
            self._release(job)
            await self._split_bad_input(job, err, batch, failures)
            return
        except RetryableError as err:
            self._release(job)
            delay_s = backoff_s(job.attempts, self.wcfg.retry_base_s, self.wcfg.retry_max_s, err)
            # Never sent (the breaker was open): the attempt is not the items' to spend.
            sent = not isinstance(err, CircuitOpenError)
            failures += [
                Failure(i, err.error_class, str(err), delay_s, counts=sent) for i in job.all_ids()
            ]
            return
        except ProviderError as err:
            self._release(job)
            # Not the items' fault: back to the queue without spending an attempt.
            delay_s = self.pcfg.breaker_reset_s
            failures += [
                Failure(i, "provider", str(err), delay_s, counts=False) for i in job.all_ids()
            ]
            return
        for i, key in enumerate(job.keys):
            batch.add_vector(key, vectors[i], job.hashes[i])
            batch.done_ids += job.ids[i]
            # Until the vector is written, an item for the same text still joins it.
            k = (key, job.hashes[i])
            if self.embedding.get(k) is job.ids[i]:
                late: list[int] = []
                self.embedding[k] = late
                batch.joins.append((k, late))
        batch.outcomes["embedded"] += len(job.keys)

    def _release(self, job: EmbedJob) -> None:
        """The job's results are being taken: later items for its texts embed anew. (No
        await between this and reading job.ids, so no joined item is left behind.)"""
        for key, hash_, ids in zip(job.keys, job.hashes, job.ids, strict=True):
            self._forget((key, hash_), ids)

    def _forget(self, k: tuple[str, bytes], ids: list[int]) -> None:
        """Stop joining items to `ids` for text `k` (unless a newer embedding took over)."""
        if self.embedding.get(k) is ids:
            del self.embedding[k]

    async def _split_bad_input(
        self, job: EmbedJob, err: InputError, batch: WriteBatch, failures: list[Failure]
    ) -> None:
        """One bad input must not fail its neighbours: isolate it, embed the rest."""
        n = len(job.keys)
        if n == 1:
            failures += [Failure(i, err.error_class, str(err)) for i in job.ids[0]]
            return
        if err.index is not None and 0 <= err.index < n:
            failures += [Failure(i, err.error_class, str(err)) for i in job.ids[err.index]]
            rest = [i for i in range(n) if i != err.index]
            await self._embed_job(job.part(rest), batch, failures)
            return
        half = n // 2
        await self._embed_job(job.part(range(half)), batch, failures)
        await self._embed_job(job.part(range(half, n)), batch, failures)

    async def _embed_with_retries(self, job: EmbedJob) -> Vectors:
        """In-process retries under a per-batch deadline; the error class picks the delay."""
        req = EmbedRequest(
            job.texts, self.p.model, self.p.dimensions, self.p.send_dimensions, job.tokens
        )
        deadline = time.monotonic() + self.wcfg.item_deadline_s
        attempt = 0
        while True:
            attempt += 1
            started = time.perf_counter()
            try:
                vectors = await self.embedder.embed(req)
            except (RetryableError, InputError, ProviderError) as err:
                if not isinstance(err, CircuitOpenError):
                    elapsed = time.perf_counter() - started
                    self.events.api_request(
                        self.provider, self.p.name, len(job.texts), elapsed, err.error_class
                    )
                if not isinstance(err, RetryableError) or attempt > self.wcfg.max_retries:
                    raise
                delay_s = self._retry_delay_s(attempt, err)
                if time.monotonic() + delay_s > deadline:
                    raise
                await asyncio.sleep(delay_s)
                continue
            self.events.api_request(
                self.provider, self.p.name, len(job.texts), time.perf_counter() - started, "ok"
            )
            return vectors

    def _retry_delay_s(self, attempt: int, err: RetryableError) -> float:
        if isinstance(err, RateLimitedError):
            # The provider's limiter already holds every sender until Retry-After; only
            # spread the retries so they do not arrive together.
            return random.uniform(0, 0.1)
        if isinstance(err, CircuitOpenError):
            return err.retry_after_s or self.pcfg.breaker_reset_s
        return backoff_s(attempt, self.wcfg.retry_base_s, self.wcfg.retry_max_s, err)

    async def _fail(self, failures: list[Failure], attempts: int) -> None:
        """Past the attempt budget (or never retryable): dead letters; else back to the queue."""
        final = [
            f
            for f in failures
            if f.error_class in FINAL_CLASSES or (attempts >= self.wcfg.max_attempts and f.counts)
        ]
        final_ids = {f.id for f in final}
        later = [f for f in failures if f.id not in final_ids]
        await self.queue.dead_letter(final)
        await self.queue.retry(later)
        if final:
            self.events.failed(self.p.name, "dead_lettered", len(final), final[0].error)
        if later:
            self.events.failed(self.p.name, "retried", len(later), later[0].error)
        self._finish([f.id for f in failures])

    async def _write_loop(self) -> None:
        while True:
            batch = await self.write_q.get()
            while not self.write_q.empty() and len(batch) < MAX_WRITE_ROWS:
                batch.extend(self.write_q.get_nowait())
            written = await self.store.write(batch)
            outcomes = batch.outcomes
            # Vectors the hash guard refused: the text changed and a newer item follows.
            outcomes["stale"] += max(0, len(batch.keys) - written)
            for outcome, n in outcomes.items():
                self.events.finished(self.p.name, outcome, n)
            self._finish(batch.done_ids)
            late = []
            for k, ids in batch.joins:
                self._forget(k, ids)
                late += ids
            if late:  # items that joined while their vector was being written: it is now
                await self.store.write(WriteBatch(done_ids=late))
                self.events.finished(self.p.name, "unchanged", len(late))
                self._finish(late)

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self.wcfg.lease_s / 3)
            await self.queue.extend(sorted(self.in_flight))


async def _supervise(main: asyncio.Future[Any], helpers: list[asyncio.Task[None]]) -> None:
    """Wait for main; if a helper fails first, stop with its error instead of limping on."""
    pending = {main, *helpers}
    while main in pending:
        done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        for t in done:
            if t is not main and not t.cancelled() and t.exception() is not None:
                main.cancel()
                t.result()  # raises the helper's error
    main.result()


class Worker:
    """One process: every configured pipeline, one LISTEN connection, one pool."""

    def __init__(
        self,
        cfg: Config,
        pool: asyncpg.Pool,
        embedders: dict[str, Embedder],
        rendered: dict[str, PipelineSQL],
        events: Events,
    ) -> None:
        self.cfg = cfg
        self.pool = pool
        self.events = events
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.queue = Queue(pool, self.worker_id, cfg.worker.lease_s)
        self.wakeups = {p.name: asyncio.Event() for p in cfg.pipelines}
        self.rendered = rendered
        # Logical mode: vector writes to a watched table would come back through the slot.
        mark_own = cfg.capture.mode == "logical"
        self.runners = [
            PipelineRunner(
                p,
                cfg.worker,
                self.queue,
                store_for(pool, p, rendered[p.name], mark_own),
                embedders[p.provider],
                p.provider,
                cfg.providers[p.provider],
                events,
                self.wakeups[p.name],
            )
            for p in cfg.pipelines
        ]

    async def run(self, stop: asyncio.Event, exit_when_idle: bool = False) -> None:
        side = start_capture_side(self.cfg, self.pool, self.wakeups, stop, self.rendered)
        listener, feeder = side.listener, side.feeder
        for r in self.runners:
            r.capture_caught_up = side.caught_up
        runs = [
            asyncio.create_task(r.run(stop, exit_when_idle), name=r.p.name) for r in self.runners
        ]
        log.info(
            "worker started",
            extra={"worker_id": self.worker_id, "pipelines": [r.p.name for r in self.runners]},
        )
        try:
            await _supervise(asyncio.gather(*runs), [listener, feeder])
        finally:
            stop.set()
            for t in runs:
                t.cancel()
            await asyncio.gather(*runs, return_exceptions=True)
            # The mover clears its "awake" on the way out, the slot reader queues what it
            # has read; the listener just goes.
            listener.cancel()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(feeder), timeout=5.0)
            feeder.cancel()
            await asyncio.gather(listener, feeder, return_exceptions=True)
