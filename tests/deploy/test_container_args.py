"""The controller Deployment's and agent DaemonSet's container args are parsed by the real click
commands (without running them), and every path they name is one the pod spec mounts: flags and
manifests cannot drift apart again. Helm and kustomize render the same args (test_manifests)."""

from __future__ import annotations

import os
import re
from typing import Any

import click
import pytest

from nodemesh.cli import check_controller_options, cli
from nodemesh.controller.ca import ANCHOR_FILE, ISSUER_FILE, ISSUER_KEY_FILE
from nodemesh.install import Identity, InstallOptions, render

PEM_CERT = "-----BEGIN CERTIFICATE-----\nMIIBfake\n-----END CERTIFICATE-----\n"
PEM_KEY = "-----BEGIN PRIVATE KEY-----\nMIGfake\n-----END PRIVATE KEY-----\n"
VARIANTS = {
    "default": InstallOptions(),
    "identity": InstallOptions(identity=Identity(PEM_CERT, PEM_CERT, PEM_KEY)),
    "ha-custom": InstallOptions(namespace="mesh-system", trust_domain="example.org", ha=True, pods_cgroup="kubepods",
                                identity=Identity(PEM_CERT, PEM_CERT, PEM_KEY)),
}
# What the downward API would hand the kubelet for $(VAR) expansion.
FIELD_VALUES = {"spec.nodeName": "node-a", "status.hostIP": "192.0.2.10", "metadata.namespace": "nodemesh"}


def workload(objs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (obj,) = [o for o in objs if o["kind"] == kind]
    return obj["spec"]["template"]["spec"]


def expand(container: dict[str, Any]) -> list[str]:
    """The args as the kubelet runs them: $(VAR) from the container's env; an undefined one fails."""
    env = {}
    for e in container.get("env", []):
        env[e["name"]] = e["value"] if "value" in e else FIELD_VALUES[e["valueFrom"]["fieldRef"]["fieldPath"]]

    def sub(m: re.Match[str]) -> str:
        assert m.group(1) in env, f"$({m.group(1)}) in the args is not in the container's env"
        return env[m.group(1)]
    return [re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", sub, a) for a in container["args"]]


def parse(args: list[str]) -> click.Context:
    """`nodemesh GROUP CMD ...` through the real parsers: unknown flags, bad values and missing
    required options raise click errors here, as they would at container start."""
    group = cli.commands[args[0]]
    assert isinstance(group, click.Group)
    cmd = group.commands[args[1]]
    return cmd.make_context(args[1], args[2:], resilient_parsing=False)


def mounted(spec: dict[str, Any], path: str) -> tuple[dict[str, Any], str]:
    """The volume whose mount holds `path`, and the path inside it; fails if nothing mounts it."""
    container = spec["containers"][0]
    best = max((m for m in container.get("volumeMounts", []) if path == m["mountPath"] or path.startswith(m["mountPath"].rstrip("/") + "/")),
               key=lambda m: len(m["mountPath"]), default=None)
    assert best is not None, f"{path} is in the args but no volume is mounted there"
    (volume,) = [v for v in spec.get("volumes", []) if v["name"] == best["name"]]
    return volume, os.path.relpath(path, best["mountPath"])


@pytest.mark.parametrize("variant", VARIANTS)
def test_controller_deployment_args_parse_with_the_real_cli(variant: str) -> None:
    o = VARIANTS[variant]
    objs = render(o)
    spec = workload(objs, "Deployment")
    ctx = parse(expand(spec["containers"][0]))
    p = ctx.params
    check_controller_options(p["source_kind"], p["state_dir"], p["agent_auth"], p["tokens_file"], p["agent_service_account"])
    assert (p["source_kind"], p["agent_auth"], p["tokens_file"]) == ("kubernetes", "tokenreview", None)
    assert p["trust_domain"] == o.trust_domain
    assert p["listen"][1] == next(pt["containerPort"] for pt in spec["containers"][0]["ports"] if pt["name"] == "stream")
    assert p["admin"][1] == next(pt["containerPort"] for pt in spec["containers"][0]["ports"] if pt["name"] == "admin-http")
    # the agents' service account and token audience are the ones the DaemonSet really uses
    agent = workload(objs, "DaemonSet")
    assert p["agent_service_account"] == f"{o.namespace}/{agent['serviceAccountName']}"
    token_volume, token_file = mounted(agent, parse(expand(agent["containers"][0])).params["token_file"])
    (source,) = token_volume["projected"]["sources"]
    assert source["serviceAccountToken"]["audience"] == p["token_audience"]
    assert source["serviceAccountToken"]["path"] == token_file
    # the CA directory holds the files load_ca_dir reads, from the issuer Secret
    if o.identity is None:
        assert p["ca_dir"] is None
    else:
        volume, rel = mounted(spec, p["ca_dir"])
        assert rel == "." and {i["path"] for i in volume["secret"]["items"]} == {ANCHOR_FILE, ISSUER_FILE, ISSUER_KEY_FILE}
        assert {i["key"] for i in volume["secret"]["items"]} <= set(next(x for x in objs if x["kind"] == "Secret")["stringData"])


@pytest.mark.parametrize("variant", VARIANTS)
def test_agent_daemonset_args_parse_with_the_real_cli(variant: str) -> None:
    o = VARIANTS[variant]
    spec = workload(render(o), "DaemonSet")
    container = spec["containers"][0]
    p = parse(expand(container)).params
    assert p["node"] == FIELD_VALUES["spec.nodeName"] and p["proxy_ip"] == FIELD_VALUES["status.hostIP"]
    assert p["controller_addr"] == ("nodemesh-controller", 8086)
    assert p["admin"][1] == next(pt["containerPort"] for pt in container["ports"] if pt["name"] == "admin-http")
    assert p["trust_domain"] == o.trust_domain
    # paths: the node's cgroup2 tree and bpffs from the host; the agent's own cgroup is the
    # container's cgroup-namespace root (not a volume); the pin dir is per node on bpffs
    cg_volume, pods_cgroup = mounted(spec, p["cgroup_path"])
    assert cg_volume["hostPath"]["path"] == "/sys/fs/cgroup" and pods_cgroup == o.pods_cgroup
    assert p["agent_cgroup_path"] == "/sys/fs/cgroup" and not any(
        m["mountPath"] == "/sys/fs/cgroup" for m in container["volumeMounts"])
    pin_volume, pin_rel = mounted(spec, p["bpf_pin_dir"])
    assert pin_volume["hostPath"]["path"] == "/sys/fs/bpf" and pin_rel.endswith(FIELD_VALUES["spec.nodeName"])
    mounted(spec, p["token_file"])
    if o.identity is None:
        assert (p["trust_anchor"], p["identity_dir"]) == ("", "")
    else:
        anchor_volume, key = mounted(spec, p["trust_anchor"])
        assert anchor_volume["configMap"]["name"] == "nodemesh-trust-anchor"
        cm = next(x for x in render(o) if x["kind"] == "ConfigMap")
        assert key in cm["data"]
        ident_volume, rel = mounted(spec, p["identity_dir"])
        assert rel == "." and "emptyDir" in ident_volume


@pytest.mark.parametrize("mutate, error", [
    (lambda a: a + ["--tokenz-file", "x"], "No such option '--tokenz-file'"),
    (lambda a: [x for x in a if x not in ("--node", "$(NODE_NAME)")], "Missing parameter: node"),
    (lambda a: a + ["--redirect", "ebpf"], "'ebpf' is not one of"),
])
def test_the_parse_check_catches_drift(mutate, error: str) -> None:  # type: ignore[no-untyped-def]
    container = dict(workload(render(), "DaemonSet")["containers"][0])
    container["args"] = mutate(container["args"])
    with pytest.raises(click.UsageError, match=re.escape(error)):
        parse(expand(container))


@pytest.mark.parametrize("argv, error", [
    (["--source", "files"], "--state-dir is required"),
    (["--source", "kubernetes"], "--tokens-file is required with --agent-auth tokens"),
    (["--source", "kubernetes", "--agent-auth", "tokenreview", "--tokens-file", "t.json"], "--tokens-file is for --agent-auth tokens"),
    (["--source", "kubernetes", "--agent-auth", "tokenreview", "--agent-service-account", "agent"], "must be NAMESPACE/NAME"),
])
def test_controller_option_rules(argv: list[str], error: str) -> None:
    p = parse(["controller", "run", *argv]).params
    with pytest.raises(click.UsageError, match=re.escape(error)):
        check_controller_options(p["source_kind"], p["state_dir"], p["agent_auth"], p["tokens_file"], p["agent_service_account"])
