"""The standalone lab: simulated nodes (netns + cgroup subtree + agent) and pods on one host.

The same controller and agent code run here as in a cluster; the lab only plays the parts of the
kubelet/CNI (netns, addresses, cgroups, processes) and of the API server (a directory of YAML that
the controller watches).
"""

from __future__ import annotations

import http.client
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from importlib.resources import files
from typing import Any

import yaml

from nodemesh import preflight
from nodemesh.errors import ConfigError, LabError, NodemeshError
from nodemesh.agent import bpf_pins
from nodemesh.lab import cgroup_tree, lab_ca, network, processes, supervisor
from nodemesh.lab.state import LabState, lab_dir, locked, pid_alive
from nodemesh.lab.topology import (
    BPF_PIN_ROOT,
    CGROUP_ROOT_NAME,
    MAX_NODES,
    MAX_PODS_PER_NODE,
    NODE_NETNS_PREFIX,
    POD_NETNS_PREFIX,
    UNDERLAY_BRIDGE,
    UNDERLAY_GATEWAY,
    NodeAddressing,
    PodAddressing,
    next_free,
)
from nodemesh.model import ClusterState, Node, Object, Pod, dump_object, load_file, parse_documents
from nodemesh.nodeconfig import ADMIN_PORT, CONTROLLER_ADMIN_PORT, CONTROLLER_PORT

READY_TIMEOUT = 60.0


def default_lab_file() -> str:
    return str(files("nodemesh") / "labs" / "default.yaml")


def _cluster_file() -> str:
    return os.path.join(lab_dir(), "cluster", "lab.yaml")


def _log(msg: str) -> None:
    print(f"[lab] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Addressing from state


def _node(state: LabState, name: str) -> NodeAddressing:
    return NodeAddressing(name=name, index=int(state.nodes[name]["index"]))


def _pod(state: LabState, ns: str, name: str) -> PodAddressing:
    entry = state.pods[f"{ns}/{name}"]
    return PodAddressing(namespace=ns, name=name, node=_node(state, entry["node"]), index=int(entry["index"]))


def _node_cgroup(state: LabState, node: str) -> str:
    return os.path.join(state.cgroup_root, node)


def _pod_cgroup(state: LabState, pod: PodAddressing) -> str:
    return os.path.join(state.cgroup_root, pod.node.name, "pods", pod.cgroup_name)


def _current_cluster() -> ClusterState:
    try:
        return ClusterState().apply(load_file(_cluster_file()), _cluster_file())
    except ConfigError as exc:
        raise LabError(f"the lab's cluster state is unreadable ({exc}); run `nodemesh lab down`") from None


def _place(state: LabState, objs: Sequence[Object], source: str) -> list[Object]:
    """Assigns node addresses and pod IPs (the kubelet/CNI part), recording them in state."""
    placed: list[Object] = []
    for obj in objs:
        if isinstance(obj, Node):
            if obj.name not in state.nodes:
                used = {int(n["index"]) for n in state.nodes.values()}
                state.nodes[obj.name] = {"index": next_free(used, 1, MAX_NODES, "node")}
            addr = _node(state, obj.name)
            obj = replace(obj, internal_ip=addr.underlay_ip, pod_cidr=addr.pod_cidr)
        placed.append(obj)
    for i, obj in enumerate(placed):
        if isinstance(obj, Pod):
            key = f"{obj.namespace}/{obj.name}"
            if obj.node_name not in state.nodes:
                raise ConfigError(
                    f"node {obj.node_name!r} does not exist (nodes: {', '.join(sorted(state.nodes)) or 'none'})",
                    source=source, obj=f"Pod {key}", field="spec.nodeName",
                )
            if key not in state.pods:
                used = {int(p["index"]) for p in state.pods.values() if p["node"] == obj.node_name}
                state.pods[key] = {"node": obj.node_name, "index": next_free(used, 2, MAX_PODS_PER_NODE + 1, "pod")}
            addr = _pod(state, obj.namespace, obj.name)
            if obj.pod_ip not in (None, addr.ip):
                raise ConfigError(
                    f"the lab assigns pod IPs ({addr.ip} for this pod); remove status.podIP",
                    source=source, obj=f"Pod {key}", field="status.podIP",
                )
            placed[i] = replace(obj, pod_ip=addr.ip)
    return placed


def _write_cluster(cluster: ClusterState) -> None:
    path = _cluster_file()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        yaml.safe_dump_all([dump_object(o) for o in cluster.objects.values()], f, sort_keys=False)
    os.replace(tmp, path)  # atomic: the controller never reads half a file


# ---------------------------------------------------------------------------------------------
# Processes


def _start(state: LabState, pid_key: str, role: str, argv: list[str], netns: str | None, cgroup: str, env: dict[str, str] | None = None) -> None:
    logdir = os.path.join(lab_dir(), "logs")
    os.makedirs(logdir, exist_ok=True)
    log_path = os.path.join(logdir, f"{pid_key.replace('/', '_')}.log")
    with open(log_path, "ab") as log:
        proc = processes.spawn(argv, netns=netns, cgroup=cgroup, env=env, log=log)
    state.processes[pid_key] = {"pid": proc.pid, "role": role, "log": log_path}
    state.save()


def _nodemesh_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "nodemesh", *args]


def _start_controller(state: LabState) -> None:
    cg = os.path.join(state.cgroup_root, "controller")
    cgroup_tree.make(cg)
    argv = _nodemesh_argv(
        "controller", "run",
        "--state-dir", os.path.dirname(_cluster_file()),
        "--listen", f"{UNDERLAY_GATEWAY}:{CONTROLLER_PORT}",
        "--admin", f"{UNDERLAY_GATEWAY}:{CONTROLLER_ADMIN_PORT}",
        "--tokens-file", os.path.join(lab_dir(), "tokens.json"),
    )
    if os.path.isdir(lab_ca.ca_dir()):  # the controller is the mesh CA; the stream is mTLS
        argv += ["--ca-dir", lab_ca.ca_dir()]
        if lab_ca.leaf_lifetime():
            argv += ["--leaf-lifetime", lab_ca.leaf_lifetime() or ""]
    _start(state, "controller", "controller", argv, None, cg)


def _start_agent(state: LabState, name: str) -> None:
    node = _node(state, name)
    node_cg = _node_cgroup(state, name)
    agent_cg = os.path.join(node_cg, "agent")
    cgroup_tree.make(agent_cg)
    argv = _nodemesh_argv(
        "agent", "run",
        "--node", name,
        "--controller", f"{UNDERLAY_GATEWAY}:{CONTROLLER_PORT}",
        "--token-file", os.path.join(lab_dir(), "tokens", name),
        "--cgroup", node_cg,
        "--agent-cgroup", agent_cg,
        "--proxy-ip", node.gateway_ip,
        "--inbound-ip", node.underlay_ip,
        "--admin", f"0.0.0.0:{ADMIN_PORT}",
        "--bpf-pin-dir", os.path.join(BPF_PIN_ROOT, name),
    )
    if os.environ.get("NODEMESH_LAB_SOCKMAP", "0") == "1":  # the sockmap shortcut (off by default, see AgentConfig.sockmap)
        argv.append("--sockmap")
    if os.environ.get("NODEMESH_LAB_SPLICE", "0") == "1":  # the kernel splice (off by default, see AgentConfig.splice)
        argv.append("--splice")
    redirect = os.environ.get("NODEMESH_LAB_REDIRECT", "")  # "iptables": the nftables fallback mode
    if redirect:
        if redirect not in ("auto", "bpf", "iptables"):
            raise LabError(f"NODEMESH_LAB_REDIRECT={redirect!r} is not a redirect mode: use auto, bpf or iptables")
        argv += ["--redirect", redirect]
    if os.path.isdir(lab_ca.ca_dir()):  # mTLS: the agent gets the trust anchor only, never the issuer key
        argv += ["--trust-anchor", os.path.join(lab_ca.ca_dir(), "trust-anchor.pem"), "--identity-dir", lab_ca.identity_dir(name)]
    _start(state, f"agent/{name}", "agent", argv, node.netns, agent_cg)


def _start_pod(state: LabState, pod: Pod) -> None:
    addr = _pod(state, pod.namespace, pod.name)
    cg = _pod_cgroup(state, addr)
    for c in pod.containers:
        argv = list(c.command) + list(c.args)
        if not argv:
            continue
        env = {"POD_NAME": pod.name, "POD_NAMESPACE": pod.namespace, "NODE_NAME": pod.node_name, "POD_IP": addr.ip, **c.env}
        _start(state, f"pod/{pod.namespace}/{pod.name}/{c.name}", "pod", argv, addr.netns, cg, env)


def http_get(host: str, port: int, path: str, timeout: float = 1.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def _ready(host: str, port: int) -> tuple[bool, str]:
    try:
        status, body = http_get(host, port, "/ready", timeout=0.5)
    except OSError as exc:
        return False, str(exc)
    return status == 200, body.decode(errors="replace").strip()


def _wait_ready(state: LabState, what: str, host: str, port: int, pid_key: str, deadline: float) -> None:
    reason = ""
    while time.monotonic() < deadline:
        ok, reason = _ready(host, port)
        if ok:
            return
        proc = state.processes.get(pid_key)
        if proc and not pid_alive(int(proc["pid"])):
            raise LabError(f"{what} exited during start-up; its log: {proc['log']}\n{_tail(proc['log'])}")
        time.sleep(0.1)
    log = state.processes.get(pid_key, {}).get("log", "")
    raise LabError(f"{what} did not become ready within {READY_TIMEOUT:.0f} s ({reason}); its log: {log}\n{_tail(log)}")


def _tail(path: str, lines: int = 15) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""


# ---------------------------------------------------------------------------------------------
# Commands


def up(lab_file: str | None = None, ca_files: tuple[str | None, str | None, str | None] = (None, None, None),
       leaf_lifetime: float | None = None) -> LabState:
    """Creates the lab and returns once every agent is ready. Refuses if a lab is running.
    mTLS (identity issue): the CA is generated, or taken from `ca_files` (trust anchor, issuer
    cert, issuer key); NODEMESH_LAB_MTLS=0 runs the plaintext mesh instead."""
    preflight.require()
    lab_file = lab_file or default_lab_file()
    objs = load_file(lab_file)  # parse errors surface before anything is created
    with locked():
        existing = LabState.load()
        if existing is not None:
            ctl = existing.processes.get("controller")
            if existing.status == "up" and ctl and pid_alive(int(ctl["pid"])):
                raise LabError(f"a lab is already up (from {existing.lab_file}); run `nodemesh lab down` first")
            _log("cleaning up what a previous lab left behind")
            _teardown(existing)
        from nodemesh.cgroups import cgroup2_mount

        state = LabState(lab_file=os.path.abspath(lab_file), cgroup_root=os.path.join(cgroup2_mount(), CGROUP_ROOT_NAME))
        try:
            cluster = ClusterState().apply(_place(state, objs, lab_file), lab_file)
        except ConfigError:
            raise
        if not cluster.nodes:
            raise ConfigError("defines no Node; a lab needs at least one", source=lab_file)
        shutil.rmtree(os.path.join(lab_dir(), "logs"), ignore_errors=True)
        if os.environ.get("NODEMESH_LAB_MTLS", "1") != "0":
            lab_ca.prepare(ca_files, leaf_lifetime)  # bad PEM files fail here, before anything exists
        state.save()
        try:
            _create(state, cluster)
        except BaseException:
            _log("start-up failed; removing what was created")
            _teardown(state)
            raise
        return state


def _create(state: LabState, cluster: ClusterState) -> None:
    nodes = [_node(state, n.name) for n in cluster.nodes]
    network.ensure_underlay()
    if network.forward_rule_needed():
        state.forward_rule = True
        state.save()
        network.add_forward_rule()
    cgroup_tree.make(state.cgroup_root)
    tokens = {}
    os.makedirs(os.path.join(lab_dir(), "tokens"), mode=0o700, exist_ok=True)
    for node in nodes:
        network.create_node(node)
        cgroup_tree.make(os.path.join(_node_cgroup(state, node.name), "pods"))
        tokens[node.name] = secrets.token_hex(32)
        token_path = os.path.join(lab_dir(), "tokens", node.name)
        with open(os.open(token_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w", encoding="ascii") as f:
            f.write(tokens[node.name])
    for node in nodes:
        network.set_node_routes(node, nodes)
    for pod in cluster.pods:
        addr = _pod(state, pod.namespace, pod.name)
        network.create_pod(addr)
        cgroup_tree.make(_pod_cgroup(state, addr))
    tokens_path = os.path.join(lab_dir(), "tokens.json")
    with open(os.open(tokens_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w", encoding="ascii") as f:
        json.dump(tokens, f)
    _write_cluster(cluster)

    deadline = time.monotonic() + READY_TIMEOUT
    _start_controller(state)
    _wait_ready(state, "the controller", UNDERLAY_GATEWAY, CONTROLLER_ADMIN_PORT, "controller", deadline)
    for node in nodes:
        _start_agent(state, node.name)
    for node in nodes:
        _wait_ready(state, f"the agent of {node.name}", node.underlay_ip, ADMIN_PORT, f"agent/{node.name}", deadline)
    # Pods start once their node's agent redirects (as a CNI-ready node would admit them).
    for pod in cluster.pods:
        _start_pod(state, pod)
    _wait_pods_serving(state, cluster.pods, deadline)
    state.status = "up"
    state.save()
    supervisor.start(state)  # restarts a dead agent, as a DaemonSet would


_TCP_PROBE = """
import socket, sys, time
deadline = time.monotonic() + float(sys.argv[1])
waiting = [(a.rsplit(":", 1)[0], int(a.rsplit(":", 1)[1])) for a in sys.argv[2:]]
while waiting and time.monotonic() < deadline:
    addr = waiting[0]
    try:
        socket.create_connection(addr, timeout=0.5).close()
        waiting.pop(0)
    except OSError:
        time.sleep(0.05)
print(" ".join(f"{h}:{p}" for h, p in waiting))
"""


def _wait_pods_serving(state: LabState, pods: Sequence[Pod], deadline: float) -> None:
    """A readiness probe for declared container ports (TCP connect, as a kubelet tcpSocket probe), so
    `lab up` returns when the sample services answer. Probed from each node's netns: the node's own
    connections are neither redirected (not in the node cgroup) nor captured (locally generated)."""
    by_node: dict[str, list[str]] = {}
    for pod in pods:
        addr = _pod(state, pod.namespace, pod.name)
        for c in pod.containers:
            if c.command or c.args:
                by_node.setdefault(addr.node.name, []).extend(f"{addr.ip}:{p.container_port}" for p in c.ports)
    for name, targets in by_node.items():
        left = max(1.0, deadline - time.monotonic())
        out = processes.run([sys.executable, "-c", _TCP_PROBE, str(left), *targets], netns=_node(state, name).netns,
                            cgroup=None, capture=True, timeout=left + 10)
        still = out.stdout.decode().strip()
        if still:
            raise LabError(f"pods on {name} did not accept connections within {READY_TIMEOUT:.0f} s: {still}; "
                           f"see the pod logs in {os.path.join(lab_dir(), 'logs')}")


def down() -> list[str]:
    """Removes everything any lab made, idempotently, with or without a state file."""
    with locked():
        state = LabState.load() or LabState(status="absent")
        return _teardown(state)


def _teardown(state: LabState) -> list[str]:
    removed: list[str] = []
    from nodemesh.cgroups import cgroup2_mount

    try:
        cg_root = state.cgroup_root or os.path.join(cgroup2_mount(), CGROUP_ROOT_NAME)
    except Exception:  # no cgroup2: nothing of ours can exist there
        cg_root = ""
    supervisor.stop(state)  # first: it must not restart the agents stopped below
    # Agents first and gently (they close their connections); their BPF stays pinned: removed below.
    agents = [int(p["pid"]) for p in state.processes.values() if p.get("role") == "agent"]
    for pid in agents:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 3
    while any(pid_alive(p) for p in agents) and time.monotonic() < deadline:
        time.sleep(0.05)
    for node in state.nodes:
        try:
            removed += bpf_pins.uninstall(os.path.join(cg_root, node) if cg_root else "", os.path.join(BPF_PIN_ROOT, node))
        except NodemeshError as exc:  # the cgroup and pins are removed below anyway
            _log(f"could not uninstall the BPF programs of {node}: {exc}")
    if cg_root and os.path.isdir(cg_root):
        if not cgroup_tree.kill(cg_root):
            _log(f"some processes in {cg_root} did not die")
        removed.append(f"processes in {cg_root}")
    for pid in (int(p["pid"]) for p in state.processes.values()):
        if pid_alive(pid):  # started but never made it into the cgroup
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    for ns in network.list_netns((POD_NETNS_PREFIX, NODE_NETNS_PREFIX)):
        network.delete_netns(ns)
        removed.append(f"netns {ns}")
    for node in state.nodes:
        with_idx = _node(state, node)
        network.delete_link(with_idx.underlay_veth)
    if network.link_exists(UNDERLAY_BRIDGE):
        network.delete_link(UNDERLAY_BRIDGE)
        removed.append(f"bridge {UNDERLAY_BRIDGE}")
    if state.forward_rule:
        network.remove_forward_rule()
    if cg_root and os.path.isdir(cg_root):
        for _ in range(50):
            try:
                cgroup_tree.remove(cg_root)
                break
            except OSError:  # EBUSY while the last killed processes are reaped
                time.sleep(0.05)
        removed.append(f"cgroup {cg_root}")
    if os.path.isdir(BPF_PIN_ROOT):
        shutil.rmtree(BPF_PIN_ROOT, ignore_errors=True)
        removed.append(f"pinned BPF objects under {BPF_PIN_ROOT}")
    for leftover in ("cluster", "tokens", "tokens.json", "ca", "identity"):
        path = os.path.join(lab_dir(), leftover)
        if os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        elif os.path.exists(path):
            os.unlink(path)
    LabState.remove()
    return removed


def require_up() -> LabState:
    state = LabState.load()
    if state is None or state.status != "up":
        raise LabError("no lab is up; start one with `nodemesh lab up`")
    return state


def status() -> dict[str, Any]:
    state = require_up()
    cluster = _current_cluster()
    nodes = []
    for n in cluster.nodes:
        addr = _node(state, n.name)
        ok, reason = _ready(addr.underlay_ip, ADMIN_PORT)
        nodes.append({
            "name": n.name, "netns": addr.netns, "cgroup": _node_cgroup(state, n.name),
            "internal_ip": addr.underlay_ip, "pod_cidr": addr.pod_cidr,
            "agent_admin": f"{addr.underlay_ip}:{ADMIN_PORT}", "ready": ok, "reason": "" if ok else reason,
        })
    pods = [
        {"namespace": p.namespace, "name": p.name, "node": p.node_name, "ip": p.pod_ip, "labels": dict(p.labels),
         "netns": _pod(state, p.namespace, p.name).netns}
        for p in cluster.pods
    ]
    services = [
        {"namespace": s.namespace, "name": s.name, "cluster_ip": s.cluster_ip,
         "ports": [f"{p.port}->{p.target_port}/{p.protocol}" for p in s.ports]}
        for s in cluster.services
    ]
    return {"lab_file": state.lab_file, "controller": f"{UNDERLAY_GATEWAY}:{CONTROLLER_PORT}", "nodes": nodes, "pods": pods, "services": services}


def resolve_pod(ref: str) -> tuple[LabState, PodAddressing]:
    state = require_up()
    if "/" in ref:
        matches = [ref] if ref in state.pods else []
    else:
        matches = [k for k in state.pods if k.split("/", 1)[1] == ref]
    if not matches:
        raise LabError(f"no pod {ref!r} in the lab (pods: {', '.join(sorted(state.pods))})")
    if len(matches) > 1:
        raise LabError(f"pod name {ref!r} is ambiguous ({', '.join(matches)}): use NAMESPACE/NAME")
    ns, name = matches[0].split("/", 1)
    return state, _pod(state, ns, name)


def exec_in(ref: str, argv: Sequence[str], capture: bool = False, timeout: float | None = None) -> subprocess.CompletedProcess[bytes]:
    """Runs a command inside a pod: its netns and its cgroup (so the mesh sees it as the pod)."""
    state, pod = resolve_pod(ref)
    env = {"POD_NAME": pod.name, "POD_NAMESPACE": pod.namespace, "NODE_NAME": pod.node.name, "POD_IP": pod.ip}
    try:
        return processes.run(argv, netns=pod.netns, cgroup=_pod_cgroup(state, pod), env=env, capture=capture, timeout=timeout)
    except FileNotFoundError as exc:
        raise LabError(f"cannot run {argv[0]!r} in pod {ref}: {exc.strerror}") from None


def spawn_in(ref: str, argv: Sequence[str], log: Any = None) -> subprocess.Popen[bytes]:
    """Starts a long-running command inside a pod (its netns and cgroup, so `lab down` reaps it)."""
    state, pod = resolve_pod(ref)
    env = {"POD_NAME": pod.name, "POD_NAMESPACE": pod.namespace, "NODE_NAME": pod.node.name, "POD_IP": pod.ip}
    return processes.spawn(argv, netns=pod.netns, cgroup=_pod_cgroup(state, pod), env=env, log=log)


def apply(path: str) -> list[str]:
    """Creates or updates objects from a file; new pods get a netns, an IP and their processes."""
    if path == "-":
        objs = parse_documents(sys.stdin.read(), "<stdin>")
    else:
        objs = load_file(path)
    with locked():
        state = require_up()
        current = _current_cluster()
        new_nodes = [o.name for o in objs if isinstance(o, Node) and o.name not in state.nodes]
        if new_nodes:
            raise LabError(f"adding nodes ({', '.join(new_nodes)}) to a running lab is not supported; add them to the lab file and run `lab down` + `lab up`")
        before = dict(state.pods)
        trial = LabState(**{**state.__dict__, "pods": dict(state.pods)})
        placed = _place(trial, objs, path)
        new_cluster = current.apply(placed, path)  # raises before anything changes
        state.pods = trial.pods
        state.save()
        new_pods = [p for p in new_cluster.pods if f"{p.namespace}/{p.name}" not in before]
        for pod in new_pods:
            addr = _pod(state, pod.namespace, pod.name)
            network.create_pod(addr)
            cgroup_tree.make(_pod_cgroup(state, addr))
        _write_cluster(new_cluster)
        for pod in new_pods:
            _start_pod(state, pod)
        changes = []
        for o in placed:
            old = current.objects.get((o.kind, o.namespace, o.name))
            verb = "created" if old is None else ("unchanged" if old == o else "configured")
            changes.append(f"{o.kind.lower()}/{o.name} {verb}")
        return changes
