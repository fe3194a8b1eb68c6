"""The OpenAI-compatible embeddings protocol: POST {base_url}/embeddings.

Vectors are asked for as base64 (numpy decodes 1536 floats from ~8 kB instead of parsing
~30 kB of JSON), and as floats from a server that refuses `encoding_format`. A 400 that
names `input[3]` blames that one input; `usage.prompt_tokens` settles the TPM estimate;
`x-ratelimit-*` headers and Retry-After slow the sender down.
"""

from __future__ import annotations

import binascii
import contextlib
import math
import re
from collections.abc import Mapping
from typing import Any

import numpy as np
import orjson

from syncer.config import OpenAIProviderConfig
from syncer.errors import InputError, ProviderError, RateLimitedError, RetryableError, SyncerError
from syncer.providers.base import (
    Answer,
    EmbedRequest,
    HTTPRequest,
    Vectors,
    dimension_error,
    parse_retry_after,
)
from syncer.providers.limits import Quota

MAX_MESSAGE_CHARS = 500  # of a provider's error message, in logs and dead letters
_INDEX_RE = re.compile(r"input(?:\[|\s+at\s+index\s+|\s+)(\d+)", re.IGNORECASE)


class OpenAIProvider:
    def __init__(self, name: str, cfg: OpenAIProviderConfig) -> None:
        self.name = name
        self.url = f"{cfg.base_url}/embeddings"
        self.base64 = True  # until the server refuses it

    def session_headers(self, api_key: str) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        return headers

    def request(self, req: EmbedRequest) -> HTTPRequest:
        body: dict[str, Any] = {"model": req.model, "input": list(req.texts)}
        if req.send_dimensions:
            body["dimensions"] = req.dimensions
        if self.base64:
            body["encoding_format"] = "base64"
        return HTTPRequest("POST", self.url, orjson.dumps(body))

    def answer(self, raw: bytes, req: EmbedRequest) -> Answer:
        try:
            doc = orjson.loads(raw)
            data = doc["data"]
            if not isinstance(data, list):
                raise TypeError("data is not a list")
        except (orjson.JSONDecodeError, KeyError, TypeError) as err:
            raise RetryableError(f"provider {self.name}: malformed answer ({err})") from None
        vectors = decode_embeddings(self.name, data, len(req.texts), req.dimensions)
        return Answer(vectors, _usage_tokens(doc))

    def error(self, status: int, raw: bytes, headers: Mapping[str, str]) -> SyncerError:
        message = _error_message(raw)
        what = f"provider {self.name}: HTTP {status}: {message}"
        if status == 429:
            return RateLimitedError(what, parse_retry_after(headers.get("Retry-After")))
        if status >= 500 or status in (408, 409):
            return RetryableError(what, parse_retry_after(headers.get("Retry-After")))
        if status in (400, 413, 422):
            m = _INDEX_RE.search(message)
            return InputError(what, int(m.group(1)) if m else None)
        return ProviderError(what)

    def quota(self, headers: Mapping[str, str]) -> list[Quota]:
        return read_quota(headers)

    def fall_back(self, err: InputError) -> bool:
        if self.base64 and "encoding_format" in str(err):
            self.base64 = False  # a server without base64 support: use floats
            return True
        return False


def _error_message(raw: bytes) -> str:
    try:
        doc = orjson.loads(raw)
        msg = doc["error"]["message"] if isinstance(doc.get("error"), dict) else doc.get("error")
        return str(msg)[:MAX_MESSAGE_CHARS]
    except (orjson.JSONDecodeError, AttributeError, KeyError, TypeError):
        return raw[:200].decode("utf-8", "replace")


def _usage_tokens(doc: Any) -> int | None:
    usage = doc.get("usage") if isinstance(doc, dict) else None
    n = usage.get("prompt_tokens") if isinstance(usage, dict) else None
    return n if isinstance(n, int) and n >= 0 else None


def decode_embeddings(provider: str, data: list[Any], n: int, dim: int) -> Vectors:
    """Validate an answer's `data` list: one vector of `dim` per input, placed by its index."""
    if len(data) != n:
        raise RetryableError(f"provider {provider}: {len(data)} embeddings for {n} inputs")
    out = np.empty((n, dim), dtype=np.float32)
    seen = np.zeros(n, dtype=bool)
    for item in data:
        try:
            idx = int(item.get("index", -1))
            emb = item["embedding"]
        except (AttributeError, KeyError, TypeError, ValueError):
            raise RetryableError(f"provider {provider}: malformed embedding item") from None
        if not 0 <= idx < n or seen[idx]:
            raise RetryableError(f"provider {provider}: bad or repeated index {idx}")
        seen[idx] = True
        vec = _vector(provider, emb)
        if vec.shape[0] != dim:
            raise dimension_error(provider, vec.shape[0], dim)
        out[idx] = vec
    return out


def _vector(provider: str, emb: Any) -> np.ndarray[Any, np.dtype[np.float32]]:
    if isinstance(emb, str):
        try:
            # strict_mode rejects non-alphabet bytes in C: much cheaper than validate=True
            buf = binascii.a2b_base64(emb, strict_mode=True)
        except (binascii.Error, ValueError):
            raise RetryableError(f"provider {provider}: embedding is not valid base64") from None
        if len(buf) % 4:
            raise RetryableError(f"provider {provider}: base64 embedding has {len(buf)} bytes")
        return np.frombuffer(buf, dtype="<f4")
    if isinstance(emb, list):
        try:
            return np.asarray(emb, dtype=np.float32)
        except (TypeError, ValueError):
            raise RetryableError(f"provider {provider}: embedding holds non-numbers") from None
    raise RetryableError(f"provider {provider}: embedding of type {type(emb).__name__}")


# --- rate-limit headers -------------------------------------------------------------------


def read_quota(headers: Mapping[str, str]) -> list[Quota]:
    """x-ratelimit-{remaining,reset,limit}-{requests,tokens}; a pair that cannot be read is left out."""
    lower = {k.lower(): v for k, v in headers.items()}
    out = []
    for kind in ("requests", "tokens"):
        remaining = _number(lower.get(f"x-ratelimit-remaining-{kind}"))
        reset_s = parse_duration(lower.get(f"x-ratelimit-reset-{kind}") or "")
        if remaining is not None and reset_s is not None:
            limit = _number(lower.get(f"x-ratelimit-limit-{kind}"))
            out.append(Quota(kind, remaining, reset_s, limit))
    return out


def _number(value: str | None) -> float | None:
    with contextlib.suppress(ValueError):
        n = float(value or "")
        return n if math.isfinite(n) and n >= 0 else None
    return None


_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_UNIT_S = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1, "m": 60, "h": 3600}


def parse_duration(value: str) -> float | None:
    """Seconds from a rate-limit reset header: "1s", "6m0s", "20ms", "1.5s", or "2" (seconds)."""
    value = value.strip()
    with contextlib.suppress(ValueError):
        seconds = float(value)
        return seconds if seconds >= 0 and math.isfinite(seconds) else None
    parts = list(_DURATION_PART.finditer(value))
    if not parts or "".join(p.group(0) for p in parts) != value:
        return None
    return sum(float(p.group(1)) * _UNIT_S[p.group(2)] for p in parts)
