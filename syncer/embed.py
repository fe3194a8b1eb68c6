"""Embedding providers: OpenAI-compatible HTTP client, answer validation, retries.

Touches no database. Errors leave as the classes in syncer.errors; the worker decides
what a failure means for a queue item.
"""

from __future__ import annotations

import asyncio
import binascii
import email.utils
import random
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp
import numpy as np
import orjson

from syncer.config import ProviderConfig
from syncer.errors import InputError, ProviderError, RateLimitedError, RetryableError

Vectors = np.ndarray[Any, np.dtype[np.float32]]


@dataclass(frozen=True)
class EmbedRequest:
    texts: Sequence[str]
    model: str
    dimensions: int
    send_dimensions: bool = True


class Embedder(Protocol):
    async def embed(self, req: EmbedRequest) -> Vectors: ...

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
        self._sem = asyncio.Semaphore(cfg.max_concurrency)
        self._session: aiohttp.ClientSession | None = None
        self._base64 = True
        # A 429 pauses every sender to this provider until then (monotonic seconds).
        self.paused_until = 0.0

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

    async def embed(self, req: EmbedRequest) -> Vectors:
        wait_s = self.paused_until - time.monotonic()
        if wait_s > 0:
            await asyncio.sleep(wait_s)
        async with self._sem:
            try:
                return await self._post(req)
            except InputError as err:
                if self._base64 and "encoding_format" in str(err):
                    self._base64 = False  # a provider without base64 support: use floats
                    return await self._post(req)
                raise

    async def _post(self, req: EmbedRequest) -> Vectors:
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
        if status != 200:
            raise self._status_error(status, raw, headers.get("Retry-After"))
        return self._decode(raw, req)

    def _status_error(self, status: int, raw: bytes, retry_after: str | None) -> Exception:
        message = self._error_message(raw)
        what = f"provider {self.name}: HTTP {status}: {message}"
        if status == 429:
            delay = parse_retry_after(retry_after)
            if delay:
                self.paused_until = max(self.paused_until, time.monotonic() + delay)
            return RateLimitedError(what, delay)
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

    def _decode(self, raw: bytes, req: EmbedRequest) -> Vectors:
        try:
            doc = orjson.loads(raw)
            data = doc["data"]
            if not isinstance(data, list):
                raise TypeError("data is not a list")
        except (orjson.JSONDecodeError, KeyError, TypeError) as err:
            raise RetryableError(f"provider {self.name}: malformed answer ({err})") from None
        return decode_embeddings(self.name, data, len(req.texts), req.dimensions)


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
            raise ProviderError(
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


def backoff_s(attempt: int, base_s: float, cap_s: float, err: Exception | None = None) -> float:
    """Full-jitter exponential backoff; a Retry-After is a floor, never shortened."""
    delay = random.uniform(0, min(cap_s, base_s * (2 ** max(0, attempt - 1))))
    retry_after = getattr(err, "retry_after_s", None)
    if retry_after:
        delay = max(delay, float(retry_after))
    return delay
