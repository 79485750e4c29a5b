"""The outbound spread ports: validated before anything is loaded, and what the agent listens on."""

from __future__ import annotations

import pytest

from nodemesh.agent.bpf_loader import PROXY_PORTS_MAX, RedirectPrograms
from nodemesh.agent.config import AgentConfig
from nodemesh.nodeconfig import ADMIN_PORT, CAPTURE_PORT, INBOUND_PORT, OUTBOUND_PORT, OUTBOUND_SPREAD_PORTS, TUNNEL_PORT


def test_default_spread_ports_fill_the_map_and_collide_with_no_other_port() -> None:
    assert len(OUTBOUND_SPREAD_PORTS) == PROXY_PORTS_MAX - 1
    assert not set(OUTBOUND_SPREAD_PORTS) & {OUTBOUND_PORT, INBOUND_PORT, CAPTURE_PORT, TUNNEL_PORT, ADMIN_PORT}
    assert AgentConfig(node="n1").outbound_spread_ports == OUTBOUND_SPREAD_PORTS


@pytest.mark.parametrize("ports", [tuple(range(5000, 5000 + PROXY_PORTS_MAX)), (4140,), (0,), (70000,)])
def test_bad_spread_ports_are_refused(ports: tuple[int, ...]) -> None:
    with pytest.raises(ValueError):
        RedirectPrograms("/nonexistent", "10.244.1.1", 4140, spread_ports=ports)


def test_spread_ports_are_kept_in_order() -> None:
    progs = RedirectPrograms("/nonexistent", "10.244.1.1", 4140, spread_ports=(4150, 4151))
    assert progs.spread_ports == (4150, 4151)
