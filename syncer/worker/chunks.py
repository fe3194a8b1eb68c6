"""Chunk pipelines: cut each claimed document into chunks, send only the chunks whose text
is not stored yet, and hand a document to the writers once all its chunks have vectors.

The dispatch reads the rows (as for rows), splits the changed ones off the event loop,
and asks the chunk table which chunk texts it holds already (for this document, or for
any with global dedupe). Each new chunk text is one API input, however many documents of
the claim share it. A document whose chunk failed for good fails whole, once: its items
go to the retry policy, and none of its chunks is written.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import Any

import orjson

from syncer.chunking import Chunk, ChunkingError, SplitPool, Splitter
from syncer.config import ChunkingConfig, PipelineConfig, ProviderConfig
from syncer.db import Database
from syncer.errors import InputTooLongError, SyncerError
from syncer.observe import Events
from syncer.providers import Vectors
from syncer.providers.tokens import estimate_tokens, pack_requests
from syncer.queue import Item
from syncer.targets.chunks import ChunkDoc, ChunksTarget
from syncer.targets.store import SourceRow, VectorStore, WriteBatch
from syncer.worker.dispatcher import by_key, fetch_rows
from syncer.worker.failures import FailureRouter
from syncer.worker.inflight import InFlight
from syncer.worker.jobs import EmbedJob, JobQueue

log = logging.getLogger("syncer.worker")

MAX_SPARE = 4096  # vectors of failed documents' good chunks kept for their retry (~25 MB)


def splitter_for(p: PipelineConfig, provider: ProviderConfig) -> Splitter:
    c = p.chunking or ChunkingConfig()
    # Room for what the template adds to each chunk (its fixed text; columns vary).
    fixed = estimate_tokens(p.template.replace("{chunk}", "")) if p.template else 0
    room = max(16, provider.max_tokens_per_input - fixed)
    return Splitter(c.splitter, c.unit, c.size, c.overlap, p.model, room)


def chunk_hash(p: PipelineConfig, text: str) -> bytes:
    """The identity of a chunk's vector: the text as embedded, and the model's fingerprint
    (a chunk never reuses the vector of another model)."""
    return hashlib.sha256(f"{p.model_fingerprint()}\x1e{text}".encode()).digest()


def compose(p: PipelineConfig, chunk: Chunk, extra: str | None) -> str:
    """What is embedded for a chunk: the template filled with the chunk and its row's
    columns (NULL as empty), or the chunk itself."""
    if p.template is None:
        return chunk.text
    columns = orjson.loads(extra) if extra else {}
    values = {k: ("" if v is None else v) for k, v in columns.items()}
    return p.template.format_map({**values, "chunk": chunk.text})


class ChunkResults:
    """Vectors of chunk texts, spread to the documents that wait for them.

    A document that fails (one chunk failed for good) is not written; the vectors its other
    chunks got are kept here a while (`spare`), so that its retry pays only for the chunk
    that failed.
    """

    def __init__(self, in_flight: InFlight) -> None:
        self.in_flight = in_flight
        self.spare: OrderedDict[bytes, Any] = OrderedDict()

    def done(self, job: EmbedJob, vectors: Vectors, batch: WriteBatch) -> None:
        for n, docs in enumerate(job.docs):
            for doc in docs:
                doc.vectors[job.hashes[n]] = vectors[n]
                doc.missing.discard(job.hashes[n])
                if doc.failed or not self._live(doc):
                    self._keep({job.hashes[n]: vectors[n]})
                elif not doc.missing:
                    ready(batch, doc)

    def failed_ids(self, job: EmbedJob, inputs: Iterable[int]) -> list[int]:
        out: list[int] = []
        for n in inputs:
            for doc in job.docs[n]:
                if not doc.failed and self._live(doc):
                    doc.failed = True
                    out += doc.ids
                    self._keep(doc.vectors)
        return out

    def take_spare(self, h: bytes) -> Any | None:
        return self.spare.get(h)

    def _keep(self, vectors: dict[bytes, Any]) -> None:
        self.spare.update(vectors)
        while len(self.spare) > MAX_SPARE:
            self.spare.popitem(last=False)

    def _live(self, doc: ChunkDoc) -> bool:
        """Still this process's to finish (not handed back at a stop, nor failed)."""
        return all(i in self.in_flight.attempts for i in doc.ids)


def ready(batch: WriteBatch, doc: ChunkDoc) -> None:
    batch.docs.append(doc)
    batch.done_ids += doc.ids
    batch.outcomes["embedded"] += len(doc.ids)


class ChunkDispatcher:
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
        splits: SplitPool,
        results: ChunkResults,
        *,
        events: Events,
    ) -> None:
        assert isinstance(store.target, ChunksTarget)
        self.p = p
        self.events = events
        self.max_tokens_per_input = provider.max_tokens_per_input
        self.max_tokens_per_request = provider.max_tokens_per_request
        self.request_inputs = request_inputs
        self.store = store
        self.target: ChunksTarget = store.target
        self.db = db
        self.in_flight = in_flight
        self.failures = failures
        self.embed_q = embed_q
        self.write_q = write_q
        self.splits = splits
        self.results = results

    async def dispatch(self, items: list[Item]) -> None:
        ids_by_key, lane_by_key = by_key(items)
        rows = await fetch_rows(self.db, self.store, self.events, self.p.name, list(ids_by_key))
        now = WriteBatch()
        changed: list[SourceRow] = []
        for row in rows:
            ids = ids_by_key[row.key]
            if not row.present or row.text is None:
                self.store.clear(now, row)
                now.done_ids += ids
                now.outcomes["cleared"] += len(ids)
            elif row.hash == row.stored_hash:
                now.done_ids += ids
                now.outcomes["unchanged"] += len(ids)
            else:
                changed.append(row)
        docs, failed = await self._cut(changed, ids_by_key, now)
        if failed:
            await self.failures.route(failed)
        waiting = await self._reuse(docs)
        for doc in docs:
            if not doc.missing:  # every chunk stored already: rewritten with no API call
                ready(now, doc)
        if len(now) or now.delete_keys:
            await self.write_q.put(now)
        await self._pack(waiting, lane_by_key)

    async def _cut(
        self, rows: list[SourceRow], ids_by_key: dict[str, list[int]], now: WriteBatch
    ) -> tuple[list[ChunkDoc], list[tuple[int, SyncerError]]]:
        """Split the changed documents (off the loop) and hash their chunks as embedded;
        a document with no chunk at all is cleared in `now`."""
        docs: list[ChunkDoc] = []
        failed: list[tuple[int, SyncerError]] = []
        splits = await self.splits.split_many([r.text or "" for r in rows])
        limit = self.max_tokens_per_input
        for row, chunks in zip(rows, splits, strict=True):
            ids = ids_by_key[row.key]
            if isinstance(chunks, ChunkingError):
                failed += [(i, chunks) for i in ids]
                continue
            if not chunks:  # nothing but white space: no chunk, as with no text
                self.store.clear(now, row)
                now.done_ids += ids
                now.outcomes["cleared"] += len(ids)
                continue
            texts = [compose(self.p, c, row.extra) for c in chunks]
            if any(estimate_tokens(t) > limit for t in texts):
                err = InputTooLongError(
                    f"a chunk with its template is estimated over {limit} tokens "
                    "(max_tokens_per_input): lower chunking.size or shorten the template"
                )
                failed += [(i, err) for i in ids]
                continue
            hashes = [chunk_hash(self.p, t) for t in texts]
            docs.append(ChunkDoc(row.key, row.hash or b"", ids, chunks, hashes, texts))
        return docs, failed

    async def _reuse(self, docs: list[ChunkDoc]) -> dict[bytes, tuple[str, list[ChunkDoc]]]:
        """Mark what each document must have embedded; the chunk texts to send, each with
        the documents that wait for it."""
        if not docs:
            return {}
        everything = list({h for d in docs for h in d.hashes})
        stored = await self.db.call(self._stored, [d.key for d in docs], everything)
        waiting: dict[bytes, tuple[str, list[ChunkDoc]]] = {}
        for doc in docs:
            for h, text in zip(doc.hashes, doc.texts, strict=True):
                if (doc.key, h) in stored or (None, h) in stored:
                    continue
                spare = self.results.take_spare(h)
                if spare is not None:  # embedded here for a document that then failed
                    doc.vectors[h] = spare
                    continue
                doc.missing.add(h)
                waiting.setdefault(h, (text, []))[1].append(doc)
        return waiting

    async def _stored(
        self, keys: Sequence[str], hashes: Sequence[bytes]
    ) -> set[tuple[str | None, bytes]]:
        async with self.store.pool.acquire() as conn:
            return await self.target.stored(conn, self.store.sql, keys, hashes)

    async def _pack(
        self, waiting: dict[bytes, tuple[str, list[ChunkDoc]]], lanes: dict[str, int]
    ) -> None:
        # Live documents' chunks first, as for rows. A chunk text traced as failing where
        # its neighbours did not (syncer.retry) goes alone, and is not retried in process.
        order = sorted(waiting, key=lambda h: min(lanes[d.key] for d in waiting[h][1]))
        suspects = self.in_flight.suspects
        alone = [h for h in order if (waiting[h][1][0].key, h) in suspects]
        if alone:
            order = [h for h in order if h not in set(alone)]
        tokens = [estimate_tokens(waiting[h][0]) for h in order]
        requests = [([h], True) for h in alone] + [
            ([order[i] for i in r], False)
            for r in pack_requests(tokens, self.request_inputs, self.max_tokens_per_request)
        ]
        for hashes, suspect in requests:
            docs = [tuple(dict.fromkeys(waiting[h][1])) for h in hashes]
            texts = [waiting[h][0] for h in hashes]
            job = EmbedJob(
                [d[0].key for d in docs],
                texts,
                hashes,
                [list(dict.fromkeys(i for d in ds for i in d.ids)) for ds in docs],
                sum(estimate_tokens(t) for t in texts),
                suspect=suspect,
                lane=min(lanes[d.key] for ds in docs for d in ds),
                docs=tuple(docs),
            )
            self.embed_q.put_job(job)
