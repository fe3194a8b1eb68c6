"""Deterministic texts of varied words, 500–1,500 characters each.

A seeded vocabulary of pseudo-words with skewed (Zipf-like) frequencies, as in prose; the
same (seed, n) gives the same texts in every run, and a new seed gives texts the fake
server has never seen (so its vector cache never flatters a run).
"""

from __future__ import annotations

import random

import numpy as np

MIN_CHARS = 500
MAX_CHARS = 1500
_VOCABULARY_SIZE = 20_000
_SYLLABLES = [c + v for c in "bcdfghjklmnprstvwz" for v in ("a", "e", "i", "o", "u", "ai", "ou")]
_WORDS_PER_TEXT = 320  # ~7 characters a word: enough for MAX_CHARS nearly always
_CHUNK = 5_000


def vocabulary(seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choices(_SYLLABLES, k=rng.randint(1, 4))) for _ in range(_VOCABULARY_SIZE)]


_WORDS = np.array(vocabulary(), dtype=object)
_FREQ = 1.0 / np.arange(1, _VOCABULARY_SIZE + 1)
_FREQ /= _FREQ.sum()


def texts(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(MIN_CHARS, MAX_CHARS + 1, size=n)
    out: list[str] = []
    for start in range(0, n, _CHUNK):
        size = min(_CHUNK, n - start)
        picks = _WORDS[rng.choice(_VOCABULARY_SIZE, size=(size, _WORDS_PER_TEXT), p=_FREQ)]
        out += [_cut(" ".join(words), lengths[start + i]) for i, words in enumerate(picks)]
    return out


def _cut(text: str, length: int) -> str:
    while len(text) < length:  # rare: a text of short words
        text += " " + text
    return text[:length].rstrip() + "."


# Documents: prose in paragraphs, with markdown headings and lists, as a long text in a
# knowledge base or a docs site looks (the chunking scenarios' corpus).
DOCUMENT_CHARS = 20_000
_CDF = np.cumsum(_FREQ)


def documents(n: int, seed: int, chars: int = DOCUMENT_CHARS) -> list[str]:
    """n documents of about `chars` characters each (the last paragraph ends past it)."""
    rng = np.random.default_rng(seed)
    return [document(rng, chars) for _ in range(n)]


def document(rng: np.random.Generator, chars: int) -> str:
    words = _Words(rng, chars)
    blocks = [words.heading(1)]
    size = len(blocks[0])
    while size < chars:
        roll = words.rng.random()
        if roll < 0.12:
            block = words.heading(2)
        elif roll < 0.22:
            items = int(rng.integers(3, 7))
            block = "\n".join(f"- {words.sentence(4, 14)}" for _ in range(items))
        else:
            block = words.paragraph()
        blocks.append(block)
        size += len(block) + 2
    return "\n\n".join(blocks) + "\n"


class _Words:
    """Zipf-distributed words drawn in one batch per document (a draw per word is slow)."""

    def __init__(self, rng: np.random.Generator, chars: int) -> None:
        self.rng = rng
        self._words = list(_WORDS[np.searchsorted(_CDF, rng.random(chars // 4 + 100))])
        self._next = 0

    def take(self, n: int) -> list[str]:
        if self._next + n > len(self._words):
            self._words += list(_WORDS[np.searchsorted(_CDF, self.rng.random(n + 1000))])
        self._next += n
        return self._words[self._next - n : self._next]  # type: ignore[no-any-return]

    def heading(self, level: int) -> str:
        return "#" * level + " " + self.sentence(2, 6).rstrip(".")

    def paragraph(self) -> str:
        return " ".join(self.sentence(6, 28) for _ in range(int(self.rng.integers(2, 8))))

    def sentence(self, shortest: int, longest: int) -> str:
        words = self.take(int(self.rng.integers(shortest, longest)))
        if len(words) > 8 and self.rng.random() < 0.3:  # a comma now and then
            words[len(words) // 2] += ","
        text = " ".join(words)
        return text[0].upper() + text[1:] + "."
