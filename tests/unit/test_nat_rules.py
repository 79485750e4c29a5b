"""agent/nat_rules.render and agent/original_dst.parse: pure, table-driven."""

from __future__ import annotations

import socket
import struct

import pytest

from nodemesh.agent.config import AgentConfig
from nodemesh.agent.nat_rules import NatRules, render
from nodemesh.agent.original_dst import parse

PODS = frozenset({"10.244.1.3", "10.244.1.2"})


def _rules_lines(script: str) -> list[str]:
    return [l.strip() for l in script.splitlines() if "dnat" in l]


@pytest.mark.parametrize(
    ("rules", "expected"),
    [
        (NatRules("10.244.1.1", 4145, PODS), ["ip daddr @capture_pods meta l4proto tcp dnat to 10.244.1.1:4145"]),
        (NatRules("10.244.1.1", 4145), ["ip daddr @capture_pods meta l4proto tcp dnat to 10.244.1.1:4145"]),
        (
            NatRules("10.244.1.1", 4145, PODS, outbound_port=4140, redirect_sources=PODS,
                     redirect_dsts=frozenset({("10.96.0.10", 80), ("10.244.2.2", 0)})),
            [
                "ip saddr @redirect_sources ip daddr . tcp dport @redirect_ports dnat to 10.244.1.1:4140",
                "ip saddr @redirect_sources ip daddr @redirect_ips meta l4proto tcp dnat to 10.244.1.1:4140",
                "ip daddr @capture_pods meta l4proto tcp dnat to 10.244.1.1:4145",
            ],
        ),
    ],
)
def test_render_rules_in_order(rules: NatRules, expected: list[str]) -> None:
    script = render(rules)
    assert _rules_lines(script) == expected
    assert script.startswith("table ip nodemesh {}\ndelete table ip nodemesh\n")  # atomic replace


def test_render_sorts_and_dedups_elements() -> None:
    script = render(NatRules("10.244.1.1", 4145, frozenset({"10.244.1.10", "10.244.1.9"}), outbound_port=4140,
                             redirect_sources=frozenset({"10.244.1.9"}), redirect_dsts=frozenset({("10.96.0.10", 80), ("10.96.0.9", 443)})))
    assert "elements = { 10.244.1.9, 10.244.1.10 }" in script
    assert "elements = { 10.96.0.9 . 443, 10.96.0.10 . 80 }" in script


@pytest.mark.parametrize(
    ("rules", "message"),
    [
        (NatRules("10.244.1", 4145), "not an IPv4 address: '10.244.1'"),
        (NatRules("10.244.1.1", 0), "invalid capture port 0"),
        (NatRules("10.244.1.1", 4145, frozenset({"fe80::1"})), "not an IPv4 address: 'fe80::1'"),
        (NatRules("10.244.1.1", 4145, redirect_sources=PODS), "invalid outbound port 0"),
        (NatRules("10.244.1.1", 4145, outbound_port=4140, redirect_sources=PODS, redirect_dsts=frozenset({("10.96.0.1", 70000)})),
         "invalid destination port 70000"),
    ],
)
def test_render_names_bad_input(rules: NatRules, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace(".", r"\.").replace("(", r"\(")):
        render(rules)


def test_parse_sockaddr_in() -> None:
    raw = struct.pack("=H", socket.AF_INET) + struct.pack("!H", 8080) + socket.inet_aton("10.244.1.2") + bytes(8)
    assert parse(raw) == ("10.244.1.2", 8080)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"\x02\x00", "returned 2 bytes"),
        (struct.pack("=H", socket.AF_INET6) + bytes(14), "address family 10"),
    ],
)
def test_parse_refuses_what_is_not_a_sockaddr_in(raw: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse(raw)


def test_agent_config_refuses_an_unknown_redirect_mode() -> None:
    with pytest.raises(ValueError, match="unknown redirect mode 'ebpf': use one of auto, bpf, iptables"):
        AgentConfig(node="n1", redirect="ebpf")
