"""eBPF acceleration on the real lab: sockmap shortcut (on and off), getpeername transparency,
pinned programs that survive an agent killed with SIGKILL, DaemonSet-style restarts, `bpf status`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from nodemesh.lab import lab
from nodemesh.lab.state import LabState, pid_alive
from nodemesh.lab.topology import BPF_PIN_ROOT
from nodemesh.scrape import total

from .labtools import cli, client_summary, eventually, leftovers, metrics, pod_exec, requires_root

pytestmark = [pytest.mark.e2e, requires_root]

HELLO_URL = "http://10.96.0.10/"  # hello-1 is on node1 with the client: same-node traffic

PEERNAME = """
import json, socket, time
t = time.monotonic()
try:
    s = socket.create_connection(("10.96.0.10", 80), timeout=5)
    print(json.dumps({"peer": list(s.getpeername()), "local": list(s.getsockname())}))
except OSError as e:
    print(json.dumps({"error": type(e).__name__, "seconds": time.monotonic() - t}))
"""


@pytest.fixture(scope="module")
def running_lab() -> Iterator[dict]:
    lab.down()
    os.environ["NODEMESH_LAB_SOCKMAP"] = "1"  # these tests switch the shortcut at run time
    try:
        lab.up()
    finally:
        os.environ.pop("NODEMESH_LAB_SOCKMAP", None)
    try:
        yield lab.status()
    finally:
        lab.down()
        assert leftovers() == []


def bpf_counters(node: str) -> dict[str, int]:
    out = cli("bpf", "status", "--json")
    assert out.returncode == 0, out.stderr
    return next(n for n in json.loads(out.stdout) if n["node"] == node)["counters"]


def set_shortcut(node: str, on: bool) -> None:
    path = os.path.join(BPF_PIN_ROOT, node, "maps", "nm_settings")
    subprocess.run(["bpftool", "map", "update", "pinned", path, "key", "0", "0", "0", "0",
                    "value", "1" if on else "0", "0", "0", "0"], check=True, capture_output=True)


def peername() -> dict:
    proc = pod_exec("client", "python3", "-c", PEERNAME)
    assert proc.returncode == 0, proc.stderr.decode()
    return json.loads(proc.stdout)


def test_same_node_traffic_takes_the_shortcut(running_lab: dict) -> None:
    before = bpf_counters("node1")
    summary = client_summary("client", HELLO_URL, 10, new_connection=False)
    assert summary["ok"] == 10
    after = bpf_counters("node1")
    # Both ends of client<->proxy (and of proxy<->hello-1 when the balancer picks the local pod).
    assert after["sockmap_added"] - before["sockmap_added"] >= 2
    assert after["shortcut_msgs"] - before["shortcut_msgs"] >= 20  # 10 requests + 10 responses
    assert after["shortcut_bytes"] > before["shortcut_bytes"]
    assert after["sockmap_full"] == 0
    # The same counters reach the agent's /metrics.
    assert total(metrics("node1"), "nodemesh_bpf_shortcut_msgs_total") >= after["shortcut_msgs"]


def test_shortcut_off_changes_nothing_functionally(running_lab: dict) -> None:
    set_shortcut("node1", False)
    try:
        before = bpf_counters("node1")
        summary = client_summary("client", HELLO_URL, 10, new_connection=False)
        assert summary["ok"] == 10 and summary["errors"] == 0
        after = bpf_counters("node1")
        # The switch is for new connections: none joined sock_hash. (shortcut_msgs may still grow:
        # the L7 proxy reuses pooled proxy->pod connections made while the shortcut was on.)
        assert after["sockmap_added"] == before["sockmap_added"]
    finally:
        set_shortcut("node1", True)


def test_getpeername_sees_the_service_vip(running_lab: dict) -> None:
    before = bpf_counters("node1")["peername_restored"]
    result = peername()
    assert result["peer"] == ["10.96.0.10", 80], result
    assert bpf_counters("node1")["peername_restored"] >= before + 1


def test_bpf_status_shows_programs_attached_per_node(running_lab: dict) -> None:
    out = cli("bpf", "status")
    assert out.returncode == 0, out.stderr
    for node in ("node1", "node2"):
        assert f"node {node}" in out.stdout
    st = json.loads(cli("bpf", "status", "--json").stdout)
    for n in st:
        attached = {p["name"]: p["attached"] for p in n["programs"]}
        assert set(attached) == {"nm_sockops", "nm_getpeername4", "nm_connect4", "nm_redirect", "nm_splice"}
        assert all(attached.values()), attached
        meshed = next(m for m in n["maps"] if m["name"] == "meshed_dsts")
        assert meshed["entries"] >= 1


BCC_LIBS = ("libbcc", "libLLVM", "libclang")  # what compiling with bcc maps into a process


def bcc_mappings(maps_text: str) -> set[str]:
    return {line.rsplit("/", 1)[-1] for line in maps_text.splitlines() if any(lib in line for lib in BCC_LIBS)}


def test_agents_carry_no_bcc_or_llvm(running_lab: dict) -> None:
    """The agents loaded and pinned their programs in a loader child: the node proxy processes map
    no libbcc/libLLVM/libclang (importing bcc's Python module alone maps libbcc)."""
    probe = subprocess.run([sys.executable, "-c", "import bcc; print(open('/proc/self/maps').read())"],
                           capture_output=True, text=True, timeout=60, check=True)
    assert bcc_mappings(probe.stdout), "the check must see bcc where it is loaded"
    state = LabState.load()
    assert state is not None
    agents = {k: int(p["pid"]) for k, p in state.processes.items() if p.get("role") == "agent"}
    assert set(agents) == {"agent/node1", "agent/node2"}
    for key, pid in agents.items():
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            assert b"agent" in f.read(), key  # the agent itself, not a wrapper
        with open(f"/proc/{pid}/maps", encoding="utf-8") as f:
            assert bcc_mappings(f.read()) == set(), key
    before = bpf_counters("node1")["connect_redirected"]
    assert client_summary("client", HELLO_URL, 2)["ok"] == 2
    assert bpf_counters("node1")["connect_redirected"] >= before + 2  # and they redirect


def test_killed_agent_keeps_redirection_refuses_fast_and_is_restarted(running_lab: dict) -> None:
    state = LabState.load()
    assert state is not None
    old_pid = int(state.processes["agent/node1"]["pid"])
    supervisor_pid = int(state.processes["supervisor"]["pid"])
    counted = bpf_counters("node1")["connect_redirected"]

    os.kill(supervisor_pid, signal.SIGSTOP)  # hold the restart so the agent-down window is observable
    try:
        os.kill(old_pid, signal.SIGKILL)
        eventually(lambda: not pid_alive(old_pid), timeout=5)
        result = peername()
        assert result.get("error") == "ConnectionRefusedError", result  # still redirected: no listener
        assert result["seconds"] < 1.0, result
    finally:
        os.kill(supervisor_pid, signal.SIGCONT)

    t0 = time.monotonic()

    def restarted() -> bool:
        st = LabState.load()
        entry = st.processes["agent/node1"] if st else {}
        return int(entry.get("pid", old_pid)) != old_pid and pid_alive(int(entry["pid"])) and entry.get("restarts") == 1

    eventually(restarted, timeout=5, interval=0.05)
    assert time.monotonic() - t0 < 3.0
    summary = eventually(lambda: (s := client_summary("client", HELLO_URL, 3)) and s["ok"] == 3 and s, timeout=15)
    assert summary["errors"] == 0
    # Adopted, not re-created: the counter kept counting across the restart.
    assert bpf_counters("node1")["connect_redirected"] >= counted + 4
