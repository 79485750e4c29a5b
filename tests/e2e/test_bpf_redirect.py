"""connect4 + sock_ops redirect on a real topology: a cgroup v2 node subtree and a pod netns.

Topology (built and torn down by the `topo` fixture, all names prefixed nmt<instance>-bpf; shown
for instance 0, whose subnet is 10.254.60.0/24):

    <cg2>/nmt0-bpf/node            <- RedirectPrograms attaches here
    <cg2>/nmt0-bpf/node/pod        <- client processes (also in netns nmt0-bpf-pod)
    <cg2>/nmt0-bpf/node/proxy      <- exempt cgroup (its clients must not be redirected)
    netns nmt0-bpf-pod: nmt0-bpf-p 10.254.60.2/24  <-veth->  nmt0-bpf-h 10.254.60.1/24 (root netns)

The "proxy" and a plain "backend" listener run in this test process, in the root netns and
outside the node cgroup, so they are never redirected themselves. Traffic only goes to
10.254.60.0/24, which exists only on the veth pair created here.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from nodemesh.agent.bpf_loader import CGROUP_PROGRAMS
from nodemesh.cgroups import cgroup2_mount
from nodemesh.lab.topology import INSTANCE

from .labtools import add_pod_netns, remove_pod_netns

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: builds netns, veth, cgroups and loads BPF"),
]

# Per lab instance, so suites of parallel instances never share a cgroup, netns or subnet.
PREFIX = f"nmt{INSTANCE}-bpf"
NETNS = f"{PREFIX}-pod"
VETH_HOST, VETH_POD = f"{PREFIX}-h", f"{PREFIX}-p"
NET = f"10.254.{60 + INSTANCE}"
HOST_IP, POD_IP = f"{NET}.1", f"{NET}.2"
GHOST_IP = f"{NET}.99"  # on the pod's subnet, owned by nobody: only a redirect can answer
OTHER_IP = f"{NET}.100"

# Runs inside the pod netns + a node child cgroup. Opens every target concurrently, sends the
# target it dialled, expects the listener's one-line answer. Prints one JSON list of results.
CLIENT = r"""
import asyncio, json, sys

async def one(ip, port):
    try:
        r, w = await asyncio.wait_for(asyncio.open_connection(ip, port), 5)
    except Exception as e:
        return {"target": [ip, port], "error": repr(e)}
    try:
        w.write(f"{ip}:{port}\n".encode())
        await w.drain()
        answer = (await asyncio.wait_for(r.readline(), 5)).decode().strip()
        return {"target": [ip, port], "answer": answer}
    except Exception as e:
        return {"target": [ip, port], "error": repr(e)}
    finally:
        w.close()

async def main():
    targets = json.loads(sys.argv[1])
    print(json.dumps(await asyncio.gather(*(one(ip, port) for ip, port in targets))))

asyncio.run(main())
"""


@dataclass
class Topo:
    node_cg: str
    pod_cg: str
    exempt_cg: str
    base_cg: str


@dataclass
class Accepted:
    listener: str
    peer: tuple[str, int]
    claimed: str  # what the client says it dialled
    orig: tuple[str, int] | None  # lookup_original_dst(peer), done right after accept()


@dataclass
class Listener:
    """A TCP listener in this process that records every connection and answers its name."""

    name: str
    lookup: object = None  # callable(peer_ip, peer_port) -> orig dst, set for the proxy
    sock: socket.socket = field(init=False)
    port: int = field(init=False)
    accepted: list[Accepted] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> Listener:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((HOST_IP, 0))
        self.sock.listen(1024)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, name=f"nmt-{self.name}", daemon=True)
        self._thread.start()
        return self

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, peer = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            # Look up before reading anything: the entry must already exist at accept() time.
            orig = self.lookup(*peer) if self.lookup else None
            threading.Thread(target=self._handle, args=(conn, peer, orig), daemon=True).start()

    def _handle(self, conn: socket.socket, peer: tuple[str, int], orig: tuple[str, int] | None) -> None:
        with conn:
            conn.settimeout(5)
            try:
                claimed = conn.makefile("rb").readline().decode().strip()
                self.accepted.append(Accepted(self.name, peer, claimed, orig))
                conn.sendall(f"{self.name}\n".encode())
            except OSError:
                pass

    def stop(self) -> None:
        self._stop.set()
        self.sock.close()
        if self._thread:
            self._thread.join(timeout=2)


def _cleanup_topology(base_cg: str) -> None:
    """Remove everything named PREFIX*; safe to call on a partial or absent topology."""
    # Kill stragglers, then remove cgroups leaves first (rmdir needs them empty).
    if os.path.isdir(base_cg):
        for root, _dirs, _files in os.walk(base_cg, topdown=False):
            kill = os.path.join(root, "cgroup.kill")
            if os.path.exists(kill):
                with open(kill, "w") as f:
                    f.write("1")
            for _ in range(50):
                try:
                    os.rmdir(root)
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.05)  # killed tasks leave the cgroup asynchronously
    remove_pod_netns(NETNS, VETH_HOST)


def _leftovers(base_cg: str) -> list[str]:
    from pyroute2 import IPRoute, netns

    found = [f"netns {n}" for n in netns.listnetns() if n.startswith(PREFIX)]
    with IPRoute() as ipr:
        found += [f"link {ln.get('ifname')}" for ln in ipr.get_links() if ln.get("ifname", "").startswith(PREFIX)]
    parent = os.path.dirname(base_cg)
    found += [f"cgroup {n}" for n in os.listdir(parent) if n.startswith(PREFIX)]
    return found


def _build_topology(base_cg: str) -> Topo:
    topo = Topo(
        node_cg=os.path.join(base_cg, "node"),
        pod_cg=os.path.join(base_cg, "node", "pod"),
        exempt_cg=os.path.join(base_cg, "node", "proxy"),
        base_cg=base_cg,
    )
    for path in (topo.pod_cg, topo.exempt_cg):
        os.makedirs(path)
    add_pod_netns(NETNS, VETH_HOST, VETH_POD, HOST_IP, POD_IP)
    return topo


@pytest.fixture
def topo() -> Iterator[Topo]:
    base_cg = os.path.join(cgroup2_mount(), PREFIX)
    _cleanup_topology(base_cg)  # a crashed earlier run must not break this one
    try:
        yield _build_topology(base_cg)
    finally:
        _cleanup_topology(base_cg)


@pytest.fixture
def proxy() -> Iterator[Listener]:
    listener = Listener("proxy")
    try:
        yield listener  # started by `progs`, once the lookup is known
    finally:
        if getattr(listener, "sock", None):
            listener.stop()


@pytest.fixture
def backend(topo: Topo) -> Iterator[Listener]:
    listener = Listener("backend").start()
    try:
        yield listener
    finally:
        listener.stop()


@pytest.fixture
def progs(topo: Topo, proxy: Listener) -> Iterator[object]:
    from nodemesh.agent.bpf_loader import RedirectPrograms

    proxy.start()
    programs = RedirectPrograms(topo.node_cg, HOST_IP, proxy.port, exempt_cgroup_paths=[topo.exempt_cg])
    proxy.lookup = programs.lookup_original_dst
    try:
        programs.load()
        yield programs
    finally:
        programs.close()


def run_client(cgroup: str, targets: list[tuple[str, int]]) -> list[dict]:
    """Dial `targets` concurrently from a process in the pod netns and in `cgroup`."""

    def join_cgroup() -> None:
        # Before exec, in the root mount namespace (`ip netns exec` would remount /sys).
        with open(os.path.join(cgroup, "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))

    out = subprocess.run(
        ["nsenter", f"--net=/run/netns/{NETNS}", sys.executable, "-c", CLIENT, json.dumps(targets)],
        preexec_fn=join_cgroup,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return json.loads(out.stdout)


def wait_accepted(listener: Listener, count: int) -> list[Accepted]:
    deadline = time.monotonic() + 10
    while len(listener.accepted) < count and time.monotonic() < deadline:
        time.sleep(0.01)
    return list(listener.accepted)


def attached_programs(cgroup: str) -> list[dict]:
    out = subprocess.run(["bpftool", "-j", "cgroup", "show", cgroup], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip() or "[]")  # bpftool prints a bare newline for none


# -- tests --------------------------------------------------------------------------------


def test_meshed_exact_destination_lands_on_proxy_with_original_dst(topo, progs, proxy) -> None:
    progs.set_meshed([(GHOST_IP, 80)])
    [result] = run_client(topo.pod_cg, [(GHOST_IP, 80)])
    assert result.get("answer") == "proxy", result
    [acc] = wait_accepted(proxy, 1)
    assert acc.peer[0] == POD_IP
    assert acc.claimed == f"{GHOST_IP}:80"
    # 80 and its byte-swap 20480 differ, so this also pins the byte orders.
    assert acc.orig == (GHOST_IP, 80)
    assert progs.lookup_original_dst(*acc.peer) is None  # consumed by the first lookup
    counters = progs.counters()
    assert counters["connect_redirected"] == 1 and counters["established_moved"] == 1, counters


def test_port_zero_meshes_every_port_of_the_ip(topo, progs, proxy) -> None:
    progs.set_meshed([(GHOST_IP, 0)])
    targets = [(GHOST_IP, p) for p in (1, 80, 443, 8080, 65535)]
    results = run_client(topo.pod_cg, targets)
    assert [r.get("answer") for r in results] == ["proxy"] * len(targets), results
    accepted = wait_accepted(proxy, len(targets))
    assert sorted(a.orig for a in accepted) == sorted(targets)
    assert all(a.claimed == f"{a.orig[0]}:{a.orig[1]}" for a in accepted)


def test_non_meshed_destination_is_not_redirected(topo, progs, proxy, backend) -> None:
    # Same IP meshed on another port, plus another IP: neither may catch backend.port.
    progs.set_meshed([(HOST_IP, 9), (GHOST_IP, 0)])
    [result] = run_client(topo.pod_cg, [(HOST_IP, backend.port)])
    assert result.get("answer") == "backend", result
    [acc] = wait_accepted(backend, 1)
    assert acc.claimed == f"{HOST_IP}:{backend.port}"
    assert proxy.accepted == []
    assert progs.counters()["connect_redirected"] == 0


def test_exempt_cgroup_is_not_redirected(topo, progs, proxy, backend) -> None:
    progs.set_meshed([(HOST_IP, backend.port)])
    [exempt] = run_client(topo.exempt_cg, [(HOST_IP, backend.port)])
    assert exempt.get("answer") == "backend", exempt
    # Control: the same destination from the pod cgroup is redirected.
    [pod] = run_client(topo.pod_cg, [(HOST_IP, backend.port)])
    assert pod.get("answer") == "proxy", pod
    [acc] = wait_accepted(proxy, 1)
    assert acc.orig == (HOST_IP, backend.port)
    counters = progs.counters()
    assert counters["connect_exempt"] == 1 and counters["connect_redirected"] == 1, counters


def test_concurrent_connects_all_recover_their_original_dst(topo, progs, proxy) -> None:
    progs.set_meshed([(GHOST_IP, 0), (OTHER_IP, 7000)])
    targets = [(GHOST_IP, 10000 + i) for i in range(150)] + [(OTHER_IP, 7000)] * 50
    results = run_client(topo.pod_cg, targets)
    failures = [r for r in results if r.get("answer") != "proxy"]
    assert not failures, failures[:5]
    accepted = wait_accepted(proxy, len(targets))
    assert len(accepted) == len(targets)
    wrong = [a for a in accepted if a.orig is None or a.claimed != f"{a.orig[0]}:{a.orig[1]}"]
    assert not wrong, wrong[:5]
    assert len({a.peer for a in accepted}) == len(targets)
    assert progs.counters()["established_moved"] == len(targets)


def test_close_removes_redirect_and_detaches(topo, progs, proxy, backend) -> None:
    progs.set_meshed([(HOST_IP, backend.port)])
    [before] = run_client(topo.pod_cg, [(HOST_IP, backend.port)])
    assert before.get("answer") == "proxy", before
    assert len(attached_programs(topo.node_cg)) == len(CGROUP_PROGRAMS)

    progs.close()
    progs.close()  # idempotent

    assert attached_programs(topo.node_cg) == []
    [after] = run_client(topo.pod_cg, [(HOST_IP, backend.port)])
    assert after.get("answer") == "backend", after
    with pytest.raises(RuntimeError):
        progs.lookup_original_dst(POD_IP, 12345)


def test_cleanup_leaves_nothing_named_nmt_bpf() -> None:
    from nodemesh.agent.bpf_loader import RedirectPrograms

    base_cg = os.path.join(cgroup2_mount(), PREFIX)
    _cleanup_topology(base_cg)
    try:
        topo = _build_topology(base_cg)
        programs = RedirectPrograms(topo.node_cg, HOST_IP, 4140, exempt_cgroup_paths=[topo.exempt_cg])
        try:
            programs.load()
            assert _leftovers(base_cg)  # sanity: the check does see our objects
        finally:
            programs.close()
    finally:
        _cleanup_topology(base_cg)
    assert _leftovers(base_cg) == []


# -- preflight: each failure is one BpfUnavailable sentence saying what to do -------------------


def test_preflight_errors_are_clear(tmp_path, monkeypatch) -> None:
    from nodemesh.agent import bpf_loader
    from nodemesh.agent.bpf_loader import BpfUnavailable, RedirectPrograms
    from nodemesh.errors import NodemeshError

    cg2 = cgroup2_mount()

    def error_of(path: str = cg2) -> str:
        with pytest.raises(BpfUnavailable) as info:
            RedirectPrograms(path, HOST_IP, 4140).load()
        assert isinstance(info.value, NodemeshError)
        return str(info.value)

    assert "not on a cgroup v2 filesystem" in error_of(str(tmp_path))
    assert "does not exist" in error_of(os.path.join(cg2, "nmt-bpf-missing"))

    with monkeypatch.context() as m:
        m.setattr(os, "geteuid", lambda: 1000)
        assert "needs root" in error_of()

    with monkeypatch.context() as m:
        m.setitem(sys.modules, "bcc", None)  # makes `import bcc` raise ImportError
        assert "install python3-bpfcc" in error_of()

    broken = tmp_path / "bpf"
    broken.mkdir()
    (broken / "connect.c").write_text("int nm_connect4(struct bpf_sock_addr *ctx) { return oops; }\n")
    for name in bpf_loader.SOURCES[1:]:
        (broken / name).write_text("")
    monkeypatch.setattr(bpf_loader, "_bpf_source_dir", lambda: str(broken))
    assert "cannot compile the BPF programs" in error_of()


def test_second_loader_replaces_first_and_first_close_spares_it(topo, progs, proxy) -> None:
    # What an agent restart after a crash (or an overlapping rollout) looks like.
    from nodemesh.agent.bpf_loader import RedirectPrograms

    first_ids = {p["id"] for p in attached_programs(topo.node_cg)}
    second = RedirectPrograms(topo.node_cg, HOST_IP, proxy.port, exempt_cgroup_paths=[topo.exempt_cg])
    try:
        second.load()
        second_ids = {p["id"] for p in attached_programs(topo.node_cg)}
        assert len(second_ids) == len(CGROUP_PROGRAMS) and not second_ids & first_ids  # replaced, not stacked
        progs.close()  # the old instance must not detach the new one's programs
        assert {p["id"] for p in attached_programs(topo.node_cg)} == second_ids
        proxy.lookup = second.lookup_original_dst
        second.set_meshed([(GHOST_IP, 80)])
        [result] = run_client(topo.pod_cg, [(GHOST_IP, 80)])
        assert result.get("answer") == "proxy", result
        assert [a.orig for a in wait_accepted(proxy, 1)] == [(GHOST_IP, 80)]
    finally:
        second.close()
    assert attached_programs(topo.node_cg) == []


def test_full_meshed_map_is_counted_and_logged_not_a_crash(progs, caplog: pytest.LogCaptureFixture) -> None:
    """One destination more than meshed_dsts holds: service ports stay, one pod IP is left out."""
    from nodemesh.agent.bpf_loader import MESHED_CAPACITY

    vips = [(f"10.96.{i // 250}.{i % 250 + 1}", 80) for i in range(100)]
    pods = [(f"10.200.{i // 250}.{i % 250 + 1}", 0) for i in range(MESHED_CAPACITY - len(vips) + 1)]
    with caplog.at_level("ERROR", logger="nodemesh.agent.bpf_loader"):
        progs.set_meshed(vips + pods)
    assert progs.counters()["meshed_dsts_dropped"] == 1
    assert "exceed the meshed_dsts map" in caplog.text
    keys = {(ip4, port) for ip4, port, _pad in progs._map("meshed_dsts").keys()}
    assert len(keys) == MESHED_CAPACITY
    progs.set_meshed(vips)  # back under the limit: nothing dropped
    assert progs.counters()["meshed_dsts_dropped"] == 0


def test_destinations_spread_over_the_proxy_ports(topo, progs, proxy) -> None:
    """With spread ports, each original destination always lands on the same one of the proxy's
    listeners (so a pod's redirected sockets do not all share one remote ip:port), and every one
    of them still recovers its original destination."""
    from nodemesh.agent.bpf_loader import RedirectPrograms

    progs.close()  # reload the same topology with four listeners
    extra = [Listener(f"spread{i}", lookup=None).start() for i in range(3)]
    spread = RedirectPrograms(topo.node_cg, HOST_IP, proxy.port, exempt_cgroup_paths=[topo.exempt_cg],
                              spread_ports=[x.port for x in extra])
    try:
        for x in extra:
            x.lookup = spread.lookup_original_dst
        proxy.lookup = spread.lookup_original_dst
        spread.load()
        spread.set_meshed([(GHOST_IP, 0)])
        targets = [(GHOST_IP, 20000 + i) for i in range(40)]
        first = run_client(topo.pod_cg, targets)
        again = run_client(topo.pod_cg, targets)
        names = {"proxy", *(x.name for x in extra)}
        assert all(r.get("answer") in names for r in first + again), (first + again)[:3]
        assert [r["answer"] for r in first] == [r["answer"] for r in again]  # one listener per destination
        assert len({r["answer"] for r in first}) >= 3, {r["answer"] for r in first}  # 40 destinations, 4 ports
        accepted = [a for x in (proxy, *extra) for a in wait_accepted(x, 0)]
        assert len(accepted) == 2 * len(targets)
        assert all(a.orig is not None and a.claimed == f"{a.orig[0]}:{a.orig[1]}" for a in accepted)
        # dialing a spread listener itself is not redirected (the proxy is never a destination)
        spread.set_meshed([(GHOST_IP, 0), (HOST_IP, 0)])
        [direct] = run_client(topo.pod_cg, [(HOST_IP, extra[0].port)])
        assert direct.get("answer") == extra[0].name, direct
    finally:
        spread.close()
        for x in extra:
            x.stop()
