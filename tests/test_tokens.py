"""Unit tests for syncer.providers.tokens: token estimates, truncation and request packing."""

from __future__ import annotations

import random

import pytest

from syncer.providers.tokens import estimate_tokens, pack_requests, truncate_to_tokens

# --- token estimates ----------------------------------------------------------------------

# Real cl100k_base counts, checked by hand against the tokenizer's rules: words with their
# leading space are one token each, numbers split into groups of up to 3 digits, a line
# break is its own token; "你好" is [57668, 53901].
KNOWN_CL100K = [
    ("hello world", 2),
    ("The quick brown fox jumps over the lazy dog", 9),
    ("The quick brown fox jumps over the lazy dog.", 10),
    ("1234567890", 4),
    ("a b c d e f g h i j", 10),
    ("a\nb\nc\nd", 7),
    ("你好", 2),
]


@pytest.mark.parametrize(("text", "real"), KNOWN_CL100K)
def test_estimate_is_never_below_known_counts(text: str, real: int) -> None:
    assert estimate_tokens(text) >= real


@pytest.mark.parametrize("text", ["😀", "🦜", "👨‍👩‍👧", "नमस्ते", "สวัสดี", "ሰላም", "€→✓"])
def test_estimate_covers_byte_fallback_scripts(text: str) -> None:
    # A byte-level BPE never uses more tokens than UTF-8 bytes: the hard upper bound.
    assert estimate_tokens(text) >= len(text.encode("utf-8"))


def test_estimate_of_cjk_allows_more_than_one_token_a_character() -> None:
    text = "数据库中的向量嵌入需要与文本保持同步。" * 10
    assert estimate_tokens(text) >= 1.5 * len(text)


def test_estimate_is_never_below_bytes_over_3_or_word_count() -> None:
    rng = random.Random(7)
    alphabet = "abc xyz ,.;!\n0123456789éßж你😀"
    for _ in range(500):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 80)))
        n = estimate_tokens(text)
        assert n >= len(text.encode("utf-8")) / 3
        assert n >= len(text.split())


def test_estimate_of_english_prose_is_high_but_not_wildly() -> None:
    text = (
        "Embeddings are recomputed whenever the text of a row changes, and the sidecar "
        "keeps the vectors in step with the rows they were computed from. "
    ) * 30
    ratio = estimate_tokens(text) / (len(text) / 4)  # English is ~4 characters a token
    assert 1.0 <= ratio <= 1.5


def test_estimate_of_empty_text_is_zero() -> None:
    assert estimate_tokens("") == 0


# --- truncation ---------------------------------------------------------------------------


def test_truncate_keeps_a_text_that_fits() -> None:
    assert truncate_to_tokens("hello world", 10) == "hello world"


def test_truncate_cuts_prose_at_a_word_boundary_close_to_the_limit() -> None:
    text = "The quick brown fox jumps over the lazy dog. " * 100
    cut = truncate_to_tokens(text, 50)
    assert text.startswith(cut)
    assert 45 <= estimate_tokens(cut) <= 50
    assert text[len(cut)].isspace()


def test_truncate_cuts_text_without_spaces_on_a_character_boundary() -> None:
    text = "数据库中的向量嵌入需要与文本保持同步" * 20
    cut = truncate_to_tokens(text, 10)
    assert text.startswith(cut) and cut
    assert estimate_tokens(cut) <= 10 < estimate_tokens(text[: len(cut) + 1])


def test_truncate_cuts_a_word_rather_than_lose_a_long_stretch() -> None:
    text = "x" * 500 + " " + "y" * 1000
    cut = truncate_to_tokens(text, 300)
    assert len(cut) == 900 and estimate_tokens(cut) == 300


def test_truncate_to_nothing() -> None:
    assert truncate_to_tokens("hello world", 0) == ""


# --- packing ------------------------------------------------------------------------------


def test_pack_by_count() -> None:
    assert pack_requests([1] * 5, max_inputs=2, max_tokens=100) == [[0, 1], [2, 3], [4]]


def test_pack_by_tokens() -> None:
    assert pack_requests([3, 3, 3, 3], max_inputs=10, max_tokens=7) == [[0, 1], [2, 3]]


def test_pack_gives_an_oversized_input_a_request_of_its_own() -> None:
    assert pack_requests([2, 10, 2], max_inputs=10, max_tokens=5) == [[0], [1], [2]]


def test_pack_nothing_and_bad_limits() -> None:
    assert pack_requests([], max_inputs=1, max_tokens=1) == []
    with pytest.raises(ValueError):
        pack_requests([1], max_inputs=0, max_tokens=1)


def test_pack_keeps_order_and_fills_greedily() -> None:
    rng = random.Random(3)
    for _ in range(200):
        counts = [rng.randint(1, 60) for _ in range(rng.randint(1, 50))]
        max_inputs, max_tokens = rng.randint(1, 8), rng.randint(20, 120)
        reqs = pack_requests(counts, max_inputs, max_tokens)
        assert [i for r in reqs for i in r] == list(range(len(counts)))
        for r, nxt in zip(reqs, [*reqs[1:], None], strict=True):
            total = sum(counts[i] for i in r)
            assert len(r) <= max_inputs and (total <= max_tokens or len(r) == 1)
            if nxt is not None:  # the next input did not fit
                assert len(r) == max_inputs or total + counts[nxt[0]] > max_tokens
