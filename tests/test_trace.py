"""Logs: every line of a run with faults is JSON; the lines about one batch share a trace id
from its claim through its API requests to its write's commit or its dead letters; no line
holds the API key or a row's text."""

from __future__ import annotations

import json
import re
from collections import defaultdict
from typing import Any

import psycopg

from syncer.testing.fake_embedder import BAD_INPUT_MARKER, FakeEmbedderProcess
from tests.conftest import syncer
from tests.test_pipeline import create_docs

N_ROWS = 300
BAD = (7, 150, 299)


def test_one_batch_shares_a_trace_id_from_claim_to_commit(
    db: psycopg.Connection[Any], make_config: Any, fake: FakeEmbedderProcess
) -> None:
    create_docs(db)
    db.execute(
        "INSERT INTO docs SELECT g, 'tracetitle-' || g, 'tracebody-' || g, NULL"
        " FROM generate_series(1, %s) g",
        (N_ROWS,),
    )
    for i in BAD:
        db.execute("UPDATE docs SET body = %s WHERE id = %s", (f"poison-{i} {BAD_INPUT_MARKER}", i))
    config = make_config()
    r = syncer(config, "install")
    assert r.returncode == 0, r.stderr
    fake.control(
        seed=13,
        fail_rate=0.2,
        fail_kinds=["status429", "status503"],
    )
    r = syncer(config, "run", "--exit-when-idle", "--log-format", "json", "--log-level", "debug")
    assert r.returncode == 0, r.stderr
    assert fake.stats()["by_status"].get("429") and fake.stats()["by_status"].get("503")

    lines = [json.loads(line) for line in r.stderr.splitlines() if line.strip()]
    for line in lines:  # "3 items retried" -> "items retried"
        line["msg"] = re.sub(r"^\d+ (items \w+)$", r"\1", line["msg"])
    for raw in r.stderr.splitlines():  # the key, and no row's text, in any form
        for secret in ("test-key-123", "tracetitle", "tracebody", "poison-"):
            assert secret not in raw, raw

    by_trace: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for line in lines:
        if "trace_id" in line:
            assert line["pipeline"] == "docs", line
            by_trace[line["trace_id"]].append(line)
    claims = {t for t, ls in by_trace.items() if any(x["msg"] == "claimed" for x in ls)}
    assert claims and set(by_trace) == claims  # no line names a trace no claim began
    for msg in ("embed request", "write committed", "items dead_lettered"):
        assert any(line["msg"] == msg and "trace_id" in line for line in lines), msg
    # A request answered 429 or 503 and retried stays in its batch's trace, up to the commit.
    faulted = {line["trace_id"] for line in lines if line.get("result", "ok") != "ok"}
    committed = {line["trace_id"] for line in lines if line["msg"] == "write committed"}
    assert faulted & committed

    complete = 0
    for trace in by_trace.values():
        msgs = [line["msg"] for line in trace]
        assert msgs[0] == "claimed", msgs
        assert sum(m == "claimed" for m in msgs) == 1, msgs  # one claim per trace
        if "write committed" in msgs:
            assert "embed request" in msgs, msgs
            assert msgs.index("embed request") < msgs.index("write committed"), msgs
            complete += 1
        # A batch that went out ends with a commit or with items handed back or dead-lettered.
        if "embed request" in msgs:
            assert {"write committed", "items dead_lettered", "items retried"} & set(msgs), msgs
    assert complete >= 2  # the rows came in a few claims
    # The rows were all embedded but the bad ones, through retries under new trace ids.
    n = db.execute("SELECT count(*) FROM docs WHERE embedding IS NOT NULL").fetchone()
    assert n == (N_ROWS - len(BAD),)
    # Dead letters name their batch: a single-row claim or request carries the row's key.
    keyed = [line for line in lines if "key" in line]
    assert all(json.loads(line["key"]) for line in keyed if line["msg"] == "embed request")
