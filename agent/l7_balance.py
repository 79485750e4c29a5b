"""Per-request endpoint choice for L7: P2C over peak-EWMA (fastpath) among the endpoints whose
circuit breaker lets a request through. Endpoint state is keyed by (namespace, pod, ip, port), so it
survives config versions; `retain` drops what left the config."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from nodemesh.agent.breaker import Breaker, BreakerPolicy
from nodemesh.fastpath import P2C, PeakEwma
from nodemesh.nodeconfig import Endpoint

EpKey = tuple[str, str, str, int]
DEFAULT_RTT_MS = 30.0  # Linkerd's balancer default RTT, for the first endpoints of a service
DECAY_S = 10.0  # Linkerd's peak-EWMA decay


def ep_key(ep: Endpoint) -> EpKey:
    return (ep.namespace, ep.pod, ep.ip, ep.port)


@dataclass
class EndpointState:
    load: PeakEwma
    breaker: Breaker


class AllEjected(Exception):
    """Every endpoint's breaker is open."""


class L7Balancer:
    def __init__(self, policy: BreakerPolicy = BreakerPolicy(), clock: Callable[[], float] = time.monotonic, seed: int | None = None) -> None:
        self._policy = policy
        self._clock = clock
        self._p2c = P2C(seed) if seed is not None else P2C(time.monotonic_ns() | 1)
        self._state: dict[EpKey, EndpointState] = {}

    def state(self, ep: Endpoint, initial_rtt_ms: float = DEFAULT_RTT_MS) -> EndpointState:
        key = ep_key(ep)
        st = self._state.get(key)
        if st is None:
            st = self._state[key] = EndpointState(PeakEwma(initial_rtt_ms, DECAY_S, self._clock()), Breaker(self._policy, self._clock))
        return st

    def _admit_new(self, endpoints: Sequence[Endpoint]) -> None:
        # A new endpoint starts at the cheapest current estimate of its peers, not the 30 ms
        # default: against warmed-up sub-ms peers the default would starve it for tens of seconds
        # (the estimate only decays with time). Its first response sets the real value (peak).
        new = [ep for ep in endpoints if ep_key(ep) not in self._state]
        if not new:
            return
        now = self._clock()
        known = [self._state[ep_key(ep)].load.cost(now) for ep in endpoints if ep_key(ep) in self._state]
        initial = min(known) if known else DEFAULT_RTT_MS
        for ep in new:
            self.state(ep, initial)

    def pick(self, endpoints: Sequence[Endpoint]) -> tuple[Endpoint, EndpointState]:
        """Choose among available endpoints and mark it dispatched; raise AllEjected."""
        self._admit_new(endpoints)
        avail = [(ep, st) for ep in endpoints if (st := self.state(ep)).breaker.available()]
        if not avail:
            raise AllEjected(f"all {len(endpoints)} endpoints are ejected by the circuit breaker")
        i = self._p2c.pick([st.load for _, st in avail], self._clock()) if len(avail) > 1 else 0
        ep, st = avail[i]
        st.breaker.dispatched()
        st.load.start()
        return ep, st

    def retain(self, endpoints: Iterable[Endpoint]) -> None:
        live = {ep_key(e) for e in endpoints}
        for key in [k for k in self._state if k not in live]:
            del self._state[key]
