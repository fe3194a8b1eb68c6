"""The chunks scenario: long documents drained into a chunk table, edits, and memory.

- A backlog of 20 kB documents (10,000; quick: 400) drained through the real command:
  chunks/s against the API's limit at the same settings (concurrency x batch / latency),
  and syncer's CPU per chunk (splitting included).
- Edits of drained documents: one paragraph changed in the middle, or a paragraph added
  at the top. Inputs sent per edit, beside what a peer that re-embeds every chunk of an
  edited document sends (its chunk count).
- Documents sharing a header and a footer: inputs sent with global dedupe and without.
- Peak RSS draining a backlog of 100,000 small documents (quick: 5,000).
"""

from __future__ import annotations

import asyncio
import random
import re
from pathlib import Path

from bench import profiling
from bench.harness import Harness, Pipeline
from bench.proc import Watched
from bench.report import Result
from bench.texts import documents

API = Pipeline(dimensions=1536, batch_size=64, max_concurrency=8)
LATENCY_MS = 200.0
EDITS = 100
TIMEOUT_S = 1800.0
_PARAGRAPH = re.compile(r"\n\n(?=[A-Z])")  # a prose paragraph starts after a blank line


def config_for(h: Harness, url: str, dedupe: str = "document") -> Path:
    path = h.write_config(url, API)
    with path.open("a", encoding="utf-8") as f:
        f.write(
            f'target = "chunks"\ntarget_table = "public.docs_chunks"\ndedupe = "{dedupe}"\n'
            '[pipelines.chunking]\nunit = "tokens"\nsize = 512\noverlap = 64\n'
        )
    return path


async def load(h: Harness, url: str, texts: list[str]) -> None:
    conn = await h.connect(url)
    try:
        await conn.execute("CREATE TABLE IF NOT EXISTS docs (id bigint PRIMARY KEY, body text)")
        records = list(enumerate(texts, 1))
        await conn.copy_records_to_table("docs", records=records, columns=["id", "body"])
        await conn.execute("VACUUM ANALYZE docs")
    finally:
        await conn.close()


async def prepare(h: Harness, texts: list[str], dedupe: str = "document") -> tuple[str, Path]:
    """A database of its own with the pipeline installed on an empty `docs`, then `texts`
    loaded as the backlog; (its url, the config). Dropped again if that fails."""
    url = h.new_database()
    try:
        config = config_for(h, url, dedupe)
        await load(h, url, [])
        await asyncio.to_thread(h.install, config)
        await load(h, url, texts)
    except BaseException:
        h.drop_database(url)
        raise
    return url, config


async def drain(
    h: Harness, config: Path, profile: Path | None = None
) -> tuple[float, float, float]:
    """Run `syncer run --exit-when-idle`; (wall s, CPU s, peak RSS MB). With `profile`, under
    py-spy, writing its stacks there (such a run's figures are not reported)."""
    command = h.syncer_command(config, "run", "--exit-when-idle")
    if profile is not None:
        command = profiling.wrap(command, profile)
    proc = Watched(command, h.env(), h.workdir / "chunks.log").start()
    usage = await asyncio.to_thread(proc.wait, TIMEOUT_S)
    if usage.returncode != 0:
        raise RuntimeError(f"syncer exited with {usage.returncode}:\n{proc.log_tail()}")
    return usage.wall_s, usage.cpu_s, usage.peak_rss_mb


async def count(h: Harness, url: str, sql: str) -> int:
    conn = await h.connect(url)
    try:
        return int(await conn.fetchval(sql))
    finally:
        await conn.close()


async def backlog(h: Harness, quick: bool, result: Result) -> tuple[str, Path]:
    """Drain the 20 kB documents; returns the database and config (for the edits)."""
    n = 400 if quick else 10_000
    url, config = await prepare(h, documents(n, seed=41))
    h.set_latency(LATENCY_MS)
    wall_s, cpu_s, _ = await drain(h, config)
    chunks = await count(h, url, "SELECT count(*) FROM docs_chunks")
    docs = await count(h, url, "SELECT count(DISTINCT id) FROM docs_chunks")
    if docs != n:
        raise RuntimeError(f"{docs} of {n} documents chunked")
    limit = API.max_concurrency * API.batch_size / (LATENCY_MS / 1000)
    rate = chunks / wall_s
    note = f"{n:,} docs of 20 kB, {chunks / n:.1f} chunks each; start-up included"
    result.add("chunks/s, whole run", rate, "chunks/s", note)
    result.add("share of the API limit", 100 * rate / limit, "%", f"limit {limit:,.0f} inputs/s")
    result.add("syncer CPU per 1,000 chunks", 1000 * cpu_s / chunks, "s", "splitting included")
    inputs = h.fake.stats()["inputs"]
    result.add("API inputs / chunks", inputs / chunks, "x", "1.0: each chunk paid for once")
    return url, config


async def edits(h: Harness, url: str, config: Path, result: Result) -> None:
    rng = random.Random(7)
    conn = await h.connect(url)
    try:
        ids = rng.sample(range(1, await conn.fetchval("SELECT count(*) FROM docs") + 1), EDITS)
        per_doc = float(
            await conn.fetchval(
                "SELECT avg(n) FROM (SELECT count(*) AS n FROM docs_chunks WHERE id = ANY($1) "
                "GROUP BY id) c",
                ids,
            )
        )
        for kind in ("one paragraph changed", "a paragraph added at the top"):
            for i in ids:
                body: str = await conn.fetchval("SELECT body FROM docs WHERE id = $1", i)
                paras = _PARAGRAPH.split(body)
                new = f"An edit made now, number {rng.randrange(10**9)}, of this document."
                if kind.startswith("one"):
                    paras[len(paras) // 2] = new
                else:
                    paras.insert(1, new)  # after the title
                await conn.execute("UPDATE docs SET body = $2 WHERE id = $1", i, "\n\n".join(paras))
            h.set_latency(LATENCY_MS)
            await drain(h, config)
            sent = h.fake.stats()["inputs"] / EDITS
            note = f"a re-embed-everything peer: {per_doc:.1f} ({per_doc / sent:.0f}x)"
            result.at_most(f"inputs per edit, {kind}", sent, "inputs", 3.0, note)
    finally:
        await conn.close()


async def memory(h: Harness, quick: bool, result: Result) -> None:
    n = 5_000 if quick else 100_000
    url, config = await prepare(h, documents(n, seed=43, chars=2_000))
    try:
        h.set_latency(0.0)
        _, _, peak = await drain(h, config)
        result.add(f"peak RSS, {n:,}-document backlog", peak, "MB", "2 kB documents")
    finally:
        h.drop_database(url)


async def boilerplate(h: Harness, quick: bool, result: Result) -> None:
    """Documents that share a header and a footer (a notice, a licence): global dedupe
    against per-document reuse, in inputs sent and in the drain's time."""
    n = 200 if quick else 2_000
    header, footer = documents(2, seed=47, chars=2_500)
    bodies = [f"{header}\n\n{body}\n\n{footer}" for body in documents(n, seed=53, chars=6_000)]
    sent: dict[str, float] = {}
    for dedupe in ("document", "global"):
        url, config = await prepare(h, bodies, dedupe)
        try:
            h.set_latency(LATENCY_MS)
            wall_s, cpu_s, _ = await drain(h, config)
            sent[dedupe] = h.fake.stats()["inputs"]
            chunks = await count(h, url, "SELECT count(*) FROM docs_chunks")
            note = f"{n:,} documents, {chunks:,} chunks; drain {wall_s:.1f} s, CPU {cpu_s:.1f} s"
            result.add(f"inputs sent, dedupe = {dedupe}", sent[dedupe], "inputs", note)
        finally:
            h.drop_database(url)
    saved = 1 - sent["global"] / sent["document"]
    result.add("saved by global dedupe", 100 * saved, "%", "header and footer shared by all")


async def profile(h: Harness, quick: bool) -> list[str]:
    """A separate drain of 20 kB documents under py-spy: where the syncer's CPU goes."""
    if profiling.py_spy() is None:
        return ["  (py-spy is not installed: pip install py-spy)"]
    url, config = await prepare(h, documents(200 if quick else 1_000, seed=59))
    try:
        h.set_latency(LATENCY_MS)
        path = h.workdir / "chunks.pyspy.txt"
        await drain(h, config, path)
    finally:
        h.drop_database(url)
    return profiling.summarize(path)


async def run(h: Harness, quick: bool) -> Result:
    result = Result("chunks")
    url, config = await backlog(h, quick, result)
    try:
        await edits(h, url, config, result)
    finally:
        h.drop_database(url)
    await boilerplate(h, quick, result)
    await memory(h, quick, result)
    result.sections["profile of the syncer"] = await profile(h, quick)
    return result
