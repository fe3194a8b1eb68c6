"""Unit tests of the provider layer: the OpenAI protocol without HTTP, the checks the
guarded client applies to every provider's answer, the registry, and one round trip
through the fake server for what only a real answer shows (the key kept out of errors)."""

from __future__ import annotations

import base64
import email.utils
import re
from pathlib import Path
from typing import Any, get_args

import numpy as np
import orjson
import pytest

from syncer import config
from syncer.errors import (
    DimensionError,
    InputError,
    ProviderError,
    RateLimitedError,
    RetryableError,
)
from syncer.providers import KINDS, EmbedRequest, GuardedClient, make_embedder
from syncer.providers.base import parse_retry_after
from syncer.providers.client import check_vectors
from syncer.providers.limits import Quota
from syncer.providers.openai import OpenAIProvider, parse_duration, read_quota
from syncer.testing.fake_embedder import FakeEmbedderProcess

DIM = 3


def provider(**settings: Any) -> OpenAIProvider:
    return OpenAIProvider("p", config.OpenAIProviderConfig(**settings))


def request(n: int = 2, send_dimensions: bool = True) -> EmbedRequest:
    return EmbedRequest([f"text {i}" for i in range(n)], "m", DIM, send_dimensions, 10)


def b64(vector: list[float]) -> str:
    return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode()


def answer_body(data: Any, usage: Any = None) -> bytes:
    doc: dict[str, Any] = {"object": "list", "data": data}
    if usage is not None:
        doc["usage"] = usage
    return orjson.dumps(doc)


# --- the request --------------------------------------------------------------------------


def test_request_asks_for_base64_and_the_dimensions() -> None:
    http = provider(base_url="http://h:1/v1/").request(request())
    assert (http.method, http.url, http.headers) == ("POST", "http://h:1/v1/embeddings", None)
    assert orjson.loads(http.body) == {
        "model": "m",
        "input": ["text 0", "text 1"],
        "dimensions": DIM,
        "encoding_format": "base64",
    }


def test_request_leaves_out_dimensions_when_told() -> None:
    body = orjson.loads(provider().request(request(send_dimensions=False)).body)
    assert "dimensions" not in body


def test_a_refused_encoding_falls_back_to_floats_once() -> None:
    p = provider()
    assert not p.fall_back(InputError("provider p: HTTP 400: 'input' is too long"))
    assert "encoding_format" in orjson.loads(p.request(request()).body)
    assert p.fall_back(InputError("provider p: HTTP 400: 'encoding_format' must be 'float'"))
    assert "encoding_format" not in orjson.loads(p.request(request()).body)
    assert not p.fall_back(InputError("provider p: HTTP 400: 'encoding_format' must be 'float'"))


def test_session_headers_carry_the_key_only_when_there_is_one() -> None:
    p = provider()
    assert p.session_headers("k") == {
        "Content-Type": "application/json",
        "Authorization": "Bearer k",
    }
    assert p.session_headers("") == {"Content-Type": "application/json"}


# --- the answer ---------------------------------------------------------------------------


def test_answer_places_base64_and_float_vectors_by_index_and_reads_usage() -> None:
    data = [
        {"index": 1, "embedding": [4.0, 5.0, 6.0]},
        {"index": 0, "embedding": b64([1.0, 2.0, 3.0])},
    ]
    got = provider().answer(answer_body(data, {"prompt_tokens": 7}), request())
    assert got.vectors.dtype == np.float32
    assert got.vectors.tolist() == [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]
    assert got.used_tokens == 7


@pytest.mark.parametrize("usage", [None, {}, {"prompt_tokens": -1}, {"prompt_tokens": "7"}, 3])
def test_usage_that_cannot_be_read_is_none(usage: Any) -> None:
    data = [{"index": i, "embedding": [0.0] * DIM} for i in range(2)]
    raw = orjson.dumps({"data": data, "usage": usage})
    assert provider().answer(raw, request()).used_tokens is None


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"not json", "malformed answer"),
        (b"[]", "malformed answer"),
        (b'{"object": "list"}', "malformed answer"),
        (b'{"data": {"0": [1, 2, 3]}}', "malformed answer (data is not a list)"),
        (answer_body([{"index": 0, "embedding": [0, 0, 0]}]), "1 embeddings for 2 inputs"),
        (answer_body([1, 2]), "malformed embedding item"),
        (answer_body([{"index": 0}, {"index": 1}]), "malformed embedding item"),
        (
            answer_body([{"index": "x", "embedding": []}, {"index": 1, "embedding": []}]),
            "malformed embedding item",
        ),
        (
            answer_body([{"index": 0, "embedding": [0, 0, 0]}, {"embedding": [0, 0, 0]}]),
            "bad or repeated index -1",
        ),
        (
            answer_body([{"index": 0, "embedding": [0, 0, 0]}, {"index": 0, "embedding": [0] * 3}]),
            "bad or repeated index 0",
        ),
        (
            answer_body([{"index": 0, "embedding": "!!!!"}, {"index": 1, "embedding": "AAAA"}]),
            "not valid base64",
        ),
        (
            answer_body([{"index": 0, "embedding": "AAA="}, {"index": 1, "embedding": "AAAA"}]),
            "base64 embedding has 2 bytes",
        ),
        (
            answer_body([{"index": 0, "embedding": ["a", 1, 2]}, {"index": 1, "embedding": []}]),
            "embedding holds non-numbers",
        ),
        (
            answer_body([{"index": 0, "embedding": {"v": 1}}, {"index": 1, "embedding": []}]),
            "embedding of type dict",
        ),
    ],
)
def test_malformed_answers_are_retryable(raw: bytes, expected: str) -> None:
    with pytest.raises(RetryableError) as caught:
        provider().answer(raw, request())
    assert type(caught.value) is RetryableError
    assert str(caught.value).startswith("provider p: ") and expected in str(caught.value)


@pytest.mark.parametrize("embedding", [[1.0, 2.0], b64([1.0, 2.0, 3.0, 4.0])])
def test_a_vector_of_another_size_is_a_dimension_error(embedding: Any) -> None:
    data = [{"index": 0, "embedding": [0.0] * DIM}, {"index": 1, "embedding": embedding}]
    with pytest.raises(DimensionError, match=r"answered [24] dimensions, the config says 3"):
        provider().answer(answer_body(data), request())


# --- what the client checks for every provider --------------------------------------------


def test_check_vectors_accepts_one_finite_vector_per_input() -> None:
    check_vectors("p", np.zeros((2, DIM), dtype=np.float32), request())


@pytest.mark.parametrize(
    ("vectors", "error", "expected"),
    [
        (np.zeros((1, DIM)), RetryableError, "(1, 3) vectors for 2 inputs"),
        (np.zeros(2 * DIM), RetryableError, "(6,) vectors for 2 inputs"),
        (np.zeros((2, DIM + 1)), DimensionError, "answered 4 dimensions, the config says 3"),
        (np.array([[0, 0, 0], [0, np.nan, 0]]), RetryableError, "NaN or infinite"),
        (np.array([[0, 0, 0], [0, np.inf, 0]]), RetryableError, "NaN or infinite"),
    ],
)
def test_check_vectors_refuses_what_no_provider_may_pass(
    vectors: Any, error: type[Exception], expected: str
) -> None:
    with pytest.raises(error, match=re.escape(expected)):
        check_vectors("p", vectors.astype(np.float32), request())


# --- error answers ------------------------------------------------------------------------


def error_body(message: str) -> bytes:
    return orjson.dumps({"error": {"message": message, "type": "invalid_request_error"}})


def test_a_429_is_rate_limited_with_its_retry_after() -> None:
    err = provider().error(429, error_body("slow down"), {"Retry-After": "3"})
    assert type(err) is RateLimitedError and err.retry_after_s == 3.0
    assert str(err) == "provider p: HTTP 429: slow down"


@pytest.mark.parametrize("status", [500, 502, 503, 408, 409])
def test_server_errors_timeouts_and_conflicts_are_retryable(status: int) -> None:
    err = provider().error(status, error_body("busy"), {"Retry-After": "1.5"})
    assert type(err) is RetryableError and err.retry_after_s == 1.5
    assert provider().error(status, b"", {}).retry_after_s is None  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("status", "message", "index"),
    [
        (400, "Invalid 'input[3]': string too long.", 3),
        (400, "input at index 12 is empty", 12),
        (422, "Input 7 exceeds the context length", 7),
        (413, "Request too large", None),
    ],
)
def test_a_refused_input_names_its_index_when_the_message_does(
    status: int, message: str, index: int | None
) -> None:
    err = provider().error(status, error_body(message), {})
    assert isinstance(err, InputError) and err.index == index


@pytest.mark.parametrize("status", [401, 403, 404])
def test_other_refusals_mean_the_provider_refuses_everything(status: int) -> None:
    err = provider().error(status, error_body("Incorrect API key provided"), {})
    assert type(err) is ProviderError
    assert str(err) == f"provider p: HTTP {status}: Incorrect API key provided"


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b'{"error": "plain string"}', "plain string"),
        (b"<html>Bad Gateway</html>", "<html>Bad Gateway</html>"),
        (b"[1, 2]", "[1, 2]"),
        (b"x" * 300, "x" * 200),
        (error_body("m" * 600), "m" * 500),
    ],
)
def test_the_error_message_is_read_from_any_body_and_kept_short(raw: bytes, message: str) -> None:
    assert str(provider().error(401, raw, {})) == f"provider p: HTTP 401: {message}"


def test_retry_after_is_seconds_or_an_http_date() -> None:
    now = 1_700_000_000.0
    assert parse_retry_after("2.5") == 2.5
    assert parse_retry_after("-4") == 0.0
    assert parse_retry_after(email.utils.formatdate(now + 30, usegmt=True), now) == 30.0
    assert parse_retry_after(email.utils.formatdate(now - 30, usegmt=True), now) == 0.0
    assert parse_retry_after("soon") is None
    assert parse_retry_after(None) is None


# --- rate-limit headers -------------------------------------------------------------------


def test_rate_limit_headers_become_quotas() -> None:
    headers = {
        "X-RateLimit-Limit-Requests": "500",
        "x-ratelimit-remaining-requests": "499",
        "x-ratelimit-reset-requests": "120ms",
        "x-ratelimit-remaining-tokens": "1000",
        "x-ratelimit-reset-tokens": "6m0s",
    }
    assert read_quota(headers) == [
        Quota("requests", 499.0, pytest.approx(0.12), 500.0),  # type: ignore[arg-type]
        Quota("tokens", 1000.0, 360.0, None),
    ]
    assert provider().quota(headers) == read_quota(headers)


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"x-ratelimit-remaining-requests": "5"},
        {"x-ratelimit-remaining-requests": "lots", "x-ratelimit-reset-requests": "1s"},
        {"x-ratelimit-remaining-requests": "-1", "x-ratelimit-reset-requests": "1s"},
        {"x-ratelimit-remaining-tokens": "0", "x-ratelimit-reset-tokens": "soon"},
        {"x-ratelimit-remaining-tokens": "nan", "x-ratelimit-reset-tokens": "1s"},
    ],
)
def test_rate_limit_headers_that_cannot_be_read_give_no_quota(headers: dict[str, str]) -> None:
    assert read_quota(headers) == []


def test_an_unreadable_limit_leaves_the_quota_without_one() -> None:
    headers = {
        "x-ratelimit-limit-tokens": "many",
        "x-ratelimit-remaining-tokens": "10",
        "x-ratelimit-reset-tokens": "1s",
    }
    assert read_quota(headers) == [Quota("tokens", 10.0, 1.0, None)]


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("1s", 1.0),
        ("6m0s", 360.0),
        ("20ms", 0.02),
        ("1.5s", 1.5),
        ("1h2m3.5s", 3723.5),
        ("0s", 0.0),
        ("2", 2.0),
        (" 59.823s ", 59.823),
        ("", None),
        ("soon", None),
        ("5x", None),
        ("-1s", None),
        ("1s garbage", None),
    ],
)
def test_parse_duration(value: str, seconds: float | None) -> None:
    got = parse_duration(value)
    assert got == pytest.approx(seconds) if seconds is not None else got is None


# --- the registry -------------------------------------------------------------------------


def config_models(tp: Any) -> list[type[config.BaseProviderConfig]]:
    """The models inside ProviderConfig, through its Annotated and Union layers."""
    if isinstance(tp, type) and issubclass(tp, config.BaseProviderConfig):
        return [tp]
    return [m for arg in get_args(tp) for m in config_models(arg)]


def test_every_configurable_kind_has_a_provider() -> None:
    kinds = [m.model_fields["kind"].default for m in config_models(config.ProviderConfig)]
    assert sorted(kinds) == sorted(KINDS)
    for kind, entry in KINDS.items():
        assert entry.config.model_fields["kind"].default == kind


def test_make_embedder_joins_the_kind_s_protocol_to_the_guarded_client() -> None:
    cfg = config.parse(
        {"providers": {"a": {"base_url": "http://h/v1", "rpm": 5}}, "pipelines": []},
        Path("f.toml"),
    )
    embedder = make_embedder("a", cfg.providers["a"], "key")
    assert isinstance(embedder, GuardedClient) and isinstance(embedder.provider, OpenAIProvider)
    assert embedder.provider.url == "http://h/v1/embeddings"
    assert embedder.limiter.rpm == 5


# --- through the fake server --------------------------------------------------------------


async def test_the_api_key_never_reaches_an_error_message(fake: FakeEmbedderProcess) -> None:
    key = "test-key-123"
    body = {"error": {"message": f"Incorrect API key provided: {key}."}}
    fake.control(fail_next=[{"kind": "status", "status": 401, "body": body}])
    cfg = config.OpenAIProviderConfig(base_url=fake.url, timeout_s=5)
    embedder = make_embedder("fake", cfg, key)
    try:
        with pytest.raises(ProviderError) as caught:
            await embedder.embed(request())
        assert str(caught.value) == "provider fake: HTTP 401: Incorrect API key provided: ***."
        assert embedder.refused_error == str(caught.value) and embedder.ready_in_s() > 0
    finally:
        await embedder.close()
