"""What a pipeline holds: the items claimed and not finished, and which text each running
embedding serves, so that an item for the same text joins it instead of paying again."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable, Sequence

from syncer.queue import Item

TextId = tuple[str, bytes]  # (key, hash of its text)
MAX_SUSPECTS = 10_000
MAX_WRITTEN = 10_000


class InFlight:
    def __init__(self, on_change: Callable[[int], None]) -> None:
        self.attempts: dict[int, int] = {}  # item id -> its attempts, counted at claim
        self.queued_at: dict[int, float] = {}  # item id -> when it was queued (monotonic)
        self.freed = asyncio.Event()  # set whenever items finish
        # Text being embedded -> the items its vector completes. The list is the identity of
        # one embedding: an item joins by appending itself; a later embedding of the same
        # text replaces the list, and the older one must then not remove the newer.
        self._serving: dict[TextId, list[int]] = {}
        self._on_change = on_change
        # Texts a split traced as failing where their neighbours did not (see syncer.retry):
        # sent alone from then on. Forgotten in bulk past MAX_SUSPECTS; they are found again.
        self.suspects: set[TextId] = set()
        # Texts this process wrote lately: an item whose fetch ran while that write
        # committed saw neither the vector nor the running embedding, and would pay again.
        self._written: dict[TextId, None] = {}

    def __len__(self) -> int:
        return len(self.attempts)

    def ids(self) -> list[int]:
        return sorted(self.attempts)

    def add(self, items: Iterable[Item]) -> None:
        self.attempts.update((i.id, i.attempts) for i in items)
        now = time.monotonic()
        self.queued_at.update((i.id, now - i.age_s) for i in items)
        self._on_change(len(self.attempts))

    def finish(self, ids: Sequence[int]) -> None:
        for i in ids:
            self.attempts.pop(i, None)
            self.queued_at.pop(i, None)
        self._on_change(len(self.attempts))
        self.freed.set()

    def ages_s(self, ids: Sequence[int]) -> tuple[float, ...]:
        now = time.monotonic()
        return tuple(now - self.queued_at[i] for i in ids if i in self.queued_at)

    async def drained(self) -> None:
        while self.attempts:
            self.freed.clear()
            await self.freed.wait()

    def suspect(self, text: TextId, failed: bool) -> None:
        if not failed:
            self.suspects.discard(text)
            return
        if len(self.suspects) >= MAX_SUSPECTS:
            self.suspects.clear()
        self.suspects.add(text)

    def wrote(self, texts: Iterable[TextId]) -> None:
        for text in texts:
            self._written.pop(text, None)
            self._written[text] = None
        while len(self._written) > MAX_WRITTEN:
            del self._written[next(iter(self._written))]

    def written(self, text: TextId) -> bool:
        """This very text's vector was committed by this process (the row may have changed
        since: then a newer item follows, as for an unchanged text)."""
        return text in self._written

    # --- joining a running embedding ----------------------------------------------------

    def join(self, text: TextId, ids: list[int]) -> bool:
        """If this very text is being embedded (or its vector written), its result serves
        `ids` too: True. Otherwise the caller embeds it."""
        serving = self._serving.get(text)
        if serving is None:
            return False
        serving += ids
        return True

    def embedding(self, text: TextId, ids: list[int]) -> None:
        """`ids` are to be embedded for this text: later items for it join them."""
        self._serving[text] = ids

    def hand_over(self, text: TextId, ids: list[int]) -> list[int] | None:
        """The vector for `ids` is on its way to be written: items arriving until the write
        commits join a new list (returned), finished right after that write."""
        if self._serving.get(text) is not ids:
            return None
        late: list[int] = []
        self._serving[text] = late
        return late

    def forget(self, text: TextId, ids: list[int]) -> None:
        """Stop joining items to `ids` (unless a newer embedding of the text took over)."""
        if self._serving.get(text) is ids:
            del self._serving[text]
