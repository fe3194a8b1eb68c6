"""The chaos soak, shared by tests/test_chaos.py (short) and the benchmark's `chaos` scenario
(long): N real `syncer run` processes, SIGKILLed and replaced every few seconds, two real
database restarts (fast, then immediate), API faults (5xx, resets, hangs), and a writer of
inserts, text and non-text updates, deletes, rolled-back transactions and TRUNCATEs.
Afterwards one `syncer run --exit-when-idle` drains, and every row is checked.

Every text the writer writes is new (a counter in it), so a text the fake server received
more than once was paid for twice.
"""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
from pgvector.psycopg import register_vector

from syncer.testing.embedded_pg import EmbeddedPostgres
from syncer.testing.fake_embedder import FakeEmbedderProcess, fake_vector


@dataclass(frozen=True)
class Plan:
    duration_s: float = 20.0
    workers: int = 2
    kill_every_s: float = 4.0
    fail_rate: float = 0.05
    rows: int = 300
    seed: int = 1
    truncate_every_s: float = 8.0


@dataclass
class Outcome:
    rows: int = 0
    missing: int = 0  # rows with text and no vector
    stale: int = 0  # rows whose vector is not that of their text
    dead_letters: int = 0
    left_in_queue: int = 0
    inputs: int = 0
    duplicates: int = 0  # texts sent more than once
    kills: int = 0
    commits: int = 0
    bad_exits: list[str] = field(default_factory=list)  # worker exits that were not ours
    drain_rc: int = 0

    @property
    def duplicate_share(self) -> float:
        return self.duplicates / self.inputs if self.inputs else 0.0


class Worker:
    def __init__(self, cmd: list[str], env: dict[str, str]) -> None:
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=self.log, env=env)

    def stderr(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")


class Writer(threading.Thread):
    """Random writes; a statement cut by a restart is tried again on a new connection."""

    def __init__(self, url: str, plan: Plan) -> None:
        super().__init__(daemon=True)
        self.url, self.plan = url, plan
        self.rng = random.Random(plan.seed)
        self.halt = threading.Event()
        self.commits = 0
        self.n = 0

    def text(self) -> str:
        self.n += 1
        return f"chaos text {self.n}"

    def run(self) -> None:
        last_truncate = time.monotonic()
        while not self.halt.is_set():
            try:
                with psycopg.connect(self.url, autocommit=True, connect_timeout=2) as conn:
                    while not self.halt.is_set():
                        if time.monotonic() - last_truncate > self.plan.truncate_every_s:
                            last_truncate = time.monotonic()
                            conn.execute("TRUNCATE docs")
                        self.step(conn)
                        self.commits += 1
                        self.halt.wait(0.003)
            except psycopg.OperationalError:
                self.halt.wait(0.05)

    def step(self, conn: psycopg.Connection[Any]) -> None:
        key = self.rng.randrange(1, self.plan.rows * 2)
        op = self.rng.random()
        if op < 0.3:
            conn.execute(
                "INSERT INTO docs VALUES (%s, %s, NULL, 'new') ON CONFLICT DO NOTHING",
                (key, self.text()),
            )
        elif op < 0.7:
            conn.execute("UPDATE docs SET body = %s WHERE id = %s", (self.text(), key))
        elif op < 0.8:
            conn.execute("UPDATE docs SET tag = %s WHERE id = %s", (str(self.n), key))
        elif op < 0.9:
            conn.execute("DELETE FROM docs WHERE id = %s", (key,))
        else:
            with conn.transaction(force_rollback=True):
                conn.execute("UPDATE docs SET body = %s WHERE id = %s", (self.text(), key))


def run(
    pg: EmbeddedPostgres,
    url: str,
    config: Path,
    fake: FakeEmbedderProcess,
    env: dict[str, str],
    plan: Plan,
    dimensions: int,
) -> Outcome:
    """The soak against an installed pipeline `docs` (table docs: id, title, body, tag)."""
    rng = random.Random(plan.seed)
    cmd = [sys.executable, "-m", "syncer.cli", "-c", str(config), "run"]
    out = Outcome()
    fake.control(
        fail_rate=plan.fail_rate, fail_kinds=["status500", "status503", "reset", "hang"], seed=1
    )
    workers = [Worker(cmd, env) for _ in range(plan.workers)]
    writer = Writer(url, plan)
    writer.start()
    start = time.monotonic()
    restarts = ["fast", "immediate"]
    next_kill = start + plan.kill_every_s
    try:
        while (now := time.monotonic()) - start < plan.duration_s:
            for w in list(workers):
                code = w.proc.poll()
                if code is not None:
                    out.bad_exits.append(f"exit {code}: {w.stderr()[-2000:]}")
                    workers.remove(w)
                    workers.append(Worker(cmd, env))
            if restarts and now - start > plan.duration_s * (3 - len(restarts)) / 3:
                pg.restart(restarts.pop(0))
            if now >= next_kill:
                victim = workers.pop(rng.randrange(len(workers)))
                victim.proc.send_signal(signal.SIGKILL)
                victim.proc.wait(10)
                out.kills += 1
                workers.append(Worker(cmd, env))
                next_kill = now + plan.kill_every_s
            time.sleep(0.1)  # the soak's own pacing, not a synchronisation
    finally:
        writer.halt.set()
        writer.join(10)
        out.commits = writer.commits
        for w in workers:
            if w.proc.poll() is None:
                w.proc.send_signal(signal.SIGTERM)
        for w in workers:
            try:
                code = w.proc.wait(60)
            except subprocess.TimeoutExpired:
                w.proc.kill()
                code = -9
            if code != 0:
                out.bad_exits.append(f"SIGTERM gave {code}: {w.stderr()[-2000:]}")
    fake.control(fail_rate=0)
    drain = subprocess.run(
        [*cmd, "--exit-when-idle"], capture_output=True, text=True, env=env, timeout=300
    )
    out.drain_rc = drain.returncode
    if drain.returncode:
        out.bad_exits.append(f"drain gave {drain.returncode}: {drain.stderr[-2000:]}")
    _check(url, dimensions, out)
    paid = Counter(fake.inputs())
    out.inputs = sum(paid.values())
    out.duplicates = sum(n - 1 for n in paid.values() if n > 1)
    return out


def _check(url: str, dimensions: int, out: Outcome) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        register_vector(conn)
        for title, body, emb in conn.execute("SELECT title, body, embedding FROM docs"):
            out.rows += 1
            text = "\n\n".join(p for p in (title, body) if p) or None
            if text is None:
                out.stale += emb is not None
            elif emb is None:
                out.missing += 1
            elif not np.allclose(emb.to_numpy(), fake_vector(text, dimensions), rtol=1e-6):
                out.stale += 1
        out.dead_letters = conn.execute("SELECT count(*) FROM syncer.dead_letters").fetchone()[0]  # type: ignore[index]
        out.left_in_queue = conn.execute(
            "SELECT (SELECT count(*) FROM syncer.queue) + (SELECT count(*) FROM syncer.inbox)"
        ).fetchone()[0]  # type: ignore[index]
