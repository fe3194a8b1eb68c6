"""capture_cost: what syncer's capture costs the user's own writes.

pgbench (the one bundled with the embedded server) runs the same workload on two tables of
the same shape, one plain and one with syncer's capture installed; the arms alternate, and
each keeps its best round (noise only ever slows a run down). Three arms:

- plain: no capture;
- captured: capture, with a worker's capture side running (`bench.child --capture-only`:
  the real Listener and InboxMover) and draining the inbox as it fills, as in production.
  Its database work counts in the server CPU; the embedding work is left out, so this is
  the cost of capture itself. The target is judged here;
- captured, no worker: nobody drains or is awake, so every statement also NOTIFYs;
- logical: capture.mode = 'logical' on a third table of the same shape, with a worker's
  capture side (the SlotReader) streaming the slot and queueing keys during the run. The
  server decodes the WAL of every table, so a round starts once the reader has caught up
  with what the other arms wrote;
- logical, no reader: the slot exists and keeps the WAL, nobody reads it: the cost inside
  the user's transaction (wal_level = logical, which every arm here runs with);
- bare trigger: not syncer, the floor of any trigger capture. Triggers of syncer's shape
  (row-level UPDATE behind the same WHEN, statement-level INSERT with a transition table)
  whose body only inserts the key into an unindexed one-column table: no NOTIFY, no
  SECURITY DEFINER, nothing to drain it.
"""

from __future__ import annotations

import asyncio
import re
import signal
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from urllib.parse import urlparse

import psutil

from bench.harness import REPO, Harness, Pipeline
from bench.proc import backend_count, backends_settled, postgres_cpu_s
from bench.report import Result
from bench.texts import texts

BULK_ROWS = 10_000
ARMS = (
    "plain",
    "captured",
    "captured, no worker",
    "logical",
    "logical, no reader",
    "bare trigger",
)
TABLES = {
    "plain": "plain_docs",
    "captured": "captured_docs",
    "captured, no worker": "captured_docs",
    "logical": "logical_docs",
    "logical, no reader": "logical_docs",
    "bare trigger": "bare_docs",
}
SOURCE_TABLES = ("plain_docs", "captured_docs", "logical_docs", "bare_docs")
BARE_TRIGGERS = """
CREATE TABLE bare_capture (id bigint);
CREATE FUNCTION bare_update() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN INSERT INTO bare_capture (id) VALUES (NEW.id); RETURN NULL; END $$;
CREATE FUNCTION bare_insert() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN INSERT INTO bare_capture (id) SELECT id FROM new_rows; RETURN NULL; END $$;
CREATE TRIGGER bare_update AFTER UPDATE ON bare_docs FOR EACH ROW
    WHEN (OLD.body IS DISTINCT FROM NEW.body) EXECUTE FUNCTION bare_update();
CREATE TRIGGER bare_insert AFTER INSERT ON bare_docs REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION bare_insert();
"""
LOGICAL = {"mode": "logical", "slot": "bench_capture", "publication": "bench_capture"}
_TPS_RE = re.compile(r"^tps = ([0-9.]+)", re.MULTILINE)
_DONE_RE = re.compile(r"^number of transactions actually processed: ([0-9]+)", re.MULTILINE)


@dataclass(frozen=True)
class Run:
    tps: float
    server_cpu_us: float  # PostgreSQL's CPU per transaction: steadier than tps on a busy box
    transactions: int = 0
    reader_us: float = float("inf")  # logical arm: the reader process's CPU per transaction
    walsender_us: float = float("inf")  # logical arm: the walsender's CPU per transaction

    def best(self, other: Run) -> Run:
        return Run(
            max(self.tps, other.tps),
            min(self.server_cpu_us, other.server_cpu_us),
            max(self.transactions, other.transactions),
            min(self.reader_us, other.reader_us),
            min(self.walsender_us, other.walsender_us),
        )


@dataclass(frozen=True)
class Workload:
    name: str
    script: str  # pgbench script; {table} and {rows} are filled in
    clients: int
    floor: float  # the target for captured / plain
    transactions: int = 0  # 0: run for `seconds` instead


@dataclass(frozen=True)
class Sizes:
    rows: int  # rows in each table before the workloads
    seconds: int
    rounds: int
    bulk_transactions: int


def workloads(sizes: Sizes) -> list[Workload]:
    new_text = "repeat(md5(random()::text), 16 + (random() * 31)::int)"  # 512–1,504 chars
    update = (
        f"\\set id random(1, {{rows}})\nUPDATE {{table}} SET body = {new_text} WHERE id = :id;\n"
    )
    insert = f"INSERT INTO {{table}} (body) VALUES ({new_text});\n"
    return [
        Workload("single-row UPDATE", update, clients=4, floor=0.85),
        Workload("single-row INSERT", insert, clients=4, floor=0.85),
        Workload(
            f"INSERT … SELECT {BULK_ROWS:,} rows",
            "INSERT INTO {table} (body) SELECT body FROM bench_texts;\n",
            clients=1,
            floor=0.7,
            transactions=sizes.bulk_transactions,
        ),
    ]


async def run(h: Harness, quick: bool) -> Result:
    sizes = Sizes(10_000, 2, 1, 2) if quick else Sizes(50_000, 15, 3, 10)
    database, configs = await _prepare(h, sizes.rows)
    try:
        return await _compare(h, database, configs, sizes)
    finally:
        h.drop_database(h.server.url(database))


async def _compare(h: Harness, database: str, configs: dict[str, Path], sizes: Sizes) -> Result:
    result = Result("capture_cost")
    for w in workloads(sizes):
        best = {arm: Run(0.0, float("inf")) for arm in ARMS}
        for _ in range(sizes.rounds):
            for arm in ARMS:
                run = await _arm(h, database, configs, w, sizes, arm)
                best[arm] = best[arm].best(run)
        for arm in ARMS:
            note = f"{w.clients} client(s), server CPU {best[arm].server_cpu_us:,.0f} µs/tx"
            result.add(f"{w.name}, {arm}", best[arm].tps, "tx/s", note)
        plain, captured, alone = best["plain"], best["captured"], best["captured, no worker"]
        cpu_note = f"server CPU per tx x{captured.server_cpu_us / plain.server_cpu_us:.2f}"
        result.at_least(
            f"{w.name}, captured / plain", captured.tps / plain.tps, "x", w.floor, cpu_note
        )
        cpu_note = f"server CPU per tx x{alone.server_cpu_us / plain.server_cpu_us:.2f}"
        result.add(f"{w.name}, no worker / plain", alone.tps / plain.tps, "x", cpu_note)
        logical, unread = best["logical"], best["logical, no reader"]
        cpu_note = f"server CPU per tx x{logical.server_cpu_us / plain.server_cpu_us:.2f}"
        result.at_least(
            f"{w.name}, logical / plain", logical.tps / plain.tps, "x", w.floor, cpu_note
        )
        cpu_note = f"server CPU per tx x{unread.server_cpu_us / plain.server_cpu_us:.2f}"
        result.add(f"{w.name}, logical no reader / plain", unread.tps / plain.tps, "x", cpu_note)
        note = "in the logical arm's best round (plain: server CPU above)"
        result.add(f"{w.name}, logical: walsender CPU per tx", logical.walsender_us, "µs", note)
        result.add(f"{w.name}, logical: reader CPU per tx", logical.reader_us, "µs", note)
        bare = best["bare trigger"]
        note = f"floor of trigger capture; server CPU per tx x{bare.server_cpu_us / plain.server_cpu_us:.2f}"
        result.add(f"{w.name}, bare trigger / plain", bare.tps / plain.tps, "x", note)
    return result


async def _arm(
    h: Harness, database: str, configs: dict[str, Path], w: Workload, sizes: Sizes, arm: str
) -> Run:
    """One round of one arm; the captured arms start from an empty inbox and queue. Every
    arm starts right after a checkpoint, so none pays for the writes of the one before."""
    url = h.server.url(database)
    conn = await h.connect(url)
    try:
        await conn.execute("CHECKPOINT")
        if arm in ("plain", "bare trigger"):
            await conn.execute("TRUNCATE bare_capture")
            return await _pgbench(h, database, w, sizes, TABLES[arm])
        await conn.execute("TRUNCATE syncer.inbox, syncer.queue")
        await conn.execute("SELECT setval('syncer.awake_until', 0)")
        if arm not in ("captured", "logical"):
            return await _pgbench(h, database, w, sizes, TABLES[arm])
        command = [sys.executable, "-m", "bench.child", "-c", str(configs[arm])]
        child = await asyncio.create_subprocess_exec(
            *command, "--capture-only", env=h.env(), cwd=REPO, stderr=asyncio.subprocess.PIPE
        )
        try:
            ready, args = (LISTENING, ()) if arm == "captured" else (CAUGHT_UP, (LOGICAL["slot"],))
            if arm == "logical":
                args = (*args, await conn.fetchval("SELECT pg_current_wal_flush_lsn()"))
            deadline = time.monotonic() + 120
            while not await conn.fetchval(ready, *args):
                if child.returncode is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the capture side of the {arm!r} arm did not start")
                await asyncio.sleep(0.05)
            await conn.execute("TRUNCATE syncer.queue")  # what it read before the round
            if arm == "captured":
                return await _pgbench(h, database, w, sizes, TABLES[arm])
            walsender = psutil.Process(await conn.fetchval(WALSENDER, LOGICAL["slot"]))
            reader = psutil.Process(child.pid)
            before = _cpu_s(reader), _cpu_s(walsender)
            run = await _pgbench(h, database, w, sizes, TABLES[arm])
            # The slot is read after the commits: count the reading that trails pgbench too.
            end = await conn.fetchval("SELECT pg_current_wal_flush_lsn()")
            deadline = time.monotonic() + 120
            while not await conn.fetchval(CAUGHT_UP, LOGICAL["slot"], end):
                if time.monotonic() > deadline:
                    raise RuntimeError("the logical reader did not catch up after pgbench")
                await asyncio.sleep(0.01)
            reader_s, walsender_s = _cpu_s(reader) - before[0], _cpu_s(walsender) - before[1]
            n = max(1, run.transactions)
            return replace(run, reader_us=1e6 * reader_s / n, walsender_us=1e6 * walsender_s / n)
        finally:
            child.send_signal(signal.SIGTERM)
            async with asyncio.timeout(30):
                await child.communicate()
    finally:
        await conn.close()


WALSENDER = "SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1"
CAUGHT_UP = (
    "SELECT active AND confirmed_flush_lsn >= $2 FROM pg_replication_slots WHERE slot_name = $1"
)
LISTENING = (
    "SELECT count(*) > 0 FROM pg_stat_activity"
    " WHERE application_name = 'syncer' AND query LIKE 'LISTEN%'"
)


async def _prepare(h: Harness, rows: int) -> tuple[str, dict[str, Path]]:
    """Four tables of the same shape and content; trigger capture installed on one,
    logical capture on another, bare triggers on a third. Returns the database's name and
    the configs by arm."""
    url = h.new_database()
    conn = await h.connect(url)
    try:
        await conn.execute("CREATE TABLE bench_texts (body text NOT NULL)")
        records = [(t,) for t in texts(BULK_ROWS, seed=99)]
        await conn.copy_records_to_table("bench_texts", records=records)
        for table in SOURCE_TABLES:
            await conn.execute(
                f"CREATE TABLE {table} (id bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,"
                " body text NOT NULL, embedding vector(1536), embedding_hash bytea)"
            )
            for _ in range(rows // BULK_ROWS):
                await conn.execute(f"INSERT INTO {table} (body) SELECT body FROM bench_texts")
        await conn.execute(BARE_TRIGGERS)
        configs = {
            "captured": h.write_config(url, Pipeline(), table="public.captured_docs"),
            "logical": h.write_config(
                url, Pipeline(), table="public.logical_docs", name="logical", capture=LOGICAL
            ),
        }
        for config in configs.values():
            await asyncio.to_thread(h.install, config)
        for table in SOURCE_TABLES:
            # An autovacuum of one table in the middle of its arm would count against it.
            await conn.execute(f"ALTER TABLE {table} SET (autovacuum_enabled = off)")
            await conn.execute(f"VACUUM ANALYZE {table}")
    finally:
        await conn.close()
    return urlparse(url).path.lstrip("/"), configs


async def _pgbench(h: Harness, database: str, w: Workload, sizes: Sizes, table: str) -> Run:
    script = h.workdir / f"pgbench-{table}.sql"
    script.write_text(w.script.format(table=table, rows=sizes.rows), encoding="utf-8")
    how = ["-t", str(w.transactions)] if w.transactions else ["-T", str(sizes.seconds)]
    server = ["-h", h.server.socket_dir, "-U", "postgres", database]
    load = ["-c", str(w.clients), "-j", str(min(w.clients, 2)), *how]
    command = [str(h.bin_dir / "pgbench"), "-n", *load, "-f", str(script), *server]
    backends = backend_count(h.postmaster_pid)
    cpu_before = postgres_cpu_s(h.postmaster_pid)
    proc = await asyncio.create_subprocess_exec(
        *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await proc.communicate()
    await asyncio.to_thread(backends_settled, h.postmaster_pid, backends)
    cpu_s = postgres_cpu_s(h.postmaster_pid) - cpu_before
    tps, done = _TPS_RE.search(out.decode()), _DONE_RE.search(out.decode())
    if proc.returncode != 0 or tps is None or done is None:
        raise RuntimeError(f"pgbench failed ({proc.returncode}): {err.decode()[-500:]}")
    n = int(done.group(1))
    return Run(float(tps.group(1)), 1e6 * cpu_s / max(1, n), n)


def _cpu_s(p: psutil.Process) -> float:
    t = p.cpu_times()
    return float(t.user + t.system)
