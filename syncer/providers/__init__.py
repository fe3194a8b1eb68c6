"""Embedding providers: one module per protocol kind behind one guarded client.

A new kind is its config model in syncer.config (tagged with its `kind`), a module here
with its `Provider`, one line in KINDS, and its protocol in the fake server.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from syncer.config import BaseProviderConfig, OpenAIProviderConfig, ProviderConfig
from syncer.providers.base import Embedder, EmbedRequest, Provider, Vectors
from syncer.providers.client import GuardedClient
from syncer.providers.openai import OpenAIProvider

__all__ = ["KINDS", "EmbedRequest", "Embedder", "GuardedClient", "Kind", "Vectors", "make_embedder"]


@dataclass(frozen=True)
class Kind:
    config: type[BaseProviderConfig]
    provider: Callable[[str, Any], Provider]  # (provider name, its config of `config`'s type)


KINDS: dict[str, Kind] = {
    "openai": Kind(OpenAIProviderConfig, OpenAIProvider),
}


def make_embedder(name: str, cfg: ProviderConfig, api_key: str) -> GuardedClient:
    kind = KINDS[cfg.kind]
    if not isinstance(cfg, kind.config):
        raise TypeError(f"provider {name}: a {type(cfg).__name__} is no {kind.config.__name__}")
    return GuardedClient(name, cfg, kind.provider(name, cfg), api_key)
