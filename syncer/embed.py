"""Embedding providers: OpenAI-compatible HTTP client, answer validation, retries.

Touches no database. Errors leave as the classes in syncer.errors; the worker decides
what a failure means for a queue item.
"""

from __future__ import annotations

import asyncio
import binascii
import email.utils
import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp
import numpy as np
import orjson

from syncer.config import ProviderConfig
from syncer.errors import (
    CircuitOpenError,
    DimensionError,
    InputError,
    ProviderError,
    RateLimitedError,
    RetryableError,
)
from syncer.limits import CircuitBreaker, ProviderLimiter

log = logging.getLogger("syncer.embed")

DIMENSION_ERRORS_FATAL = 2  # consecutive answers of the wrong dimension

Vectors = np.ndarray[Any, np.dtype[np.float32]]


@dataclass(frozen=True)
class EmbedRequest:
    texts: Sequence[str]
    model: str
    dimensions: int
    send_dimensions: bool = True
    tokens: int = 0  # estimated, for the TPM limit
    # One input already traced as failing where its neighbours did not: its failures say
    # nothing about the provider, so the breaker does not count them.
    suspect: bool = False


class Embedder(Protocol):
    async def embed(self, req: EmbedRequest) -> Vectors: ...

    def ready_in_s(self) -> float: ...

    @property
    def refused_error(self) -> str | None: ...

    async def close(self) -> None: ...


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header: delta seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


_INDEX_RE = re.compile(r"input(?:\[|\s+at\s+index\s+|\s+)(\d+)", re.IGNORECASE)


class OpenAIEmbedder:
    """One pooled HTTP session per provider; concurrency bounded by a semaphore."""

    def __init__(self, name: str, cfg: ProviderConfig, api_key: str) -> None:
        self.name = name
        self.cfg = cfg
        self._api_key = api_key
        self._url = f"{cfg.base_url}/embeddings"
        # Shared by every pipeline of this provider in this process.
        self.limiter = ProviderLimiter(name, cfg.max_concurrency, cfg.rpm, cfg.tpm)
        self.breaker = CircuitBreaker(name, cfg.breaker_failures, cfg.breaker_reset_s)
        self._session: aiohttp.ClientSession | None = None
        self._base64 = True
        # A provider that refuses every request (bad key, unknown model) pauses all of its
        # pipelines until then; the error says why.
        self.refused_until = 0.0
        self.refused_error: str | None = None
        self._dimension_errors = 0
        self._last_error = ""

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(
                limit=self.cfg.max_concurrency * 2, ttl_dns_cache=300, enable_cleanup_closed=True
            )
            headers = {"Content-Type": "application/json", "User-Agent": "syncer"}
            if self._api_key:
                headers["Authorization"] = f"Bearer {self._api_key}"
            self._session = aiohttp.ClientSession(connector=connector, headers=headers)
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _scrub(self, text: str) -> str:
        if self._api_key and len(self._api_key) >= 4:
            text = text.replace(self._api_key, "***")
        return text[:500]

    def ready_in_s(self) -> float:
        """Seconds until this provider takes requests again (breaker open, 429 pause)."""
        now = time.monotonic()
        wait_s = max(self.limiter.paused_until, self.refused_until) - now
        if self.breaker.state == "open":
            wait_s = max(wait_s, self.breaker.probe_at - now)
        return max(0.0, wait_s)

    async def embed(self, req: EmbedRequest) -> Vectors:
        if not self.breaker.allow():
            wait_s = max(0.05, self.breaker.probe_at - time.monotonic())
            raise CircuitOpenError(
                f"provider {self.name}: circuit open after: {self._last_error}", wait_s
            )
        async with self.limiter.slot(req.tokens) as reservation:
            try:
                vectors, used_tokens = await self._post_with_fallback(req)
            except RateLimitedError as err:
                self.limiter.on_rate_limited(err.retry_after_s)
                raise
            except DimensionError as err:
                # One odd answer is retried; the same on consecutive answers means the
                # model and the config disagree: no retry can fix that.
                self._dimension_errors += 1
                if self._dimension_errors < DIMENSION_ERRORS_FATAL:
                    self._failed(err, req)
                    raise
                fatal = ProviderError(str(err))
                self._refuse(fatal)
                raise fatal from None
            except RetryableError as err:
                self._failed(err, req)
                raise
            except ProviderError as err:
                self._refuse(err)
                raise
            except InputError:
                self.breaker.record_success()  # the provider is up; the input is bad
                raise
            if used_tokens is not None:
                reservation.settle(used_tokens)
            self._dimension_errors = 0
            self.refused_error = None
            self.limiter.on_success()
            self.breaker.record_success()
            return vectors

    def _failed(self, err: Exception, req: EmbedRequest) -> None:
        self._last_error = str(err)
        if not req.suspect:
            self.breaker.record_failure()

    def _refuse(self, err: ProviderError) -> None:
        if self.refused_until < time.monotonic():
            log.error(
                "provider refuses requests; its pipelines pause",
                extra={
                    "provider": self.name,
                    "error": str(err),
                    "pause_s": self.cfg.breaker_reset_s,
                },
            )
        self.refused_until = time.monotonic() + self.cfg.breaker_reset_s
        self.refused_error = str(err)

    async def _post_with_fallback(self, req: EmbedRequest) -> tuple[Vectors, int | None]:
        try:
            return await self._post(req)
        except InputError as err:
            if self._base64 and "encoding_format" in str(err):
                self._base64 = False  # a provider without base64 support: use floats
                return await self._post(req)
            raise

    async def _post(self, req: EmbedRequest) -> tuple[Vectors, int | None]:
        """The vectors, and the tokens the provider says it counted (if it says)."""
        body: dict[str, Any] = {"model": req.model, "input": list(req.texts)}
        if req.send_dimensions:
            body["dimensions"] = req.dimensions
        if self._base64:
            body["encoding_format"] = "base64"
        try:
            async with asyncio.timeout(self.cfg.timeout_s):
                async with self._client().post(self._url, data=orjson.dumps(body)) as resp:
                    raw = await resp.read()
                    status, headers = resp.status, resp.headers
        except TimeoutError:
            raise RetryableError(
                f"provider {self.name}: no answer within {self.cfg.timeout_s}s"
            ) from None
        except (aiohttp.ClientError, OSError) as err:
            raise RetryableError(
                f"provider {self.name}: {type(err).__name__}: {self._scrub(str(err))}"
            ) from None
        self.limiter.on_headers(headers)
        if status != 200:
            raise self._status_error(status, raw, headers.get("Retry-After"))
        return self._decode(raw, req)

    def _status_error(self, status: int, raw: bytes, retry_after: str | None) -> Exception:
        message = self._error_message(raw)
        what = f"provider {self.name}: HTTP {status}: {message}"
        if status == 429:
            return RateLimitedError(what, parse_retry_after(retry_after))
        if status >= 500 or status in (408, 409):
            return RetryableError(what, parse_retry_after(retry_after))
        if status in (400, 413, 422):
            m = _INDEX_RE.search(message)
            return InputError(what, int(m.group(1)) if m else None)
        return ProviderError(what)

    def _error_message(self, raw: bytes) -> str:
        try:
            doc = orjson.loads(raw)
            msg = (
                doc["error"]["message"] if isinstance(doc.get("error"), dict) else doc.get("error")
            )
            return self._scrub(str(msg))
        except (orjson.JSONDecodeError, AttributeError, KeyError, TypeError):
            return self._scrub(raw[:200].decode("utf-8", "replace"))

    def _decode(self, raw: bytes, req: EmbedRequest) -> tuple[Vectors, int | None]:
        try:
            doc = orjson.loads(raw)
            data = doc["data"]
            if not isinstance(data, list):
                raise TypeError("data is not a list")
        except (orjson.JSONDecodeError, KeyError, TypeError) as err:
            raise RetryableError(f"provider {self.name}: malformed answer ({err})") from None
        vectors = decode_embeddings(self.name, data, len(req.texts), req.dimensions)
        return vectors, _usage_tokens(doc)


def _usage_tokens(doc: Any) -> int | None:
    usage = doc.get("usage") if isinstance(doc, dict) else None
    n = usage.get("prompt_tokens") if isinstance(usage, dict) else None
    return n if isinstance(n, int) and n >= 0 else None


def decode_embeddings(provider: str, data: list[Any], n: int, dim: int) -> Vectors:
    """Validate an answer's `data` list: one finite vector of `dim` per input, by index."""
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
            raise DimensionError(
                f"provider {provider}: answered {vec.shape[0]} dimensions, the config says {dim}"
            )
        out[idx] = vec
    if not np.isfinite(out).all():
        raise RetryableError(f"provider {provider}: answer holds NaN or infinite values")
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
