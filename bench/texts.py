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
