"""Linkerd's retry budget: retries may add `ratio` extra load over the last `ttl` seconds, plus a
floor of `min_per_second` retries per second so a quiet service can still retry. Sans-IO (the
clock is injected); one budget per route.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

RETRY_RATIO = 0.2
MIN_RETRIES_PER_SECOND = 10
TTL = 10.0  # s
MAX_RETRYABLE_BODY = 64 * 1024  # a request body larger than this is not buffered, so never retried


@dataclass
class RetryBudget:
    ratio: float = RETRY_RATIO
    min_per_second: float = MIN_RETRIES_PER_SECOND
    ttl: float = TTL
    clock: Callable[[], float] = time.monotonic
    _requests: deque[float] = field(default_factory=deque)
    _retries: deque[float] = field(default_factory=deque)

    def __post_init__(self) -> None:
        if self.ratio < 0 or self.min_per_second < 0 or self.ttl <= 0:
            raise ValueError(f"retry budget needs ratio >= 0, min_per_second >= 0, ttl > 0; got {self.ratio}, {self.min_per_second}, {self.ttl}")

    def _expire(self, now: float) -> None:
        cut = now - self.ttl
        for q in (self._requests, self._retries):
            while q and q[0] <= cut:
                q.popleft()

    def deposit(self) -> None:
        """An original request (not a retry) was sent."""
        now = self.clock()
        self._expire(now)
        self._requests.append(now)

    def withdraw(self) -> bool:
        """May one retry go now? Counts it when yes."""
        now = self.clock()
        self._expire(now)
        if len(self._retries) + 1 > self.ratio * len(self._requests) + self.min_per_second * self.ttl:
            return False
        self._retries.append(now)
        return True

    @property
    def in_window(self) -> tuple[int, int]:
        """(requests, retries) within the window, for tests and logs."""
        self._expire(self.clock())
        return len(self._requests), len(self._retries)
