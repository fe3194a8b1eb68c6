"""A request's worth of texts, as the dispatcher packs it and the embedding stage sends it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from syncer.providers.tokens import estimate_tokens


@dataclass(frozen=True)
class EmbedJob:
    keys: list[str]
    texts: list[str]
    hashes: list[bytes]
    ids: list[list[int]]  # the queue items behind each key (a key may repeat in a claim)
    tokens: int  # estimated
    suspect: bool = False  # one input traced as failing alone: sent alone, not retried in process

    def part(self, idx: Sequence[int]) -> EmbedJob:
        pick = list(idx)
        return EmbedJob(
            [self.keys[i] for i in pick],
            [self.texts[i] for i in pick],
            [self.hashes[i] for i in pick],
            [self.ids[i] for i in pick],
            sum(estimate_tokens(self.texts[i]) for i in pick),
        )

    def all_ids(self) -> list[int]:
        return [i for ids in self.ids for i in ids]
