"""Token estimates and request packing: how many tokens a text costs, and which inputs
go together in one request.

Pure functions: no database, no HTTP, no clock. The worker truncates and packs with
these; the limiter counts the estimates against TPM until the provider's own count
replaces them.
"""

from __future__ import annotations

import math
import re
import string
from collections.abc import Sequence


def _all_but(first: int, last: int) -> bytes:
    return bytes(b for b in range(256) if not first <= b <= last)


_ALL_BUT_3_BYTE_LEADS = _all_but(0xE0, 0xEF)  # U+0800..U+FFFF
_ALL_BUT_4_BYTE_LEADS = _all_but(0xF0, 0xF7)  # U+10000 and above
# U+3000..U+D7FF: CJK symbols, kana, ideographs, hangul; cl100k/o200k take ~1 token a char.
_ALL_BUT_CJK_LEADS = _all_but(0xE3, 0xED)
# Pieces that are at least one token each: words, up to 3 digits, 2 punctuation marks, line
# breaks. This catches what bytes/3 misses, e.g. "a b c d" or one word per line.
_PIECE = re.compile(r"[^\W\d_]+|\d{1,3}|[^\w\s]{1,2}|[\r\n]+")
_SPACE = re.compile(r"\s")
_LETTERS_AND_BLANKS = (string.ascii_letters + " \t\f\v").encode("ascii")


def estimate_tokens(text: str) -> int:
    """An offline estimate of cl100k/o200k tokens that errs high.

    Cost by character: UTF-8 bytes / 3 below U+0800 (ASCII, Latin, Greek, Cyrillic, Arabic,
    Hebrew); 1.5 in U+3000..U+D7FF (CJK, kana, hangul); one per UTF-8 byte for any other
    character (Indic and South-East Asian scripts, emoji, symbols), which is a byte-level
    BPE's hard upper bound. The result is at least the number of words, 3-digit groups,
    punctuation pairs and line breaks, which covers "a b c" and one word per line.

    How far off (real / estimate): English prose (~4 chars a token) 0.7-0.8; Cyrillic or
    Greek ~0.6; Chinese, Japanese, Korean 0.5-0.9 on cl100k, less on o200k; Indic, Thai,
    emoji 0.3-1. Known under-estimates, up to 2x but only for those characters: rare CJK
    characters that cl100k splits into bytes, and runs of unusual ASCII symbols.
    """
    if not text:
        return 0
    cost = math.ceil(_byte_cost(text))
    return max(cost, _pieces(text, cost))


def _byte_cost(text: str) -> float:
    if text.isascii():
        return len(text) / 3
    raw = text.encode("utf-8", "surrogatepass")  # never raise on a stray surrogate
    # Counting UTF-8 lead bytes is ~20x faster than a regex over the characters.
    n3 = len(raw.translate(None, _ALL_BUT_3_BYTE_LEADS))
    n4 = len(raw.translate(None, _ALL_BUT_4_BYTE_LEADS))
    n_cjk = len(raw.translate(None, _ALL_BUT_CJK_LEADS))
    wide_bytes = 3 * n3 + 4 * n4
    return (len(raw) - wide_bytes) / 3 + 1.5 * n_cjk + (wide_bytes - 3 * n_cjk)


def _pieces(text: str, at_most_needed: int) -> int:
    """The number of _PIECE matches, or 0 when a cheap bound shows it cannot matter."""
    if len(text) <= at_most_needed:  # a piece is at least one character (CJK text)
        return 0
    if text.isascii():
        # Letter runs <= chunks + others; digit groups, punctuation pairs and line breaks
        # <= others. The regex costs ~100 ns a character; this bound ~10 ns.
        others = len(text.encode("ascii").translate(None, _LETTERS_AND_BLANKS))
        # Words <= blanks + 1; counting is 4x cheaper than text.split().
        words = text.count(" ") + text.count("\t") + text.count("\f") + text.count("\v") + 1
        if words + 2 * others <= at_most_needed:
            return 0
    return len(_PIECE.findall(text))


def truncate_to_tokens(text: str, max_tokens: int) -> str:
    """The longest prefix whose estimate fits, cut at whitespace when one is near the end."""
    if estimate_tokens(text) <= max_tokens:
        return text
    if max_tokens <= 0:
        return ""
    # Every character costs at least 1/3 token, so the cut is within 3 * max_tokens chars.
    lo, hi = 0, min(len(text), 3 * max_tokens)
    while lo < hi:  # invariant: text[:lo] fits
        mid = (lo + hi + 1) // 2
        if estimate_tokens(text[:mid]) <= max_tokens:
            lo = mid
        else:
            hi = mid - 1
    # Prefer not to cut a word in half, unless that throws away a long stretch.
    spaces = [m.start() for m in _SPACE.finditer(text, max(1, lo - 200), lo + 1)]
    kept = text[: spaces[-1]].rstrip() if spaces else ""
    return kept or text[:lo]


def pack_requests(token_counts: Sequence[int], max_inputs: int, max_tokens: int) -> list[list[int]]:
    """Split input indices, in order, into requests of <= max_inputs and <= max_tokens.

    An input alone above max_tokens gets a request of its own (too-long inputs are the
    caller's to truncate or reject first).
    """
    if max_inputs < 1 or max_tokens < 1:
        raise ValueError("max_inputs and max_tokens must be at least 1")
    out: list[list[int]] = []
    cur: list[int] = []
    cur_tokens = 0
    for i, n in enumerate(token_counts):
        if cur and (len(cur) >= max_inputs or cur_tokens + n > max_tokens):
            out.append(cur)
            cur, cur_tokens = [], 0
        cur.append(i)
        cur_tokens += n
    if cur:
        out.append(cur)
    return out
