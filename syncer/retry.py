"""The retry policy: what happens to a queue item after an error, decided in one place."""

from __future__ import annotations

import random


def backoff_s(attempt: int, base_s: float, cap_s: float, err: Exception | None = None) -> float:
    """Full-jitter exponential backoff; a Retry-After is a floor, never shortened."""
    delay = random.uniform(0, min(cap_s, base_s * (2 ** max(0, attempt - 1))))
    retry_after = getattr(err, "retry_after_s", None)
    if retry_after:
        delay = max(delay, float(retry_after))
    return delay
