"""Circuit breaking per endpoint: Linkerd's consecutive-failure accrual, as a clock-injected state
machine (no I/O).

An endpoint that fails `max_failures` responses in a row (5xx or no response) is ejected for a
penalty that starts at `min_penalty` and doubles per re-ejection up to `max_penalty`, each with
`jitter` (0.5 = ±50%). When the penalty is over the endpoint is on probation: exactly one request
(the probe) may go to it; success closes the breaker and resets the backoff, failure ejects again.
Defaults are Linkerd's (`balancer.linkerd.io/failure-accrual-consecutive-*`).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

MAX_FAILURES = 7
MIN_PENALTY = 1.0  # s
MAX_PENALTY = 60.0  # s
JITTER = 0.5


@dataclass(frozen=True)
class BreakerPolicy:
    max_failures: int = MAX_FAILURES
    min_penalty: float = MIN_PENALTY
    max_penalty: float = MAX_PENALTY
    jitter: float = JITTER

    def __post_init__(self) -> None:
        if self.max_failures < 1:
            raise ValueError(f"max_failures must be >= 1, got {self.max_failures}")
        if not (0 < self.min_penalty <= self.max_penalty):
            raise ValueError(f"need 0 < min_penalty <= max_penalty, got {self.min_penalty} and {self.max_penalty}")
        if not (0 <= self.jitter < 1):
            raise ValueError(f"jitter must be in [0, 1), got {self.jitter}")


@dataclass
class Breaker:
    """The breaker of one endpoint. States: closed, open (ejected until `until`), probing."""

    policy: BreakerPolicy = BreakerPolicy()
    clock: Callable[[], float] = time.monotonic
    rand: Callable[[], float] = random.random
    failures: int = 0
    ejections: int = 0  # consecutive ejections: the backoff exponent
    until: float = 0.0
    probing: bool = False  # the one probe request is in flight
    state: str = field(default="closed")

    def available(self) -> bool:
        """May a new request go here? In probation this hands out the single probe."""
        if self.state == "closed":
            return True
        if self.state == "open" and self.clock() >= self.until:
            self.state = "probation"
        if self.state == "probation" and not self.probing:
            return True
        return False

    def dispatched(self) -> None:
        """A request was sent here (after available() said yes)."""
        if self.state == "probation":
            self.probing = True

    def success(self) -> None:
        self.failures = 0
        self.ejections = 0
        self.probing = False
        self.state = "closed"

    def failure(self) -> None:
        self.failures += 1
        if self.state == "probation" or (self.state == "closed" and self.failures >= self.policy.max_failures):
            self._eject()

    def _eject(self) -> None:
        p = self.policy
        base = min(p.max_penalty, p.min_penalty * (2 ** self.ejections))
        spread = base * p.jitter
        self.until = self.clock() + max(0.0, base - spread + 2 * spread * self.rand())
        self.ejections += 1
        self.probing = False
        self.state = "open"
