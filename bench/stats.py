"""Summaries of repeated measurements: nearest-rank percentiles, medians, spread, ratios (pure)."""

from __future__ import annotations

import math
from collections.abc import Sequence


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 1]) of unsorted values; raises on an empty sequence."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"percentile rank {q} is outside [0, 1]")
    ordered = sorted(values)
    i = min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))
    return ordered[i]


def median(values: Sequence[float]) -> float:
    if not values:
        raise ValueError("median of no values")
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def spread(values: Sequence[float]) -> float:
    """(max - min) / median: how far repetitions disagree, 0 for one repetition."""
    m = median(values)
    return 0.0 if m == 0 else (max(values) - min(values)) / m


def ratio(value: float | None, base: float | None) -> float | None:
    """value / base rounded to 3 places, or None when either side is missing or the base is 0."""
    if value is None or base is None or base == 0:
        return None
    return round(value / base, 3)
