"""Dispatch: read each claimed row's current text, finish what needs no API call, refuse or
cut texts over the model's limit, and pack the rest into requests."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence

from syncer.config import PipelineConfig, ProviderConfig
from syncer.db import Database
from syncer.errors import InputTooLongError, SyncerError
from syncer.observe import Events, Fetched
from syncer.providers.tokens import estimate_tokens, pack_requests, truncate_to_tokens
from syncer.queue import BULK, LIVE, Item
from syncer.targets.store import SourceRow, VectorStore, WriteBatch
from syncer.worker.failures import FailureRouter
from syncer.worker.inflight import InFlight
from syncer.worker.jobs import EmbedJob, JobQueue

log = logging.getLogger("syncer.worker")


def by_key(items: list[Item]) -> tuple[dict[str, list[int]], dict[str, int]]:
    """The claimed items of each key, and the key's lane (live if any of its items is)."""
    ids_by_key: dict[str, list[int]] = {}
    lane_by_key: dict[str, int] = {}
    for item in items:
        ids_by_key.setdefault(item.key, []).append(item.id)
        lane_by_key[item.key] = min(item.lane, lane_by_key.get(item.key, BULK))
    return ids_by_key, lane_by_key


async def fetch_rows(
    db: Database, store: VectorStore, events: Events, pipeline: str, keys: Sequence[str]
) -> list[SourceRow]:
    """The claimed keys' rows, as they are now (timed, for the batch's trace)."""
    started = time.perf_counter()
    rows = await db.call(store.fetch, keys)
    events.emit(Fetched(pipeline, len(keys), time.perf_counter() - started))
    return rows


class Dispatcher:
    def __init__(
        self,
        p: PipelineConfig,
        provider: ProviderConfig,
        request_inputs: int,
        store: VectorStore,
        db: Database,
        in_flight: InFlight,
        failures: FailureRouter,
        embed_q: JobQueue,
        write_q: asyncio.Queue[WriteBatch],
        *,
        events: Events,
    ) -> None:
        self.p = p
        self.events = events
        self.max_tokens_per_input = provider.max_tokens_per_input
        self.max_tokens_per_request = provider.max_tokens_per_request
        self.request_inputs = request_inputs
        self.store = store
        self.db = db
        self.in_flight = in_flight
        self.failures = failures
        self.embed_q = embed_q
        self.write_q = write_q

    async def dispatch(self, items: list[Item]) -> None:
        ids_by_key, lane_by_key = by_key(items)
        keys = list(ids_by_key)
        rows = await fetch_rows(self.db, self.store, self.events, self.p.name, keys)
        now = WriteBatch()
        todo: list[SourceRow] = []
        for row in rows:
            ids = ids_by_key[row.key]
            if not row.present or row.text is None:
                self.store.clear(now, row)
                now.done_ids += ids
                now.outcomes["cleared"] += len(ids)
            elif row.hash == row.stored_hash or self.in_flight.written((row.key, row.hash or b"")):
                now.done_ids += ids
                now.outcomes["unchanged"] += len(ids)
            elif not self.in_flight.join((row.key, row.hash or b""), ids):
                todo.append(row)
            elif lane_by_key[row.key] == LIVE:
                self.embed_q.promote((row.key, row.hash or b""))
        if len(now):
            await self.write_q.put(now)
        # Live rows are packed first: they fill the first requests (bulk rows fill what they
        # leave), and a request holding one goes out ahead of bulk-only ones.
        todo.sort(key=lambda r: lane_by_key[r.key])
        await self._pack(todo, ids_by_key, lane_by_key)

    async def _pack(
        self, rows: list[SourceRow], ids_by_key: dict[str, list[int]], lanes: dict[str, int]
    ) -> None:
        """Cut or refuse texts over the model's limit; pack requests by count and tokens."""
        texts: list[str] = []
        kept: list[SourceRow] = []
        too_long: list[tuple[int, SyncerError]] = []
        limit = self.max_tokens_per_input
        tokens: list[int] = []
        for row in rows:
            text = row.text or ""
            n_tokens = estimate_tokens(text)
            if n_tokens > limit:
                if self.p.on_too_long == "dead_letter":
                    err = InputTooLongError(
                        f"text estimated over {limit} tokens (on_too_long = dead_letter)"
                    )
                    too_long += [(i, err) for i in ids_by_key[row.key]]
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
            await self.failures.route(too_long)
        suspects = self.in_flight.suspects
        alone = [i for i, r in enumerate(kept) if (r.key, r.hash or b"") in suspects]
        lone = set(alone)
        others = [i for i in range(len(kept)) if i not in lone] if alone else None
        requests = [[i] for i in alone]
        if others is None:
            requests += pack_requests(tokens, self.request_inputs, self.max_tokens_per_request)
        else:
            packed = pack_requests(
                [tokens[i] for i in others], self.request_inputs, self.max_tokens_per_request
            )
            requests += [[others[j] for j in r] for r in packed]
        for n, request in enumerate(requests):
            job = EmbedJob(
                [kept[i].key for i in request],
                [texts[i] for i in request],
                [kept[i].hash or b"" for i in request],
                [ids_by_key[kept[i].key] for i in request],
                sum(tokens[i] for i in request),
                suspect=n < len(alone),
                lane=min(lanes[kept[i].key] for i in request),
            )
            for key, hash_, ids in zip(job.keys, job.hashes, job.ids, strict=True):
                self.in_flight.embedding((key, hash_), ids)
            self.embed_q.put_job(job)
