"""Endpoint choice for a service port. Round-robin for now; the L7 work swaps in P2C over EWMA
latency (in fastpath) behind the same `pick(key, endpoints)` so `decide` does not change."""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Sequence
from typing import Protocol

from nodemesh.nodeconfig import Endpoint


class Balancer(Protocol):
    def pick(self, key: Hashable, endpoints: Sequence[Endpoint]) -> Endpoint:
        """Choose one of `endpoints` (never empty) for a new connection to the service port `key`."""
        ...


class RoundRobin:
    """Per-key rotation. Endpoint lists change with configs; indexing modulo the current length keeps
    the rotation going without per-endpoint state to reconcile."""

    def __init__(self) -> None:
        self._next: dict[Hashable, int] = {}

    def pick(self, key: Hashable, endpoints: Sequence[Endpoint]) -> Endpoint:
        if not endpoints:
            raise ValueError(f"no endpoints to pick from for {key!r}")
        n = self._next.get(key, 0)
        self._next[key] = n + 1
        return endpoints[n % len(endpoints)]

    def retain(self, keys: Iterable[Hashable]) -> None:
        """Forget keys of service ports that no longer exist, so the table tracks the config."""
        live = set(keys)
        for key in [k for k in self._next if k not in live]:
            del self._next[key]
