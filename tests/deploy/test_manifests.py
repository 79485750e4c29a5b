"""deploy/: `nodemesh install`, the Helm chart and the kustomize overlays render the same objects,
and every rendering passes kubernetes-validate --strict for Kubernetes 1.28 and 1.32."""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys

import pytest
from click.testing import CliRunner

from nodemesh.cli import cli
from nodemesh.install import Identity, InstallOptions, render, to_yaml

from tests.deploy.kubetools import (
    KUBE_VERSIONS, ROOT, by_key, crd_validator, docs, load_crd, run, strict_errors, tool,
)

CHART = os.path.join(ROOT, "deploy", "helm", "nodemesh")
KUSTOMIZE = os.path.join(ROOT, "deploy", "kustomize")
PEM_CERT = "-----BEGIN CERTIFICATE-----\nMIIBfake\n-----END CERTIFICATE-----\n"
PEM_KEY = "-----BEGIN PRIVATE KEY-----\nMIGfake\n-----END PRIVATE KEY-----\n"
IDENTITY = Identity(trust_anchor_pem=PEM_CERT, issuer_cert_pem=PEM_CERT.replace("fake", "issuer"), issuer_key_pem=PEM_KEY)


def install_cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, ["install", *args])
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def identity_files(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    d = tmp_path_factory.mktemp("identity")
    paths = []
    for name, text in (("ca.crt", IDENTITY.trust_anchor_pem), ("issuer.crt", IDENTITY.issuer_cert_pem), ("issuer.key", IDENTITY.issuer_key_pem)):
        (d / name).write_text(text)
        paths.append(str(d / name))
    return paths


def identity_args(files: list[str]) -> list[str]:
    return ["--identity-trust-anchor-file", files[0], "--identity-issuer-certificate-file", files[1], "--identity-issuer-key-file", files[2]]


# --- nodemesh install ------------------------------------------------------------------------


@pytest.mark.parametrize("version", KUBE_VERSIONS)
@pytest.mark.parametrize("variant", ["default", "ha", "custom"])
def test_install_passes_strict_validation(version: str, variant: str, identity_files: list[str]) -> None:
    args = {"default": [], "ha": ["--ha", *identity_args(identity_files)],
            "custom": ["--namespace", "mesh-system", "--trust-domain", "example.org", "--image", "reg.example/nm:1"]}[variant]
    code, out = install_cli(*args)
    assert code == 0, out
    objs = docs(out)
    assert {"CustomResourceDefinition", "Namespace", "DaemonSet", "Deployment", "ClusterRole"} <= {o["kind"] for o in objs}
    assert strict_errors(objs, version) == []


def test_install_crds_renders_only_crds() -> None:
    code, out = install_cli("--crds")
    assert code == 0
    kinds = {o["kind"] for o in docs(out)}
    assert kinds == {"CustomResourceDefinition"}
    assert {o["spec"]["names"]["kind"] for o in docs(out)} == {"Server", "AuthorizationPolicy", "MeshTLSAuthentication", "NetworkAuthentication"}


def test_strict_validation_catches_a_misspelled_field() -> None:
    # Pins the validator: without --strict a misspelled field passes silently.
    dep = copy.deepcopy(by_key(render())[("Deployment", "nodemesh", "nodemesh-controller")])
    dep["spec"]["template"]["spec"]["containers"][0]["imagePulPolicy"] = "Always"
    for v in KUBE_VERSIONS:
        errors = strict_errors([dep], v)
        assert len(errors) == 1 and "imagePulPolicy" in errors[0]


def test_install_options_are_applied() -> None:
    objs = by_key(docs(install_cli("--namespace", "mesh-system", "--trust-domain", "example.org", "--image", "reg.example/nm:1")[1]))
    dep = objs[("Deployment", "mesh-system", "nodemesh-controller")]
    c = dep["spec"]["template"]["spec"]["containers"][0]
    assert c["image"] == "reg.example/nm:1"
    assert c["args"][c["args"].index("--trust-domain") + 1] == "example.org"
    assert objs[("ClusterRoleBinding", "", "nodemesh-controller")]["subjects"][0]["namespace"] == "mesh-system"
    assert ("Namespace", "", "mesh-system") in objs


def test_install_with_identity_carries_the_pems(identity_files: list[str]) -> None:
    objs = by_key(docs(install_cli(*identity_args(identity_files))[1]))
    secret = objs[("Secret", "nodemesh", "nodemesh-identity-issuer")]
    assert secret["stringData"] == {"tls.crt": IDENTITY.issuer_cert_pem, "tls.key": IDENTITY.issuer_key_pem, "ca.crt": IDENTITY.trust_anchor_pem}
    assert objs[("ConfigMap", "nodemesh", "nodemesh-trust-anchor")]["data"]["ca-bundle.crt"] == IDENTITY.trust_anchor_pem


@pytest.mark.parametrize("args, message", [
    (["--namespace", "Bad_NS"], "namespace 'Bad_NS' is not a valid Kubernetes namespace name"),
    (["--trust-domain", "-x-"], "trust domain '-x-' is not a valid DNS name"),
    (["--image", "has space"], "image 'has space' is not a valid image reference"),
    (["--ha"], "HA runs 2 controller replicas that must sign with one shared issuer"),
    (["--pods-cgroup", "../etc"], "pods cgroup '../etc' must be a path relative to the node's cgroup2 root"),
    (["--pods-cgroup", "/kubepods"], "pods cgroup '/kubepods' must be a path relative"),
    (["--identity-trust-anchor-file", "/nonexistent/ca.crt"], "pass all three of --identity-trust-anchor-file"),
])
def test_install_bad_input_is_refused_with_a_clear_error(args: list[str], message: str) -> None:
    code, out = install_cli(*args)
    assert code == 2 and message in out, out


def test_install_unreadable_or_non_pem_identity_is_refused(identity_files: list[str], tmp_path: pytest.TempPathFactory) -> None:
    code, out = install_cli("--identity-trust-anchor-file", "/nonexistent/ca.crt", *identity_args(identity_files)[2:])
    assert code == 2 and "/nonexistent/ca.crt" in out and "trust anchor file cannot be read" in out
    bad = tmp_path / "k.pem"  # type: ignore[operator]
    bad.write_text("not a key")
    code, out = install_cli(*identity_args(identity_files)[:4], "--identity-issuer-key-file", str(bad))
    assert code == 2 and "the issuer key is not PEM" in out


def test_agent_is_least_privilege_and_controller_reads_only() -> None:
    objs = by_key(render())
    role = objs[("ClusterRole", "", "nodemesh-controller")]
    verbs = {(g, r): tuple(rule["verbs"]) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]}
    assert verbs.pop(("authentication.k8s.io", "tokenreviews")) == ("create",)
    assert set(verbs.values()) == {("list", "watch")}, "the controller only lists and watches"
    # The agent has no API access: no role bound, no automounted token, only the audience-bound one.
    assert not [o for o in objs.values() if o["kind"].endswith("Binding") and any(s["name"] == "nodemesh-agent" for s in o["subjects"])]
    ds = objs[("DaemonSet", "nodemesh", "nodemesh-agent")]["spec"]
    pod = ds["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False and pod["hostNetwork"] is True and "hostPID" not in pod
    assert ds["updateStrategy"]["rollingUpdate"]["maxUnavailable"] == 1
    token = next(v for v in pod["volumes"] if v["name"] == "controller-token")
    assert token["projected"]["sources"][0]["serviceAccountToken"]["audience"] == "nodemesh-controller"
    host_paths = {v["hostPath"]["path"] for v in pod["volumes"] if "hostPath" in v}
    assert {"/sys/fs/bpf", "/sys/fs/cgroup"} <= host_paths


# --- generated files, Helm, kustomize --------------------------------------------------------


def test_generated_deploy_files_are_up_to_date() -> None:
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "gen_deploy.py"), "--check"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def helm_template(*sets: str, values: dict[str, object] | None = None, namespace: str = "nodemesh", tmp_path: object = None) -> list[dict]:
    argv = [tool("helm"), "template", "nodemesh", CHART, "--namespace", namespace, "--include-crds", "--set", "createNamespace=true"]
    for s in sets:
        argv += ["--set", s]
    if values is not None:
        path = os.path.join(str(tmp_path), "values.json")
        with open(path, "w") as f:
            json.dump(values, f)
        argv += ["-f", path]
    return docs(run(argv))


def test_helm_lint_is_clean() -> None:
    out = run([tool("helm"), "lint", "--strict", CHART])
    assert "0 chart(s) failed" in out


def test_chart_app_version_is_the_install_default_image() -> None:
    chart = run([tool("helm"), "show", "chart", CHART])
    app = re.search(r"appVersion: \"?([^\"\n]+)", chart).group(1)  # type: ignore[union-attr]
    assert render()[-1]["spec"]["template"]["spec"]["containers"][0]["image"].endswith(f":{app}")


@pytest.mark.parametrize("variant", ["default", "ha", "dev", "custom"])
def test_helm_template_renders_what_install_renders(variant: str, tmp_path: object) -> None:
    values: dict[str, object] | None = None
    if variant == "default":
        opts, sets, ns = InstallOptions(), [], "nodemesh"
    elif variant == "ha":
        opts, sets, ns = InstallOptions(ha=True, identity=IDENTITY), ["ha=true"], "nodemesh"
        values = {"identity": {"trustAnchorsPEM": IDENTITY.trust_anchor_pem,
                               "issuer": {"crtPEM": IDENTITY.issuer_cert_pem, "keyPEM": IDENTITY.issuer_key_pem}}}
    elif variant == "dev":
        opts = InstallOptions(image="nodemesh:dev", image_pull_policy="Never", log_level="DEBUG")
        sets, ns = ["image.repository=nodemesh", "image.tag=dev", "image.pullPolicy=Never", "logLevel=DEBUG"], "nodemesh"
    else:
        opts = InstallOptions(namespace="mesh-system", trust_domain="example.org", pods_cgroup="kubepods")
        sets, ns = ["trustDomain=example.org", "agent.podsCgroup=kubepods"], "mesh-system"
    helm = by_key(helm_template(*sets, values=values, namespace=ns, tmp_path=tmp_path))
    ours = by_key(render(opts))
    assert sorted(helm) == sorted(ours)
    for key in ours:
        assert helm[key] == ours[key], f"{key} differs between helm template and nodemesh install"
    for v in KUBE_VERSIONS:
        assert strict_errors(helm.values(), v) == []


def test_helm_refuses_a_bad_pods_cgroup() -> None:
    proc = subprocess.run([tool("helm"), "template", "nodemesh", CHART, "--set", "agent.podsCgroup=../x"], capture_output=True, text=True)
    assert proc.returncode != 0 and "agent.podsCgroup \"../x\" must be a path relative" in proc.stderr, proc.stderr


def test_helm_refuses_ha_without_a_shared_issuer() -> None:
    proc = subprocess.run([tool("helm"), "template", "nodemesh", CHART, "--set", "ha=true"], capture_output=True, text=True)
    assert proc.returncode != 0 and "must sign with one shared issuer" in proc.stderr


def kustomize(overlay: str) -> list[dict]:
    return docs(run([tool("kubectl"), "kustomize", os.path.join(KUSTOMIZE, overlay)]))


@pytest.mark.parametrize("overlay", ["base", "overlays/ha", "overlays/dev"])
def test_kustomize_renders_what_install_renders(overlay: str) -> None:
    opts = {
        "base": InstallOptions(),
        "overlays/ha": InstallOptions(ha=True, identity=IDENTITY),
        "overlays/dev": InstallOptions(image="nodemesh:dev", image_pull_policy="Never", log_level="DEBUG"),
    }[overlay]
    ours = by_key(render(opts))
    # The ha overlay leaves the issuer Secret/ConfigMap to the user (README): compare the rest.
    for key in [k for k in ours if k[0] in ("Secret", "ConfigMap")]:
        del ours[key]
    rendered = by_key(kustomize(overlay))
    assert sorted(rendered) == sorted(ours)
    for key in ours:
        assert rendered[key] == ours[key], f"{key} differs between kubectl kustomize {overlay} and nodemesh install"
    for v in KUBE_VERSIONS:
        assert strict_errors(rendered.values(), v) == []


# --- custom resources against their CRDs -----------------------------------------------------


def _examples(name: str) -> list[dict]:
    with open(os.path.join(ROOT, "deploy", "examples", name)) as f:
        return docs(f.read())


def _policy_validators() -> dict[str, object]:
    from nodemesh.crds import all_crds
    return {c["spec"]["names"]["kind"]: crd_validator(c) for c in all_crds()}


def test_policy_examples_validate_against_their_crds() -> None:
    validators = _policy_validators()
    examples = _examples("policy.yaml")
    assert {e["kind"] for e in examples} == set(validators)
    for e in examples:
        assert list(validators[e["kind"]].iter_errors(e)) == [], e["metadata"]["name"]  # type: ignore[attr-defined]


@pytest.mark.parametrize("kind, mutate, expect", [
    ("Server", lambda s: s.update(prot=1), "'prot' was unexpected"),
    ("Server", lambda s: s.update(proxyProtocol="HTTP/3"), "'HTTP/3' is not one of"),
    ("Server", lambda s: s.pop("port"), "'port' is a required property"),
    # Linkerd's DNS-style names are not nodemesh identities (the model takes SPIFFE IDs)
    ("MeshTLSAuthentication", lambda s: s.update(identities=["*.demo.serviceaccount.identity.linkerd.cluster.local"]), "does not match"),
    ("MeshTLSAuthentication", lambda s: s.update(identities=[]), "is not valid under any of the given schemas"),
    ("NetworkAuthentication", lambda s: s.update(networks=[]), "should be non-empty"),
])
def test_invalid_policy_resources_are_refused_by_their_crd(kind: str, mutate, expect: str) -> None:  # type: ignore[no-untyped-def]
    res = copy.deepcopy(next(e for e in _examples("policy.yaml") if e["kind"] == kind))
    mutate(res["spec"])
    errors = [e.message for e in _policy_validators()[kind].iter_errors(res)]  # type: ignore[attr-defined]
    assert any(expect in m for m in errors), errors


def test_httproute_example_validates_against_the_gateway_api_crd() -> None:
    v = crd_validator(load_crd(os.path.join(ROOT, "tests", "data", "gateway-api", "httproutes.gateway.networking.k8s.io.yaml")), "v1")
    route = _examples("httproute.yaml")[0]
    assert list(v.iter_errors(route)) == []
    bad = copy.deepcopy(route)
    bad["spec"]["rules"][0]["backendRefs"][0]["wieght"] = 90
    assert any("'wieght' was unexpected" in e.message for e in v.iter_errors(bad))


@pytest.mark.parametrize("name, crd", [
    ("podmonitor-agents.yaml", "podmonitors.monitoring.coreos.com.yaml"),
    ("servicemonitor-controller.yaml", "servicemonitors.monitoring.coreos.com.yaml"),
])
def test_monitoring_examples_validate_against_prometheus_operator_crds(name: str, crd: str) -> None:
    v = crd_validator(load_crd(os.path.join(ROOT, "tests", "data", "prometheus-operator", crd)))
    with open(os.path.join(ROOT, "deploy", "monitoring", name)) as f:
        obj = docs(f.read())[0]
    assert list(v.iter_errors(obj)) == []
    # ...and they scrape a port the rendered workloads actually name.
    ports = {p["name"] for o in render() if o["kind"] in ("Deployment", "DaemonSet")
             for c in o["spec"]["template"]["spec"]["containers"] for p in c["ports"]}
    endpoints = obj["spec"].get("podMetricsEndpoints") or obj["spec"]["endpoints"]
    assert {e["port"] for e in endpoints} <= ports


def test_crds_render_strictly_valid_and_schemas_are_structural() -> None:
    from nodemesh.crds import all_crds
    for v in KUBE_VERSIONS:
        assert strict_errors(all_crds(), v) == []
    for c in all_crds():
        schema = c["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
        def walk(node: object, path: str) -> None:
            if isinstance(node, dict):
                if "properties" in node:
                    assert node.get("type") == "object", f"{c['metadata']['name']} {path}: objects must be typed"
                for k, sub in node.get("properties", {}).items():
                    assert "type" in sub or sub.get("x-kubernetes-int-or-string"), f"{c['metadata']['name']} {path}.{k} has no type"
                    walk(sub, f"{path}.{k}")
                if "items" in node:
                    walk(node["items"], path + "[]")
        walk(schema, "")


def test_dashboard_queries_only_golden_metric_names() -> None:
    with open(os.path.join(ROOT, "deploy", "grafana", "nodemesh-golden.json")) as f:
        dash = json.load(f)
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    used = set(re.findall(r"\b([a-z_]+(?:_total|_connections|_bucket))\b", " ".join(exprs)))
    linkerd_names = {"request_total", "response_total", "response_latency_ms_bucket", "tcp_open_total", "tcp_open_connections",
                     "tcp_close_total", "tcp_read_bytes_total", "tcp_write_bytes_total"}
    assert used and used <= linkerd_names, used - linkerd_names
    with open(os.path.join(ROOT, "agent", "metrics.py")) as f:
        agent_metrics = f.read()
    for name in used & {n for n in linkerd_names if n.startswith("tcp_")}:
        assert f'"{name}"' in agent_metrics, f"the agent does not export {name}"


def test_to_yaml_round_trips() -> None:
    objs = render(InstallOptions(identity=IDENTITY))
    assert docs(to_yaml(objs)) == objs
