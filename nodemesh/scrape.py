"""Reading a proxy's /metrics back (the CLI, the demo and tests share this)."""

from __future__ import annotations

from collections.abc import Mapping

from prometheus_client.parser import text_string_to_metric_families


def samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    return [(s.name, dict(s.labels), s.value) for fam in text_string_to_metric_families(text) for s in fam.samples]


def total(text: str, name: str, match: Mapping[str, str] | None = None) -> float:
    """Sum of a sample over every label set that matches `match`."""
    match = match or {}
    return sum(v for n, labels, v in samples(text) if n == name and all(labels.get(k) == val for k, val in match.items()))
