"""The core end-to-end mesh tests again with the nftables fallback (`--redirect=iptables`, lab env
NODEMESH_LAB_REDIRECT=iptables): no BPF attached, DNAT in each node's netns, original destinations
from conntrack. The whole of test_lab_mesh.py / test_lab_capture.py runs in this mode with
`NODEMESH_LAB_REDIRECT=iptables pytest tests/e2e/test_lab_mesh.py tests/e2e/test_lab_capture.py`;
this module keeps a fast subset in the default suite."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator

import pytest

from nodemesh.lab import lab

from . import test_lab_mesh as core
from .labtools import client_summary, eventually, leftovers, requires_root

pytestmark = [pytest.mark.e2e, requires_root]


@pytest.fixture(scope="module")
def running_lab() -> Iterator[dict]:
    saved = os.environ.get("NODEMESH_LAB_REDIRECT")
    os.environ["NODEMESH_LAB_REDIRECT"] = "iptables"
    lab.down()
    try:
        lab.up()
        eventually(lambda: client_summary("client", core.HELLO_URL, 1)["ok"] == 1, timeout=15)
        yield lab.status()
    finally:
        lab.down()
        if saved is None:
            os.environ.pop("NODEMESH_LAB_REDIRECT", None)
        else:
            os.environ["NODEMESH_LAB_REDIRECT"] = saved
        assert leftovers() == []


test_client_reaches_both_backends_through_the_vip = core.test_client_reaches_both_backends_through_the_vip
test_keepalive_requests_ride_one_proxied_connection = core.test_keepalive_requests_ride_one_proxied_connection
test_agents_count_the_connections = core.test_agents_count_the_connections
test_non_meshed_destination_is_not_redirected = core.test_non_meshed_destination_is_not_redirected


def test_no_bpf_is_attached_and_the_agent_says_so(running_lab: dict) -> None:
    for node in running_lab["nodes"]:
        attached = subprocess.run(["bpftool", "cgroup", "show", node["cgroup"]], capture_output=True, text=True).stdout
        assert "nm_connect4" not in attached, attached
        table = subprocess.run(["ip", "netns", "exec", node["netns"], "nft", "list", "table", "ip", "nodemesh"],
                               capture_output=True, text=True, check=True).stdout
        assert "@redirect_sources" in table and "@capture_pods" in table
    state = lab.require_up()
    log = open(state.processes["agent/node1"]["log"], encoding="utf-8").read()
    assert log.count("redirect mode: iptables (forced by --redirect=iptables)") == 1
