"""Stub of the splitting module (replaced by the real one)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from semantic_text_splitter import MarkdownSplitter, TextSplitter

from syncer.errors import SyncerError


@dataclass(frozen=True)
class Chunk:
    index: int
    text: str
    start: int
    end: int
    units: int


class ChunkingError(SyncerError):
    error_class = "chunking_failed"


class Splitter:
    def __init__(
        self, splitter: str, unit: str, size: int, overlap: int, model: str, max_input_tokens: int
    ) -> None:
        self.kind = splitter
        cls = MarkdownSplitter if splitter == "markdown" else TextSplitter
        if unit == "tokens":
            self._s = cls.from_tiktoken_model("text-embedding-3-small", size, overlap=overlap)
        else:
            self._s = cls(size, overlap=overlap)
        self.unit = unit

    def count(self, text: str) -> int:
        return len(text) if self.unit == "characters" else max(1, len(text) // 4)

    def split(self, text: str) -> list[Chunk]:
        if self.kind == "none":
            return [Chunk(0, text, 0, len(text), self.count(text))]
        out = []
        for i, (start, t) in enumerate(self._s.chunk_indices(text)):
            out.append(Chunk(i, t, start, start + len(t), self.count(t)))
        return out


class SplitPool:
    def __init__(self, splitter: Splitter, workers: int) -> None:
        self.splitter = splitter
        self._ex = ThreadPoolExecutor(workers)

    async def split_many(self, texts: Sequence[str]) -> list[list[Chunk] | ChunkingError]:
        loop = asyncio.get_running_loop()

        def one(t: str) -> list[Chunk] | ChunkingError:
            try:
                return self.splitter.split(t)
            except Exception as err:
                return ChunkingError(str(err))

        return list(await asyncio.gather(*(loop.run_in_executor(self._ex, one, t) for t in texts)))

    def close(self) -> None:
        self._ex.shutdown(wait=False)
