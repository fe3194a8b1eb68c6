"""The fake OpenAI embeddings server, driven over real sockets in a real subprocess."""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import math
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import numpy as np
import orjson
import pytest
import pytest_asyncio
from multidict import CIMultiDictProxy

from syncer.testing.fake_embedder import (
    BAD_INPUT_MARKER,
    FakeEmbedderError,
    FakeEmbedderProcess,
    estimate_tokens,
    fake_vector,
)

KEY = "sk-fake-test-key"
DIMS = 64


@pytest.fixture(scope="module")
def server() -> Iterator[FakeEmbedderProcess]:
    with FakeEmbedderProcess(api_key=KEY, default_dimensions=DIMS) as process:
        yield process


@pytest.fixture(autouse=True)
def fresh(server: FakeEmbedderProcess) -> None:
    server.reset()


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


Answer = tuple[int, CIMultiDictProxy[str], bytes]


async def post(
    http: aiohttp.ClientSession,
    server: FakeEmbedderProcess,
    body: Any,
    key: str | None = KEY,
    timeout_s: float = 10.0,
) -> Answer:
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with http.post(
        f"{server.url}/embeddings", data=data, headers=headers, timeout=timeout
    ) as r:
        return r.status, r.headers, await r.read()


def embed_body(inputs: Any, **extra: Any) -> dict[str, Any]:
    return {"input": inputs, "model": "text-embedding-3-small", **extra}


def decoded(item: dict[str, Any]) -> np.ndarray[Any, Any]:
    embedding = item["embedding"]
    if isinstance(embedding, str):
        return np.frombuffer(base64.b64decode(embedding, validate=True), dtype="<f4")
    return np.asarray(embedding, dtype=np.float32)


def error_of(answer: Answer) -> dict[str, Any]:
    error: dict[str, Any] = orjson.loads(answer[2])["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


def wait_for(check: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "condition not met before the deadline"
        time.sleep(0.01)


def test_fake_vector_is_a_deterministic_unit_vector() -> None:
    first = fake_vector("hello", 1536)
    assert first.dtype == np.float32 and first.shape == (1536,)
    assert math.isclose(float(np.linalg.norm(first)), 1.0, rel_tol=1e-5)
    fake_vector.cache_clear()
    assert np.array_equal(fake_vector("hello", 1536), first)
    assert not np.array_equal(fake_vector("hello!", 1536), first)
    assert not first.flags.writeable  # cached arrays are shared


def test_estimate_tokens() -> None:
    assert estimate_tokens("a") == 1
    assert estimate_tokens("abcdefgh") == 2
    assert estimate_tokens("é" * 4) == 2  # UTF-8 bytes, not characters


@pytest.mark.parametrize("encoding", ["float", "base64"])
async def test_answer_decodes_to_fake_vector(
    http: aiohttp.ClientSession, server: FakeEmbedderProcess, encoding: str
) -> None:
    texts = ["first text", "second, ünïcode ✓", "third"]
    status, headers, raw = await post(http, server, embed_body(texts, encoding_format=encoding))
    assert status == 200 and headers["x-request-id"].startswith("req_")
    body = orjson.loads(raw)
    assert body["object"] == "list" and body["model"] == "text-embedding-3-small"
    assert [item["index"] for item in body["data"]] == [0, 1, 2]
    for item, text in zip(body["data"], texts, strict=True):
        assert item["object"] == "embedding"
        assert np.array_equal(decoded(item), fake_vector(text, DIMS))
    tokens = sum(estimate_tokens(t) for t in texts)
    assert body["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}


async def test_dimensions_and_single_string_input(
    http: aiohttp.ClientSession, server: FakeEmbedderProcess
) -> None:
    body = embed_body("one", dimensions=1536, encoding_format="base64")
    status, _, raw = await post(http, server, body)
    assert status == 200
    (item,) = orjson.loads(raw)["data"]
    assert np.array_equal(decoded(item), fake_vector("one", 1536))


@pytest.mark.parametrize(
    ("body", "param", "needle"),
    [
        (b"{not json", None, "JSON"),
        ({"input": ["x"]}, "model", "model"),
        (embed_body([]), "input", "non-empty"),
        (embed_body(["ok", ""]), "input[1]", "index 1"),
        (embed_body(["ok", "ok", 7]), "input[2]", "index 2"),
        (embed_body(["x"] * 2049), "input", "2048"),
        (embed_body(["a", "b", f"c {BAD_INPUT_MARKER}"]), "input[2]", "index 2"),
        (embed_body(["a"], dimensions=0), "dimensions", "dimensions"),
        (embed_body(["a"], encoding_format="hex"), "encoding_format", "encoding_format"),
    ],
)
async def test_invalid_requests_get_400(
    http: aiohttp.ClientSession, server: FakeEmbedderProcess, body: Any, param: str, needle: str
) -> None:
    answer = await post(http, server, body)
    assert answer[0] == 400
    error = error_of(answer)
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert needle in error["message"]


async def test_too_long_input_and_unknown_model(
    http: aiohttp.ClientSession, server: FakeEmbedderProcess
) -> None:
    server.control(max_tokens_per_input=10, models=["known"])
    answer = await post(http, server, {"input": ["ok", "x" * 44], "model": "known"})
    assert answer[0] == 400 and "maximum context length" in error_of(answer)["message"]
    assert "index 1" in error_of(answer)["message"]
    answer = await post(http, server, embed_body(["ok"]))
    assert answer[0] == 404 and error_of(answer)["code"] == "model_not_found"


async def test_api_key_checked_never_echoed_and_changeable(
    http: aiohttp.ClientSession, server: FakeEmbedderProcess
) -> None:
    for key in (None, "sk-wrong-key"):
        answer = await post(http, server, embed_body(["x"]), key=key)
        assert answer[0] == 401 and error_of(answer)["code"] == "invalid_api_key"
        assert b"sk-" not in answer[2]
    server.control(api_key="sk-rotated")
    assert (await post(http, server, embed_body(["x"])))[0] == 401
    assert (await post(http, server, embed_body(["x"]), key="sk-rotated"))[0] == 200
    server.reset()  # back to the start-up key
    assert (await post(http, server, embed_body(["x"])))[0] == 200


async def test_status_fault_with_retry_after_and_repeat(
    http: aiohttp.ClientSession, server: FakeEmbedderProcess
) -> None:
    server.control(fail_next=[{"kind": "status", "status": 503, "retry_after": "2", "repeat": 2}])
    for _ in range(2):
        status, headers, raw = await post(http, server, embed_body(["x"]))
        assert status == 503 and headers["Retry-After"] == "2"
        assert orjson.loads(raw)["error"]["type"] == "server_error"
    assert (await post(http, server, embed_body(["x"])))[0] == 200


async def test_reset_fault_is_a_connection_error(
    http: aiohttp.ClientSession, server: FakeEmbedderProcess
) -> None:
    server.control(fail_next=[{"kind": "reset"}])
    with pytest.raises(aiohttp.ClientConnectionError):
        await post(http, server, embed_body(["x"]))
    assert (await post(http, server, embed_body(["x"])))[0] == 200
    assert [(r["status"], r["fault"]) for r in server.requests()] == [(0, "reset"), (200, None)]


async def test_hang_fault_outlasts_a_client_timeout(
    http: aiohttp.ClientSession, server: FakeEmbedderProcess
) -> None:
    server.control(fail_next=[{"kind": "hang"}])
    started = time.monotonic()
    with pytest.raises(asyncio.TimeoutError):
        await post(http, server, embed_body(["x"]), timeout_s=0.5)
    assert time.monotonic() - started >= 0.5
    assert (await post(http, server, embed_body(["x"])))[0] == 200
    # The abandoned request is finished (cancelled) once its client has gone away.
    wait_for(lambda: server.stats()["by_status"].get("0") == 1)


def check_malformed(raw: bytes, texts: list[str], dims: int) -> None:
    with pytest.raises(json.JSONDecodeError):
        json.loads(raw)


def check_wrong_count(raw: bytes, texts: list[str], dims: int) -> None:
    assert len(json.loads(raw)["data"]) == len(texts) - 1


def check_wrong_dim(raw: bytes, texts: list[str], dims: int) -> None:
    assert {len(decoded(item)) for item in json.loads(raw)["data"]} == {dims - 1}


def check_nan(raw: bytes, texts: list[str], dims: int) -> None:
    vectors = [decoded(item) for item in json.loads(raw)["data"]]
    assert np.isnan(vectors[0]).any() and not np.isnan(vectors[1]).any()


def check_bad_base64(raw: bytes, texts: list[str], dims: int) -> None:
    first = json.loads(raw)["data"][0]["embedding"]
    assert isinstance(first, str)
    with pytest.raises(binascii.Error):
        base64.b64decode(first)


def check_missing_index(raw: bytes, texts: list[str], dims: int) -> None:
    indexes = [item["index"] for item in json.loads(raw)["data"]]
    assert len(indexes) == len(texts) and sorted(indexes) != list(range(len(texts)))


@pytest.mark.parametrize("encoding", ["float", "base64"])
@pytest.mark.parametrize(
    "check",
    [
        check_malformed,
        check_wrong_count,
        check_wrong_dim,
        check_nan,
        check_bad_base64,
        check_missing_index,
    ],
)
async def test_body_faults(
    http: aiohttp.ClientSession,
    server: FakeEmbedderProcess,
    encoding: str,
    check: Callable[[bytes, list[str], int], None],
) -> None:
    kind = check.__name__.removeprefix("check_")
    server.control(fail_next=[{"kind": kind}])
    texts = ["a", "b", "c"]
    status, _, raw = await post(http, server, embed_body(texts, encoding_format=encoding))
    assert status == 200
    check(raw, texts, DIMS)
    assert server.inputs() == []  # a bent answer is not a success
    assert (await post(http, server, embed_body(texts)))[0] == 200


async def test_random_faults_are_reproducible_with_a_seed(
    http: aiohttp.ClientSession, server: FakeEmbedderProcess
) -> None:
    async def statuses() -> list[int]:
        server.control(fail_rate=0.5, fail_kinds=["status500", "status429"], seed=7)
        return [(await post(http, server, embed_body(["x"])))[0] for _ in range(20)]

    first = await statuses()
    assert set(first) == {200, 429, 500}
    assert await statuses() == first


async def test_rpm_limit_answers_429_with_retry_after(
    http: aiohttp.ClientSession, server: FakeEmbedderProcess
) -> None:
    server.control(rpm=3)
    for remaining in ("2", "1", "0"):
        status, headers, _ = await post(http, server, embed_body(["x"]))
        assert status == 200 and headers["x-ratelimit-remaining-requests"] == remaining
        assert headers["x-ratelimit-limit-requests"] == "3"
        assert headers["x-ratelimit-reset-requests"].endswith("s")
    answer = await post(http, server, embed_body(["x"]))
    assert answer[0] == 429 and 1 <= int(answer[1]["Retry-After"]) <= 60
    assert error_of(answer)["code"] == "rate_limit_exceeded"
    assert server.stats()["by_status"] == {"200": 3, "429": 1}


async def test_tpm_limit_counts_tokens(
    http: aiohttp.ClientSession, server: FakeEmbedderProcess
) -> None:
    server.control(tpm=10)
    status, headers, _ = await post(http, server, embed_body(["x" * 32]))  # 8 tokens
    assert status == 200 and headers["x-ratelimit-remaining-tokens"] == "2"
    answer = await post(http, server, embed_body(["x" * 12]))  # 3 tokens
    assert answer[0] == 429 and error_of(answer)["type"] == "tokens"
    assert (await post(http, server, embed_body(["x" * 8])))[0] == 200  # 2 tokens fit


async def test_log_stats_and_reset(
    http: aiohttp.ClientSession, server: FakeEmbedderProcess
) -> None:
    await post(http, server, embed_body(["a", "b"], dimensions=8, encoding_format="base64"))
    await post(http, server, embed_body(["c", BAD_INPUT_MARKER]))
    await post(http, server, embed_body("d"))
    log = server.requests()
    assert [(r["status"], r["n_inputs"]) for r in log] == [(200, 2), (400, 2), (200, 1)]
    assert log[0]["dimensions"] == 8 and log[0]["encoding_format"] == "base64"
    assert log[0]["t"] <= log[1]["t"] <= log[2]["t"]
    assert server.inputs() == ["a", "b", "d"]
    stats = server.stats()
    assert (stats["requests"], stats["ok"], stats["inputs"], stats["tokens"]) == (3, 2, 3, 3)
    assert stats["by_status"] == {"200": 2, "400": 1} and stats["cpu_s"] > 0
    server.control(fail_next=[{"kind": "status", "status": 500}], latency_ms=5)
    server.reset()
    assert server.requests() == [] and server.stats()["requests"] == 0
    assert server.control()["latency_ms"] == 0 and server.control()["pending_faults"] == 0
    assert (await post(http, server, embed_body(["x"])))[0] == 200


def test_fail_kinds_round_trip_through_control(server: FakeEmbedderProcess) -> None:
    """What GET /_control shows for fail_kinds can be posted back as it is."""
    server.control(fail_kinds=["status503", "reset"])
    shown = server.control()["fail_kinds"]
    assert shown == [{"kind": "status", "status": 503}, {"kind": "reset"}]
    assert server.control(fail_kinds=shown)["fail_kinds"] == shown


@pytest.mark.parametrize(
    "fields",
    [
        {"no_such_knob": 1},
        {"rpm": 0},
        {"fail_rate": 2},
        {"fail_next": [{"kind": "explode"}]},
        {"fail_next": [{"kind": "status"}]},
        {"fail_next": [{"kind": "reset", "repeat": 0}]},
        {"fail_kinds": ["status500", "boom"]},
        {"fail_kinds": [{"kind": {"nested": 1}}]},
        {"fail_kinds": [{"kind": "status", "status": 999}]},
        {"fail_kinds": [["status500"]]},
    ],
)
def test_bad_control_fields_are_rejected(server: FakeEmbedderProcess, fields: Any) -> None:
    with pytest.raises(FakeEmbedderError, match="400"):
        server.control(**fields)
    assert server.control()["rpm"] is None  # nothing was applied


async def test_latency_delays_answers(
    http: aiohttp.ClientSession, server: FakeEmbedderProcess
) -> None:
    server.control(latency_ms=150)
    started = time.monotonic()
    assert (await post(http, server, embed_body(["x"])))[0] == 200
    assert time.monotonic() - started >= 0.15


def test_process_without_key_stops_cleanly_even_with_a_hang_pending() -> None:
    with FakeEmbedderProcess(default_dimensions=4) as process:
        assert process.url.endswith("/v1") and process.pid > 0
        process.control(fail_next=[{"kind": "hang"}])
        request = send_without_waiting(process.url, embed_body(["x"]))
        wait_for(lambda: process.stats()["requests"] == 1)
        started = time.monotonic()
        assert process.stop() == 0
        assert time.monotonic() - started < 5
        request.close()


def send_without_waiting(url: str, body: dict[str, Any]) -> socket.socket:
    """Send a request over a raw socket and leave its answer unread."""
    parts = urlsplit(url)
    data = orjson.dumps(body)
    sock = socket.create_connection((parts.hostname, parts.port))
    head = f"POST {parts.path}/embeddings HTTP/1.1\r\nHost: x\r\nContent-Length: {len(data)}\r\n"
    sock.sendall(head.encode() + b"Content-Type: application/json\r\n\r\n" + data)
    return sock


def test_start_failure_reports_stderr() -> None:
    with pytest.raises(FakeEmbedderError, match="default-dimensions"):
        FakeEmbedderProcess(default_dimensions=0).start()
