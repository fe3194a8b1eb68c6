"""The two seams of the provider layer, and the types that cross them.

`Embedder` is what the worker calls: one `embed()` per request, plus when the provider
takes requests again. `Provider` is one protocol kind (OpenAI-compatible, ...): pure
functions from a request to HTTP and from an HTTP answer to vectors or an error class,
with no I/O, so that each is unit-tested without a server. `GuardedClient`
(syncer.providers.client) joins them: one HTTP session, the limiter, the breaker, the
refusal window and the dimension check, the same for every kind.
"""

from __future__ import annotations

import email.utils
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from syncer.errors import DimensionError, InputError, SyncerError
from syncer.providers.limits import Quota

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


@dataclass(frozen=True, slots=True)
class HTTPRequest:
    method: str
    url: str
    body: bytes
    headers: Mapping[str, str] | None = None  # beyond the session's


@dataclass(frozen=True, slots=True)
class Answer:
    vectors: Vectors  # one row per input, in input order
    used_tokens: int | None  # what the provider says it counted, if it says


class Provider(Protocol):
    """One protocol kind. Errors leave as syncer.errors classes, messages naming the provider.

    Bodies handed to `error()` are already scrubbed of the API key.
    """

    def session_headers(self, api_key: str) -> dict[str, str]:
        """Headers for every request of the session: content type and authentication."""
        ...

    def request(self, req: EmbedRequest) -> HTTPRequest: ...

    def answer(self, raw: bytes, req: EmbedRequest) -> Answer:
        """Decode a 200 answer; RetryableError when it is malformed."""
        ...

    def error(self, status: int, raw: bytes, headers: Mapping[str, str]) -> SyncerError:
        """The error class of a non-200 answer."""
        ...

    def quota(self, headers: Mapping[str, str]) -> Sequence[Quota]:
        """What the answer's rate-limit headers say is left (none: nothing to go by)."""
        ...

    def fall_back(self, err: InputError) -> bool:
        """Whether a refusal showed a feature to stop using, so the request may go again."""
        ...


def dimension_error(provider: str, got: int, dim: int) -> DimensionError:
    return DimensionError(f"provider {provider}: answered {got} dimensions, the config says {dim}")


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
