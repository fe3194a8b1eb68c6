"""The one guarded HTTP client: any Provider behind the same limits, breaker and checks.

Touches no database. Errors leave as the classes in syncer.errors; the worker decides
what a failure means for a queue item. What is the same for every provider lives here:
the pooled session and its timeout, the limiter slot (settled with the provider's own
token count), the circuit breaker, the refusal window that pauses a provider which
refuses everything, the rule that a wrong dimension on consecutive answers is fatal, the
final shape and finiteness check of every answer, and keeping the API key out of messages.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import aiohttp
import numpy as np

from syncer.config import BaseProviderConfig
from syncer.errors import (
    CircuitOpenError,
    DimensionError,
    InputError,
    ProviderError,
    RateLimitedError,
    RetryableError,
)
from syncer.observe import Event, RateLimitWaited, TokensUsed
from syncer.providers.base import Answer, EmbedRequest, Provider, Vectors, dimension_error
from syncer.providers.limits import CircuitBreaker, ProviderLimiter

log = logging.getLogger("syncer.embed")

DIMENSION_ERRORS_FATAL = 2  # consecutive answers of the wrong dimension


class GuardedClient:
    """One pooled HTTP session per provider; concurrency bounded by its limiter."""

    def __init__(
        self, name: str, cfg: BaseProviderConfig, provider: Provider, api_key: str
    ) -> None:
        self.name = name
        self.cfg = cfg
        self.provider = provider
        self._api_key = api_key
        # Shared by every pipeline of this provider in this process.
        self.limiter = ProviderLimiter(name, cfg.max_concurrency, cfg.rpm, cfg.tpm)
        self.breaker = CircuitBreaker(name, cfg.breaker_failures, cfg.breaker_reset_s)
        self._session: aiohttp.ClientSession | None = None
        # A provider that refuses every request (bad key, unknown model) pauses all of its
        # pipelines until then; the error says why.
        self.refused_until = 0.0
        self.refused_error: str | None = None
        self._dimension_errors = 0
        self._last_error = ""
        self.emit: Callable[[Event], None] = _nobody  # the process's bus, once it runs

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(
                limit=self.cfg.max_concurrency * 2, ttl_dns_cache=300, enable_cleanup_closed=True
            )
            headers = {"User-Agent": "syncer", **self.provider.session_headers(self._api_key)}
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

    def _scrub_body(self, raw: bytes) -> bytes:
        if self._api_key and len(self._api_key) >= 4:
            return raw.replace(self._api_key.encode(), b"***")
        return raw

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
        asked = time.perf_counter()
        async with self.limiter.slot(req.tokens) as reservation:
            self.emit(RateLimitWaited(self.name, time.perf_counter() - asked))
            try:
                answer = await self._post_with_fallback(req)
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
            if answer.used_tokens is not None:
                reservation.settle(answer.used_tokens)
                self.emit(TokensUsed(self.name, answer.used_tokens))
            self._dimension_errors = 0
            self.refused_error = None
            self.limiter.on_success()
            self.breaker.record_success()
            return answer.vectors

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

    async def _post_with_fallback(self, req: EmbedRequest) -> Answer:
        try:
            return await self._post(req)
        except InputError as err:
            if self.provider.fall_back(err):
                return await self._post(req)
            raise

    async def _post(self, req: EmbedRequest) -> Answer:
        http = self.provider.request(req)
        try:
            async with asyncio.timeout(self.cfg.timeout_s):
                async with self._client().request(
                    http.method, http.url, data=http.body, headers=http.headers
                ) as resp:
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
        self.limiter.on_quota(self.provider.quota(headers))
        if status != 200:
            raise self.provider.error(status, self._scrub_body(raw), headers)
        answer = self.provider.answer(raw, req)
        check_vectors(self.name, answer.vectors, req)
        return answer


def _nobody(_event: Event) -> None:
    pass


def check_vectors(provider: str, vectors: Vectors, req: EmbedRequest) -> None:
    """What no provider may get past: one finite vector of the configured size per input."""
    n, dim = len(req.texts), req.dimensions
    if vectors.ndim != 2 or vectors.shape[0] != n:
        raise RetryableError(f"provider {provider}: {vectors.shape} vectors for {n} inputs")
    if vectors.shape[1] != dim:
        raise dimension_error(provider, vectors.shape[1], dim)
    if not np.isfinite(vectors).all():
        raise RetryableError(f"provider {provider}: answer holds NaN or infinite values")
