"""Pinning/adoption, fail-fast, getpeername4 transparency and the sockmap shortcut, on a real
cgroup v2 subtree and pod netns (no lab): the loader alone, with bpftool as the witness.

Topology (names carry the lab instance so parallel runs on other instances never collide):

    <cg2>/<P>/node          <- RedirectPrograms attaches here
    <cg2>/<P>/node/pod      <- clients (also in netns <P>-pod)
    <cg2>/<P>/node/proxy    <- exempt: the "node proxy" subprocess (inside the node subtree, as
                               the agent is, so sock_ops sees its accepted sockets)
    netns <P>-pod: <P>p 10.254.(80+i).2/24  <-veth->  <P>h 10.254.(80+i).1/24 (root netns)
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from nodemesh.agent import bpf_pins
from nodemesh.agent.bpf_loader import CGROUP_PROGRAMS, COUNTER_NAMES, ProgramRejected, RedirectPrograms
from nodemesh.cgroups import cgroup2_mount
from nodemesh.lab import cgroup_tree
from nodemesh.lab.topology import INSTANCE

from .labtools import add_pod_netns, remove_pod_netns

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: builds netns, veth, cgroups and loads BPF"),
]

P = f"nmt{INSTANCE}acc"
NETNS = f"{P}-pod"
VETH_HOST, VETH_POD = f"{P}h", f"{P}p"
NET = f"10.254.{80 + INSTANCE}"
HOST_IP, POD_IP = f"{NET}.1", f"{NET}.2"
GHOST_IP = f"{NET}.99"  # owned by nobody: only a redirect can answer
PIN_DIR = f"/sys/fs/bpf/{P}/node"

# The "node proxy": echoes every connection (sha256 of what it read back on EOF when asked).
PROXY = r"""
import socket, sys, threading, hashlib
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], 0)); s.listen(512)
print(s.getsockname()[1], flush=True)
def serve(c):
    with c:
        mode = c.recv(1)
        if mode == b"H":  # hash mode: read to EOF, answer the sha256
            h = hashlib.sha256()
            while True:
                b = c.recv(65536)
                if not b: break
                h.update(b)
            c.sendall(h.hexdigest().encode())
        else:  # echo mode
            while True:
                b = c.recv(65536)
                if not b: break
                c.sendall(b)
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""

# Client in the pod: dials, reports getpeername(), echoes N messages or streams M bytes.
CLIENT = r"""
import json, socket, sys, hashlib, os
ip, port, mode, n = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
c = socket.create_connection((ip, port), timeout=5)
out = {"peer": list(c.getpeername())}
if mode == "echo":
    ok = 0
    for i in range(n):
        msg = f"m{i:06d}".encode() * 10
        c.sendall(b"E" + msg if i == 0 else msg)
        want = len(msg)  # the mode byte is not echoed
        got = b""
        while len(got) < want:
            got += c.recv(want - len(got))
        ok += got.endswith(msg)
    out["ok"] = ok
else:
    h = hashlib.sha256(); chunk = os.urandom(65536); c.sendall(b"H"); sent = 0
    while sent < n:
        c.sendall(chunk); h.update(chunk); sent += len(chunk)
    c.shutdown(socket.SHUT_WR)
    out["match"] = c.recv(100).decode() == h.hexdigest()
c.close()
print(json.dumps(out))
"""


@dataclass
class Topo:
    base_cg: str
    node_cg: str
    pod_cg: str
    proxy_cg: str


def _cleanup(base_cg: str) -> None:
    cgroup_tree.kill(base_cg)
    for _ in range(50):
        try:
            cgroup_tree.remove(base_cg)
            break
        except OSError:  # EBUSY while the killed processes are reaped
            time.sleep(0.05)
    remove_pod_netns(NETNS, VETH_HOST)
    subprocess.run(["rm", "-rf", os.path.dirname(PIN_DIR)], check=False)


@pytest.fixture
def topo() -> Iterator[Topo]:
    base = os.path.join(cgroup2_mount(), P)
    _cleanup(base)
    t = Topo(base, os.path.join(base, "node"), os.path.join(base, "node", "pod"), os.path.join(base, "node", "proxy"))
    try:
        os.makedirs(t.pod_cg)
        os.makedirs(t.proxy_cg)
        add_pod_netns(NETNS, VETH_HOST, VETH_POD, HOST_IP, POD_IP)
        yield t
    finally:
        _cleanup(base)


def _in_cgroup(cgroup: str):  # type: ignore[no-untyped-def]
    def preexec() -> None:
        with open(os.path.join(cgroup, "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))

    return preexec


@pytest.fixture
def proxy_port(topo: Topo) -> Iterator[int]:
    proc = subprocess.Popen([sys.executable, "-c", PROXY, HOST_IP], stdout=subprocess.PIPE, text=True,
                            preexec_fn=_in_cgroup(topo.proxy_cg))
    try:
        assert proc.stdout is not None
        yield int(proc.stdout.readline())
    finally:
        proc.kill()
        proc.wait()


def client(topo: Topo, ip: str, port: int, mode: str = "echo", n: int = 1) -> dict:
    out = subprocess.run(["nsenter", f"--net=/run/netns/{NETNS}", sys.executable, "-c", CLIENT, ip, str(port), mode, str(n)],
                         preexec_fn=_in_cgroup(topo.pod_cg), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def load(topo: Topo, port: int, **kwargs: object) -> RedirectPrograms:
    progs = RedirectPrograms(topo.node_cg, HOST_IP, port, exempt_cgroup_paths=[topo.proxy_cg], **kwargs)  # type: ignore[arg-type]
    progs.load()
    return progs


# -- tests ------------------------------------------------------------------------------------


def test_getpeername_shows_the_dialed_address_not_the_proxy(topo, proxy_port) -> None:
    progs = load(topo, proxy_port)
    try:
        progs.set_meshed([(GHOST_IP, 80)])
        result = client(topo, GHOST_IP, 80)
        assert result["ok"] == 1  # reached the proxy (nothing else answers GHOST_IP)
        assert result["peer"] == [GHOST_IP, 80]
        assert progs.counters()["peername_restored"] >= 1
        # A connection that was not redirected keeps its real peer.
        direct = client(topo, HOST_IP, proxy_port)
        assert direct["peer"] == [HOST_IP, proxy_port]
    finally:
        progs.close()


@pytest.mark.parametrize("shortcut", [True, False])
def test_sockmap_shortcut_carries_bytes_intact_and_off_changes_nothing(topo, proxy_port, shortcut) -> None:
    progs = load(topo, proxy_port, shortcut=shortcut)
    try:
        progs.set_meshed([(GHOST_IP, 80)])
        assert client(topo, GHOST_IP, 80, "echo", 200)["ok"] == 200
        assert client(topo, GHOST_IP, 80, "hash", 8 * 1024 * 1024)["match"] is True
        c = progs.counters()
        if shortcut:
            assert c["sockmap_added"] >= 4, c  # both ends of both connections
            assert c["shortcut_msgs"] >= 200 and c["shortcut_bytes"] >= 8 * 1024 * 1024, c
        else:
            assert c["sockmap_added"] == 0 and c["shortcut_msgs"] == 0, c
        assert c["sockmap_full"] == 0
    finally:
        progs.close()


def test_pinned_programs_survive_the_loader_and_a_new_loader_adopts_the_maps(topo, proxy_port) -> None:
    first = load(topo, proxy_port, pin_dir=PIN_DIR)
    first.set_meshed([(GHOST_IP, 80)])
    assert client(topo, GHOST_IP, 80)["peer"] == [GHOST_IP, 80]
    redirected = first.counters()["connect_redirected"]
    first.close()  # the agent exits (or is killed): pinned mode leaves everything in place

    assert sorted(os.listdir(os.path.join(PIN_DIR, "progs"))) == sorted([n for n, _, _ in CGROUP_PROGRAMS] + ["nm_redirect", "nm_splice"])
    assert "meshed_dsts" in os.listdir(os.path.join(PIN_DIR, "maps"))
    attached = bpf_pins.attached_to(topo.node_cg)
    assert len(attached) == len(CGROUP_PROGRAMS)
    # Still redirected, with no proxy map user alive: still reaches the proxy listener.
    assert client(topo, GHOST_IP, 80)["ok"] == 1

    second = load(topo, proxy_port, pin_dir=PIN_DIR)
    try:
        assert "meshed_dsts" in second.adopted_maps
        # Adopted, not re-created: the counters continue and the meshed set is still there.
        assert second.counters()["connect_redirected"] >= redirected + 1
        assert client(topo, GHOST_IP, 80)["peer"] == [GHOST_IP, 80]
        new_ids = {p["id"] for p in bpf_pins.attached_to(topo.node_cg)}
        assert new_ids.isdisjoint({p["id"] for p in attached})  # replaced, not stacked
        st = bpf_pins.node_status("node", PIN_DIR, COUNTER_NAMES)
        assert {p.name for p in st.programs if p.attached} == {n for n, _, _ in CGROUP_PROGRAMS} | {"nm_redirect", "nm_splice"}
        assert st.counters["connect_redirected"] == second.counters()["connect_redirected"]
        meshed = next(m for m in st.maps if m.name == "meshed_dsts")
        assert meshed.entries == 1 and meshed.max_entries == 16384
    finally:
        second.close()
    removed = bpf_pins.uninstall(topo.node_cg, PIN_DIR)
    assert removed and not os.path.exists(PIN_DIR)
    assert bpf_pins.attached_to(topo.node_cg) == []
    assert bpf_pins.uninstall(topo.node_cg, PIN_DIR) == []  # idempotent


def test_redirect_with_no_proxy_listening_is_refused_fast(topo) -> None:
    # A port where nothing listens: what pods see while the agent is down.
    with socket.socket() as s:
        s.bind((HOST_IP, 0))
        dead_port = s.getsockname()[1]
    progs = load(topo, dead_port, pin_dir=PIN_DIR)
    progs.set_meshed([(GHOST_IP, 80)])
    progs.close()
    try:
        code = "import socket,time,json\nt=time.monotonic()\ntry:\n socket.create_connection(('%s',80),timeout=5); r='connected'\nexcept Exception as e: r=type(e).__name__\nprint(json.dumps([r,time.monotonic()-t]))" % GHOST_IP
        out = subprocess.run(["nsenter", f"--net=/run/netns/{NETNS}", sys.executable, "-c", code],
                             preexec_fn=_in_cgroup(topo.pod_cg), capture_output=True, text=True, timeout=30, check=True)
        result, elapsed = json.loads(out.stdout)
        assert result == "ConnectionRefusedError" and elapsed < 1.0, (result, elapsed)
    finally:
        bpf_pins.uninstall(topo.node_cg, PIN_DIR)


# Makes a loader CHILD process (agent/bpf_child.py, a new interpreter) compile $NMT_BPF_SRC
# instead of the installed sources: the pinned load's errors are tested across the process boundary.
SITECUSTOMIZE = """
import os
if os.environ.get("NMT_BPF_SRC"):
    from nodemesh.agent import bpf_loader
    bpf_loader._bpf_source_dir = lambda: os.environ["NMT_BPF_SRC"]
"""


@pytest.mark.parametrize("pinned", [False, True], ids=["in-process", "loader-child"])
def test_rejected_program_is_named_with_the_verifier_message(topo, tmp_path, monkeypatch, pinned) -> None:
    from nodemesh.agent import bpf_loader

    src = tmp_path / "bpf"
    (src / "include").mkdir(parents=True)
    real = bpf_loader._bpf_source_dir()
    for name in bpf_loader.SOURCES:
        (src / name).write_text(open(os.path.join(real, name)).read())
    (src / "include" / "maps.h").write_text(open(os.path.join(real, "include", "maps.h")).read())
    # Compiles, but the verifier refuses it: an unbounded read through a map value pointer
    # that may be NULL.
    (src / "getpeername.c").write_text(
        '#include "include/maps.h"\n'
        "int nm_getpeername4(struct bpf_sock_addr *ctx) {\n"
        "    __u64 cookie = bpf_get_socket_cookie(ctx);\n"
        "    struct nm_addr4 *orig = peer_by_cookie.lookup(&cookie);\n"
        "    ctx->user_ip4 = orig->ip4;\n"
        "    return 1;\n}\n"
    )
    monkeypatch.setattr(bpf_loader, "_bpf_source_dir", lambda: str(src))
    if pinned:
        (tmp_path / "site").mkdir()
        (tmp_path / "site" / "sitecustomize.py").write_text(SITECUSTOMIZE)
        monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(tmp_path / "site"), os.environ.get("PYTHONPATH")])))
        monkeypatch.setenv("NMT_BPF_SRC", str(src))
    try:
        with pytest.raises(ProgramRejected) as info:
            load(topo, 4140, pin_dir=PIN_DIR if pinned else None)
        assert info.value.program == "nm_getpeername4"
        assert "invalid mem access" in str(info.value) or "null" in str(info.value).lower(), str(info.value)
        assert info.value.exit_code == 3  # a PreflightError, as the agent exits with it
        assert bpf_pins.attached_to(topo.node_cg) == []  # nothing half-attached
        assert not os.path.isdir(os.path.join(PIN_DIR, "progs")) or os.listdir(os.path.join(PIN_DIR, "progs")) == []
    finally:
        bpf_pins.uninstall(topo.node_cg, PIN_DIR)


def test_pinned_maps_of_another_layout_are_refused_and_nothing_stays_attached(topo, monkeypatch) -> None:
    """The child loads and attaches; if this process then cannot use the pinned maps (a version
    skew between the agent and the loader), it says so and detaches: no redirect without maps."""
    from nodemesh.agent import bpf_loader

    monkeypatch.setitem(bpf_loader.MAP_FORMATS, "splice_bytes", ("=IIII", "=I"))  # 4-byte values; the map has 8
    try:
        with pytest.raises(bpf_loader.BpfUnavailable) as info:
            load(topo, 4140, pin_dir=PIN_DIR)
        assert "splice_bytes" in str(info.value) and "8-byte values" in str(info.value), str(info.value)
        assert bpf_pins.attached_to(topo.node_cg) == []
    finally:
        bpf_pins.uninstall(topo.node_cg, PIN_DIR)


def test_pinned_load_leaves_bcc_to_the_loader_child(topo, proxy_port) -> None:
    """The pinned load compiles in a child: this process gains no libbcc/LLVM mapping (bcc's Python
    module maps libbcc when imported) and yet reads and writes the maps; the sk_msg and sk_skb
    verdicts stay attached to the pinned sockhash maps after the child exits."""
    code = (
        "import json, sys\n"
        "from nodemesh.agent.bpf_loader import RedirectPrograms\n"
        "*args, pin_dir = json.loads(sys.argv[1])\n"
        "p = RedirectPrograms(*args, pin_dir=pin_dir)\n"
        "p.load(); p.set_meshed([(sys.argv[2], 80)])\n"
        "maps = open('/proc/self/maps').read()\n"
        "print(json.dumps({'bcc': 'bcc' in sys.modules, 'libs': sorted({l.split('/')[-1] for l in maps.splitlines() if 'libbcc' in l or 'LLVM' in l or 'clang' in l}),\n"
        "                  'splice_ready': p.splice_ready, 'counters': p.counters()}))\n"
        "p.close()\n"
    )
    args = json.dumps([topo.node_cg, HOST_IP, proxy_port, [topo.proxy_cg], PIN_DIR])
    try:
        out = subprocess.run([sys.executable, "-c", code, args, GHOST_IP], capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        result = json.loads(out.stdout)
        assert result["bcc"] is False and result["libs"] == [], result
        assert result["splice_ready"] is True and "connect_redirected" in result["counters"]
        # The loader child is gone; its verdicts are still attached to the pinned maps.
        st = bpf_pins.node_status("node", PIN_DIR, COUNTER_NAMES)
        attached = {p.name for p in st.programs if p.attached}
        assert {"nm_redirect", "nm_splice"} <= attached, attached
        assert client(topo, GHOST_IP, 80)["peer"] == [GHOST_IP, 80]  # set_meshed through the pinned map took effect
        assert client(topo, GHOST_IP, 80, "hash", 1024 * 1024)["match"] is True  # over the sk_msg shortcut
        assert bpf_pins.read_counters(PIN_DIR, COUNTER_NAMES)["shortcut_bytes"] >= 1024 * 1024
    finally:
        bpf_pins.uninstall(topo.node_cg, PIN_DIR)


CONCURRENT_CLIENT = r"""
import asyncio, json, resource, sys
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 8192), hard))
ip, n = sys.argv[1], int(sys.argv[2])

async def one(port):
    try:
        r, w = await asyncio.wait_for(asyncio.open_connection(ip, port), 20)
        w.write(f"{ip}:{port}\n".encode())
        await w.drain()
        await r.read()  # until the test closes it: all connections are open at once
        w.close()
        return None
    except Exception as e:
        return repr(e)

async def main():
    errors = await asyncio.gather(*(one(10000 + i) for i in range(n)))
    print(json.dumps([e for e in errors if e]))

asyncio.run(main())
"""


def test_2000_concurrent_connects_lose_no_original_destination(topo) -> None:
    import resource
    import threading

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 8192)), hard))
    n = 2000
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((HOST_IP, 0))
    listener.listen(4096)
    progs = load(topo, listener.getsockname()[1])
    accepted: list[tuple[socket.socket, tuple[str, int] | None]] = []

    def accept_loop() -> None:
        listener.settimeout(30)
        while len(accepted) < n:
            try:
                conn, peer = listener.accept()
            except OSError:
                return
            accepted.append((conn, progs.lookup_original_dst(*peer)))  # at accept time, as the proxy does

    thread = threading.Thread(target=accept_loop, daemon=True)
    thread.start()
    try:
        progs.set_meshed([(GHOST_IP, 0)])
        client_proc = subprocess.Popen(["nsenter", f"--net=/run/netns/{NETNS}", sys.executable, "-c", CONCURRENT_CLIENT, GHOST_IP, str(n)],
                                       preexec_fn=_in_cgroup(topo.pod_cg), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        thread.join(timeout=60)
        assert len(accepted) == n
        wrong = []
        for conn, orig in accepted:
            conn.settimeout(10)
            claimed = conn.makefile("rb").readline().decode().strip()
            if orig is None or claimed != f"{orig[0]}:{orig[1]}":
                wrong.append((claimed, orig))
            conn.close()
        out, err = client_proc.communicate(timeout=60)
        assert client_proc.returncode == 0, err
        assert json.loads(out) == []
        assert wrong == [], wrong[:5]
        assert progs.counters()["established_moved"] == n
    finally:
        for conn, _ in accepted:
            conn.close()
        listener.close()
        progs.close()
