"""`nodemesh authz POD [--from CLIENT]`: which servers, policies and default apply to a pod, and
would a client be allowed, by which rule. The explanation uses the controller's own functions and
the proxies' own decision (nodemesh.authz.authorize), so it cannot drift from what is enforced.

Exit codes with --from: 0 allowed on every port asked about, 1 denied on at least one.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import click

from nodemesh.authz import Authorization, ClientInfo, NodePolicy, PodPolicy, authorize
from nodemesh.errors import ConfigError, LabError, NodemeshError
from nodemesh.model import ClusterState, Pod, load_file, spiffe_id
from nodemesh.policy_model import DEFAULT_POLICIES
from nodemesh.table import render


@dataclass(frozen=True)
class Client:
    info: ClientInfo
    label: str


def find_pod(state: ClusterState, ref: str) -> Pod:
    if "/" in ref:
        ns, name = ref.split("/", 1)
        pod = state.get("Pod", ns, name)
        matches = [pod] if pod is not None else []
    else:
        matches = [p for p in state.pods if p.name == ref]
    if len(matches) != 1:
        known = ", ".join(f"{p.namespace}/{p.name}" for p in state.pods) or "none"
        why = "is ambiguous; use namespace/name" if matches else "does not exist"
        raise LabError(f"pod {ref!r} {why} (pods: {known})")
    return matches[0]


def parse_client(state: ClusterState, ref: str, ip: str | None) -> Client:
    """A pod (ns/name or name), a SPIFFE ID, namespace/serviceaccount, or `unauthenticated`."""
    if ref == "unauthenticated":
        return Client(ClientInfo(None, ip or "0.0.0.0"), f"unauthenticated client {ip or '0.0.0.0'}")
    if ref.startswith("spiffe://"):
        return Client(ClientInfo(ref, ip or "0.0.0.0"), ref)
    pods = [p for p in state.pods if f"{p.namespace}/{p.name}" == ref or p.name == ref]
    if len(pods) == 1:
        p = pods[0]
        return Client(ClientInfo(p.identity(state.trust_domain), ip or p.pod_ip or "0.0.0.0"), f"pod {p.namespace}/{p.name} ({p.identity(state.trust_domain)})")
    if "/" in ref:
        ns, sa = ref.split("/", 1)
        ident = spiffe_id(ns, sa, state.trust_domain)
        return Client(ClientInfo(ident, ip or "0.0.0.0"), ident)
    raise LabError(f"--from {ref!r} is neither a pod, a SPIFFE ID, namespace/serviceaccount nor 'unauthenticated'")


def _requires(a: Authorization) -> str:
    parts = [" or ".join(ids) for ids in a.identity_sets] + [" or ".join(n.cidr for n in nets) for nets in a.network_sets]
    return " and ".join(f"({p})" if len(a.identity_sets) + len(a.network_sets) > 1 else p for p in parts) or "any client"


def describe(pp: PodPolicy, node: str) -> str:
    lines = [f"pod {pp.namespace}/{pp.name} on {node} ({pp.ip})", f"default policy: {pp.default} ({pp.default_source}) for ports no Server selects"]
    if not pp.servers:
        lines.append("servers: none")
        return "\n".join(lines)
    rows = []
    for s in pp.servers:
        if not s.authorizations and not s.routes and s.access_policy == "deny":
            rows.append((s.name, s.port, s.protocol, "-", "-", "nobody (no AuthorizationPolicy)"))
        if s.access_policy != "deny":
            rows.append((s.name, s.port, s.protocol, "accessPolicy", "Server", s.access_policy))
        for a in s.authorizations:
            rows.append((s.name, s.port, s.protocol, a.name, a.target_kind, _requires(a)))
        for r in s.routes:
            for a in r.authorizations:
                rows.append((s.name, s.port, s.protocol, a.name, f"HTTPRoute {r.route}", _requires(a)))
    lines += ["", render(("SERVER", "PORT", "PROTOCOL", "POLICY", "TARGET", "ALLOWS"), rows)]
    return "\n".join(lines)


def explain(state: ClusterState, pod_ref: str, client_ref: str | None, ip: str | None, ports: tuple[int, ...], cluster_default: str) -> tuple[str, bool]:
    """The text to print and whether every asked port allows the client (True without --from)."""
    from nodemesh.controller.policy import node_policy

    pod = find_pod(state, pod_ref)
    if pod.pod_ip is None:
        raise LabError(f"pod {pod.namespace}/{pod.name} has no IP yet, so no proxy enforces policy for it")
    policy: NodePolicy = node_policy(state, pod.node_name, cluster_default)
    pp = policy.pod(pod.namespace, pod.name)
    if pp is None:
        return f"pod {pod.namespace}/{pod.name} is not meshed: no node proxy authorizes its traffic", True
    text = describe(pp, pod.node_name)
    if client_ref is None:
        return text, True
    client = parse_client(state, client_ref, ip)
    asked = ports or tuple(sorted({s.port for s in pp.servers} | {cp.container_port for c in pod.containers for cp in c.ports})) or (0,)
    ok = True
    out = [text, "", f"from {client.label}:"]
    for port in asked:
        if port == 0:
            out.append("  no ports known: pass --port")
            ok = False
            continue
        d = authorize(policy, client.info, pod.namespace, pod.name, port)
        ok = ok and d.allowed
        out.append(f"  port {port}: {'ALLOW' if d.allowed else 'DENY'}: {d.reason}")
    return "\n".join(out), ok


def _lab_state() -> ClusterState:
    from nodemesh.lab import lab

    lab.require_up()
    return lab._current_cluster()


@click.command("authz")
@click.argument("pod")
@click.option("--from", "client", help="Client: a pod, a SPIFFE ID, namespace/serviceaccount, or 'unauthenticated'.")
@click.option("--ip", help="Client address (default: the client pod's IP) for network-based rules.")
@click.option("--port", "ports", type=click.IntRange(1, 65535), multiple=True, help="Port(s) to check (default: every known port).")
@click.option("-f", "--file", "path", type=click.Path(dir_okay=False), help="Explain from a YAML file instead of the running lab.")
@click.option("--cluster-default", default="all-unauthenticated", show_default=True, type=click.Choice(DEFAULT_POLICIES),
              help="The controller's --default-inbound-policy.")
def command(pod: str, client: str | None, ip: str | None, ports: tuple[int, ...], path: str | None, cluster_default: str) -> None:
    """Explain the authorization policy of POD, or whether --from CLIENT would be allowed and why."""
    try:
        state = ClusterState().apply(load_file(path), path) if path else _lab_state()
        text, ok = explain(state, pod, client, ip, ports, cluster_default)
    except (ConfigError, NodemeshError) as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    click.echo(text)
    sys.exit(0 if ok else 1)
