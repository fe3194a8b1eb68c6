"""syncer.chunking: sizes, overlap, exact offsets, stable boundaries, and a loop that keeps
running while a 2 MB document splits."""

from __future__ import annotations

import asyncio
import itertools
import random
import time

import numpy as np
import pytest

from bench.splitters import changed, edits
from bench.texts import _Words, document
from syncer.chunking import Chunk, ChunkingError, SplitPool, Splitter, check_params
from syncer.providers.tokens import estimate_tokens

OPENAI = "text-embedding-3-small"


def _one_section(n_sentences: int, seed: int = 1) -> str:
    """Prose with no paragraph break: one section, so every neighbour shares overlap."""
    words = _Words(np.random.default_rng(seed), n_sentences * 120)
    return " ".join(words.sentence(6, 20) for _ in range(n_sentences))


@pytest.mark.parametrize(
    ("unit", "size", "overlap"), [("tokens", 512, 64), ("characters", 2000, 200)]
)
def test_sizes_and_overlap(unit: str, size: int, overlap: int) -> None:
    splitter = Splitter("recursive", unit, size, overlap, OPENAI, 8191)
    text = _one_section(1000)
    chunks = splitter.split(text)
    assert len(chunks) > 20
    assert all(c.units <= size for c in chunks)
    assert sum(c.units for c in chunks) / len(chunks) > size * 0.7  # chunks are filled
    shared = [splitter.count(text[b.start : a.end]) for a, b in itertools.pairwise(chunks)]
    # The overlap is whole sentences (then words) of at most `overlap` units.
    assert all(s <= overlap for s in shared), shared
    assert sum(s > 0 for s in shared) >= 0.8 * len(shared), shared
    assert sum(shared) / len(shared) > overlap / 3


def test_units_are_the_model_tokens_or_the_estimate() -> None:
    text = _one_section(40)
    exact = Splitter("recursive", "tokens", 64, 0, OPENAI, 8191)
    other = Splitter("recursive", "tokens", 64, 0, "nomic-embed-text", 8191)
    assert exact.count("hello world") == 2
    assert other.count(text) == estimate_tokens(text)
    assert all(c.units <= 64 for c in exact.split(text) + other.split(text))


def _random_text(rng: random.Random) -> str:
    pieces = [
        "word",
        "ünïcödé",
        "😀🎉",
        "こんにちは",
        "\r\n",
        "\r\n\r\n",
        "\n\n",
        "# Title\n",
        "- item\n",
        ". ",
        " ",
        "\t",
    ]
    return "".join(rng.choice(pieces) + rng.choice(["", " "]) for _ in range(rng.randint(0, 600)))


@pytest.mark.parametrize("kind", ["recursive", "markdown", "none"])
@pytest.mark.parametrize(("unit", "size", "overlap"), [("tokens", 16, 4), ("characters", 40, 8)])
def test_offsets_slice_exactly(kind: str, unit: str, size: int, overlap: int) -> None:
    rng = random.Random(7)
    for model in (OPENAI, "nomic-embed-text"):
        splitter = Splitter(kind, unit, size, overlap, model, 64)
        for _ in range(60):
            text = _random_text(rng)
            chunks = splitter.split(text)
            assert [c.index for c in chunks] == list(range(len(chunks)))
            for c in chunks:
                assert text[c.start : c.end] == c.text and c.text
                assert splitter.tokens(c.text) <= 64
            if text.strip():
                assert chunks


def _texts(chunks: list[Chunk]) -> list[str]:
    return [c.text for c in chunks]


@pytest.mark.parametrize(
    ("unit", "size", "overlap", "chars"),
    [("tokens", 512, 64, 48_000), ("characters", 2000, 200, 80_000)],
)
def test_an_edit_changes_few_chunks(unit: str, size: int, overlap: int, chars: int) -> None:
    splitter = Splitter("recursive", unit, size, overlap, OPENAI, 8191)
    for seed in range(3):
        rng = np.random.default_rng(300 + seed)
        doc = document(rng, chars)
        texts = _texts(splitter.split(doc))
        assert 40 <= len(texts) <= 70
        edited, inserted = edits(doc, rng)
        assert 1 <= changed(texts, _texts(splitter.split(edited))) <= 3
        assert (
            1 <= changed(texts, _texts(splitter.split(inserted))) <= 3 + 2
        )  # + overlap neighbours


@pytest.mark.parametrize("unit", ["tokens", "characters"])
def test_an_enormous_word_is_cut_by_characters(unit: str) -> None:
    word = "".join(random.Random(3).choices("abcdefghijklmnopqrstuvwxyz", k=60_000))
    text = f"Before it.\n\n{word}\n\nAfter it."
    splitter = Splitter("recursive", unit, 50_000, 0, OPENAI, 1000)
    chunks = splitter.split(text)
    assert all(splitter.tokens(c.text) <= 1000 for c in chunks)
    assert "".join(c.text for c in chunks if c.text not in ("Before it.", "After it.")) == word
    none = Splitter("none", unit, 50_000, 0, "nomic-embed-text", 1000).split(word)
    assert len(none) > 1 and "".join(c.text for c in none) == word


def test_markdown_starts_a_chunk_at_each_heading() -> None:
    doc = document(np.random.default_rng(5), 30_000)
    splitter = Splitter("markdown", "tokens", 256, 32, OPENAI, 8191)
    chunks = splitter.split(doc)
    headings = [i for i, line in enumerate(doc.split("\n")) if line.startswith("## ")]
    assert len(headings) >= 3
    for c in chunks:
        assert "\n## " not in c.text  # a heading is never inside a chunk, only at its start
    starts = {c.text.split("\n", 1)[0] for c in chunks}
    assert all(line in starts for line in doc.split("\n") if line.startswith("## "))


async def test_a_2mb_document_keeps_the_loop_responsive() -> None:
    doc = document(np.random.default_rng(9), 2_000_000)
    pool = SplitPool(Splitter("recursive", "tokens", 512, 64, OPENAI, 8191), workers=2)
    lags: list[float] = []
    interval_s = 0.005

    def tick(expected: float) -> None:
        now = time.perf_counter()
        lags.append(now - expected)
        handle[0] = loop.call_at(loop.time() + interval_s, tick, now + interval_s)

    loop = asyncio.get_running_loop()
    handle = [loop.call_later(interval_s, tick, time.perf_counter() + interval_s)]
    started = time.perf_counter()
    try:
        [chunks, other] = await pool.split_many([doc, "short text"])
    finally:
        handle[0].cancel()
        pool.close()
    elapsed = time.perf_counter() - started
    assert isinstance(chunks, list) and len(chunks) > 500
    assert other == [Chunk(0, "short text", 0, 10, 2)]
    assert len(lags) > elapsed / interval_s / 3  # the loop ran all along
    assert max(lags) < 0.050, f"max lag {max(lags) * 1000:.1f} ms"


async def test_one_failing_text_costs_only_itself() -> None:
    pool = SplitPool(Splitter("recursive", "characters", 100, 10, OPENAI, 8191, 1000), 2)
    try:
        results = await pool.split_many(["a" * 50, "b" * 1001, "c" * 50])
    finally:
        pool.close()
    assert [r[0].text for r in results if isinstance(r, list)] == ["a" * 50, "c" * 50]
    err = results[1]
    assert isinstance(err, ChunkingError) and err.error_class == "chunking_failed"
    assert "1,001 characters" in str(err)


@pytest.mark.parametrize(
    ("args", "key"),
    [
        (("recursive", "tokens", 64, 64), "overlap"),
        (("recursive", "tokens", 100, 200), "overlap"),
        (("recursive", "tokens", 15, 0), "size"),
        (("semantic", "tokens", 64, 0), "splitter"),
        (("recursive", "words", 64, 0), "unit"),
        (("recursive", "characters", 64, -1), "overlap"),
    ],
)
def test_bad_params_name_the_key(args: tuple[str, str, int, int], key: str) -> None:
    with pytest.raises(ValueError, match=rf"^{key}: "):
        check_params(*args)
    check_params("recursive", "characters", 15, 0)  # 15 characters is allowed


class _Fragile(Splitter):
    def split(self, text: str) -> list[Chunk]:
        if text == "boom":
            raise RuntimeError("the library broke")
        return super().split(text)


async def test_an_exception_in_the_splitter_becomes_a_chunking_error() -> None:
    pool = SplitPool(_Fragile("recursive", "characters", 100, 10, OPENAI, 8191), 1)
    try:
        before, failed, after = await pool.split_many(["one", "boom", "two"])
    finally:
        pool.close()
    assert isinstance(failed, ChunkingError)
    assert str(failed) == "splitting failed: RuntimeError: the library broke"
    assert before == [Chunk(0, "one", 0, 3, 3)] and after == [Chunk(0, "two", 0, 3, 3)]
