"""Renders nodemesh's Kubernetes manifests: the one source of truth for deploy/.

`nodemesh install` prints these objects for `kubectl apply -f -` (Linkerd's convention);
`scripts/gen_deploy.py` writes the kustomize base and the Helm chart's CRDs from them, and the test
suite checks that `helm template` and `kubectl kustomize` of deploy/ render the same objects.
Pure: options in, a list of Kubernetes objects (dicts) out.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import yaml

from nodemesh import __version__
from nodemesh.crds import all_crds
from nodemesh.errors import ConfigError
from nodemesh.model import DEFAULT_TRUST_DOMAIN

DEFAULT_NAMESPACE = "nodemesh"
DEFAULT_IMAGE = f"ghcr.io/nodemesh/nodemesh:{__version__}"
# The audience agents' projected service-account tokens are bound to; the controller's
# TokenReview asks the API server to check exactly this audience.
TOKEN_AUDIENCE = "nodemesh-controller"
TOKEN_DIR = "/var/run/secrets/nodemesh"
TOKEN_PATH = f"{TOKEN_DIR}/token"
IDENTITY_SECRET = "nodemesh-identity-issuer"
TRUST_ANCHOR_CONFIGMAP = "nodemesh-trust-anchor"
# The controller's --ca-dir: the issuer Secret's keys mounted under the names load_ca_dir reads.
ISSUER_DIR = "/var/run/nodemesh/issuer"
ISSUER_ITEMS = (("ca.crt", "trust-anchor.pem"), ("tls.crt", "issuer.pem"), ("tls.key", "issuer-key.pem"))
TRUST_ANCHOR_DIR = "/var/run/nodemesh/trust-anchor"
TRUST_ANCHOR_KEY = "ca-bundle.crt"
# The agent's node key and certificate: an emptyDir outlives container restarts (the projected
# token that bootstrapped it stays the same until rotation, and a replay would be refused as
# reused); a new pod gets a new token and bootstraps again.
IDENTITY_DIR = "/var/run/nodemesh/identity"
# The node's cgroup2 tree, mounted beside the container's own: in the container's cgroup namespace
# /sys/fs/cgroup is the agent's own cgroup (the one exempted from redirection).
HOST_CGROUP = "/host/sys/fs/cgroup"
# Pods live under kubepods.slice with the systemd cgroup driver (kubeadm's default); with the
# cgroupfs driver (k3s, some older clusters) under kubepods: InstallOptions.pods_cgroup.
DEFAULT_PODS_CGROUP = "kubepods.slice"
_CGROUP_PATH = re.compile(r"^[A-Za-z0-9_.:@-]+(/[A-Za-z0-9_.:@-]+)*$")
BPF_PIN_ROOT = "/sys/fs/bpf/nodemesh"
STREAM_PORT, CONTROLLER_ADMIN_PORT, AGENT_ADMIN_PORT = 8086, 9990, 4191

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_TRUST_DOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")


@dataclass(frozen=True)
class Identity:
    """A user-provided trust anchor and issuer (PEM). Without it the controller makes its own."""

    trust_anchor_pem: str
    issuer_cert_pem: str
    issuer_key_pem: str


@dataclass(frozen=True)
class InstallOptions:
    namespace: str = DEFAULT_NAMESPACE
    trust_domain: str = DEFAULT_TRUST_DOMAIN
    image: str = DEFAULT_IMAGE
    image_pull_policy: str = "IfNotPresent"
    ha: bool = False  # 2 controller replicas, a PodDisruptionBudget and anti-affinity
    log_level: str = "INFO"
    identity: Identity | None = None
    pods_cgroup: str = DEFAULT_PODS_CGROUP  # relative to the node's cgroup2 root

    def check(self) -> None:
        """Raises ConfigError naming the first bad option."""
        if not _DNS_LABEL.match(self.namespace):
            raise ConfigError(f"namespace {self.namespace!r} is not a valid Kubernetes namespace name (lowercase letters, digits, '-')")
        if not _TRUST_DOMAIN.match(self.trust_domain):
            raise ConfigError(f"trust domain {self.trust_domain!r} is not a valid DNS name (e.g. cluster.local)")
        if not self.image or any(c.isspace() for c in self.image):
            raise ConfigError(f"image {self.image!r} is not a valid image reference")
        if self.image_pull_policy not in ("Always", "IfNotPresent", "Never"):
            raise ConfigError(f"image pull policy {self.image_pull_policy!r} must be Always, IfNotPresent or Never")
        if not _CGROUP_PATH.match(self.pods_cgroup) or ".." in self.pods_cgroup.split("/"):
            raise ConfigError(f"pods cgroup {self.pods_cgroup!r} must be a path relative to the node's cgroup2 root, "
                              "e.g. kubepods.slice (systemd driver) or kubepods (cgroupfs driver)")
        if self.log_level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ConfigError(f"log level {self.log_level!r} must be DEBUG, INFO, WARNING or ERROR")
        if self.ha and self.identity is None:
            raise ConfigError(
                "HA runs 2 controller replicas that must sign with one shared issuer: pass the trust "
                "anchor and the issuer certificate and key (--identity-trust-anchor-file, "
                "--identity-issuer-certificate-file, --identity-issuer-key-file)"
            )
        if self.identity is not None:
            for what, pem, marker in (
                ("trust anchor", self.identity.trust_anchor_pem, "CERTIFICATE"),
                ("issuer certificate", self.identity.issuer_cert_pem, "CERTIFICATE"),
                ("issuer key", self.identity.issuer_key_pem, "PRIVATE KEY"),
            ):
                if f"-----BEGIN {marker}" not in pem and not (marker == "PRIVATE KEY" and "PRIVATE KEY-----" in pem):
                    raise ConfigError(f"the {what} is not PEM (no '-----BEGIN ... {marker}-----' block)")


def _labels(component: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "nodemesh",
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/part-of": "nodemesh",
    }


def _selector(component: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": "nodemesh", "app.kubernetes.io/component": component}


def _meta(name: str, component: str, namespace: str | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if namespace is not None:
        meta["namespace"] = namespace
    meta["labels"] = _labels(component)
    return meta


def _restricted_container_security() -> dict[str, Any]:
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "runAsUser": 65532,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _probe(path: str, port: str, period: int) -> dict[str, Any]:
    return {"httpGet": {"path": path, "port": port}, "periodSeconds": period, "timeoutSeconds": 2, "failureThreshold": 3}


def namespace(o: InstallOptions) -> dict[str, Any]:
    # The agent is privileged (BPF, cgroups, host network): the namespace must allow it.
    meta = _meta(o.namespace, "namespace")
    meta["labels"]["pod-security.kubernetes.io/enforce"] = "privileged"
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": meta}


def rbac(o: InstallOptions) -> list[dict[str, Any]]:
    ns = o.namespace
    read = ["list", "watch"]  # the source lists then watches; it never gets or writes
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": _meta("nodemesh-controller", "controller", ns)},
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": _meta("nodemesh-agent", "agent", ns),
         # The agent talks to the controller only; its token is the projected, audience-bound one.
         "automountServiceAccountToken": False},
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": _meta("nodemesh-controller", "controller"),
            "rules": [
                {"apiGroups": [""], "resources": ["namespaces", "nodes", "pods", "services", "serviceaccounts"], "verbs": read},
                {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": read},
                {"apiGroups": ["gateway.networking.k8s.io"], "resources": ["httproutes"], "verbs": read},
                {"apiGroups": ["policy.nodemesh.io"],
                 "resources": ["servers", "authorizationpolicies", "meshtlsauthentications", "networkauthentications"],
                 "verbs": read},
                {"apiGroups": ["authentication.k8s.io"], "resources": ["tokenreviews"], "verbs": ["create"]},
            ],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": _meta("nodemesh-controller", "controller"),
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "nodemesh-controller"},
            "subjects": [{"kind": "ServiceAccount", "name": "nodemesh-controller", "namespace": ns}],
        },
    ]


def identity_objects(o: InstallOptions) -> list[dict[str, Any]]:
    if o.identity is None:
        return []
    ident = o.identity
    return [
        {"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
         "metadata": _meta(IDENTITY_SECRET, "controller", o.namespace),
         "stringData": {"tls.crt": ident.issuer_cert_pem, "tls.key": ident.issuer_key_pem, "ca.crt": ident.trust_anchor_pem}},
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": _meta(TRUST_ANCHOR_CONFIGMAP, "agent", o.namespace),
         "data": {"ca-bundle.crt": ident.trust_anchor_pem}},
    ]


def controller(o: InstallOptions) -> list[dict[str, Any]]:
    ns = o.namespace
    pod_spec: dict[str, Any] = {
        "serviceAccountName": "nodemesh-controller",
        "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [{
            "name": "controller",
            "image": o.image,
            "imagePullPolicy": o.image_pull_policy,
            "args": controller_args(o),
            "env": [{"name": "NODEMESH_LOG_LEVEL", "value": o.log_level}],
            "ports": [
                {"name": "stream", "containerPort": STREAM_PORT, "protocol": "TCP"},
                {"name": "admin-http", "containerPort": CONTROLLER_ADMIN_PORT, "protocol": "TCP"},
            ],
            "readinessProbe": _probe("/ready", "admin-http", 5),
            "livenessProbe": _probe("/live", "admin-http", 10),
            "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "512Mi"}},
            "securityContext": _restricted_container_security(),
        }],
    }
    if o.identity is not None:  # the controller is the mesh CA: the stream is mTLS
        pod_spec["containers"][0]["volumeMounts"] = [{"name": "identity-issuer", "mountPath": ISSUER_DIR, "readOnly": True}]
        pod_spec["volumes"] = [{"name": "identity-issuer", "secret": {
            "secretName": IDENTITY_SECRET, "items": [{"key": k, "path": p} for k, p in ISSUER_ITEMS]}}]
    if o.ha:
        pod_spec["affinity"] = {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [{
            "weight": 100,
            "podAffinityTerm": {"topologyKey": "kubernetes.io/hostname", "labelSelector": {"matchLabels": _selector("controller")}},
        }]}}
    objs: list[dict[str, Any]] = [
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": _meta("nodemesh-controller", "controller", ns),
            "spec": {
                # Signing is stateless (every replica holds the same issuer), so replicas need no
                # leader election: any of them may answer any agent.
                "replicas": 2 if o.ha else 1,
                "selector": {"matchLabels": _selector("controller")},
                "template": {"metadata": {"labels": _labels("controller")}, "spec": pod_spec},
            },
        },
        {
            "apiVersion": "v1", "kind": "Service", "metadata": _meta("nodemesh-controller", "controller", ns),
            "spec": {"selector": _selector("controller"),
                     "ports": [{"name": "stream", "port": STREAM_PORT, "targetPort": "stream", "protocol": "TCP"}]},
        },
        {
            "apiVersion": "v1", "kind": "Service", "metadata": _meta("nodemesh-controller-admin", "controller", ns),
            "spec": {"selector": _selector("controller"),
                     "ports": [{"name": "admin-http", "port": CONTROLLER_ADMIN_PORT, "targetPort": "admin-http", "protocol": "TCP"}]},
        },
    ]
    if o.ha:
        objs.append({
            "apiVersion": "policy/v1", "kind": "PodDisruptionBudget", "metadata": _meta("nodemesh-controller", "controller", ns),
            "spec": {"maxUnavailable": 1, "selector": {"matchLabels": _selector("controller")}},
        })
    return objs


def controller_args(o: InstallOptions) -> list[str]:
    """`nodemesh controller run` as the Deployment runs it (tests parse these with the real CLI)."""
    args = [
        "controller", "run",
        "--source", "kubernetes",
        "--listen", f"0.0.0.0:{STREAM_PORT}",
        "--admin", f"0.0.0.0:{CONTROLLER_ADMIN_PORT}",
        "--trust-domain", o.trust_domain,
        "--agent-auth", "tokenreview",
        "--token-audience", TOKEN_AUDIENCE,
        "--agent-service-account", f"{o.namespace}/nodemesh-agent",
    ]
    if o.identity is not None:
        args += ["--ca-dir", ISSUER_DIR]
    return args


def agent_args(o: InstallOptions) -> list[str]:
    """`nodemesh agent run` as the DaemonSet runs it; $(VAR)s are the container's env (downward API)."""
    args = [
        "agent", "run",
        "--node", "$(NODE_NAME)",
        # Short name: resolved in the agent's own namespace (ClusterFirstWithHostNet).
        "--controller", f"nodemesh-controller:{STREAM_PORT}",
        "--token-file", TOKEN_PATH,
        "--cgroup", f"{HOST_CGROUP}/{o.pods_cgroup}",
        "--agent-cgroup", "/sys/fs/cgroup",
        # hostNetwork: the node's own address is where its pods' connections are redirected.
        "--proxy-ip", "$(HOST_IP)",
        "--admin", f"0.0.0.0:{AGENT_ADMIN_PORT}",
        "--bpf-pin-dir", f"{BPF_PIN_ROOT}/$(NODE_NAME)",
        "--trust-domain", o.trust_domain,
    ]
    if o.identity is not None:
        args += ["--trust-anchor", f"{TRUST_ANCHOR_DIR}/{TRUST_ANCHOR_KEY}", "--identity-dir", IDENTITY_DIR]
    return args


def agent(o: InstallOptions) -> list[dict[str, Any]]:
    mounts = [
        {"name": "bpffs", "mountPath": "/sys/fs/bpf", "mountPropagation": "Bidirectional"},
        {"name": "cgroup2", "mountPath": HOST_CGROUP},
        # bcc compiles the BPF programs at start against the node's own kernel headers.
        {"name": "lib-modules", "mountPath": "/lib/modules", "readOnly": True},
        {"name": "usr-src", "mountPath": "/usr/src", "readOnly": True},
        {"name": "controller-token", "mountPath": TOKEN_DIR, "readOnly": True},
    ]
    volumes: list[dict[str, Any]] = [
        {"name": "bpffs", "hostPath": {"path": "/sys/fs/bpf", "type": "DirectoryOrCreate"}},
        {"name": "cgroup2", "hostPath": {"path": "/sys/fs/cgroup", "type": "Directory"}},
        {"name": "lib-modules", "hostPath": {"path": "/lib/modules", "type": "Directory"}},
        {"name": "usr-src", "hostPath": {"path": "/usr/src", "type": "Directory"}},
        {"name": "controller-token", "projected": {"sources": [{"serviceAccountToken": {
            "audience": TOKEN_AUDIENCE, "expirationSeconds": 3600, "path": "token"}}]}},
    ]
    if o.identity is not None:  # mTLS: the trust anchor to check the controller and peers, a home for the node key
        mounts += [{"name": "trust-anchor", "mountPath": TRUST_ANCHOR_DIR, "readOnly": True},
                   {"name": "identity", "mountPath": IDENTITY_DIR}]
        volumes += [{"name": "trust-anchor", "configMap": {"name": TRUST_ANCHOR_CONFIGMAP}},
                    {"name": "identity", "emptyDir": {"medium": "Memory", "sizeLimit": "1Mi"}}]
    return [{
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "metadata": _meta("nodemesh-agent", "agent", o.namespace),
        "spec": {
            "selector": {"matchLabels": _selector("agent")},
            "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}},
            "template": {
                "metadata": {"labels": _labels("agent")},
                "spec": {
                    "serviceAccountName": "nodemesh-agent",
                    "automountServiceAccountToken": False,
                    # Pods reach the node proxy on the node's address; no hostPID: the agent finds
                    # pods through the cgroup2 hierarchy, not through /proc of the host.
                    "hostNetwork": True,
                    "dnsPolicy": "ClusterFirstWithHostNet",
                    "priorityClassName": "system-node-critical",
                    "tolerations": [{"operator": "Exists"}],
                    "terminationGracePeriodSeconds": 30,
                    "containers": [{
                        "name": "agent",
                        "image": o.image,
                        "imagePullPolicy": o.image_pull_policy,
                        "args": agent_args(o),
                        "env": [
                            {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
                            {"name": "HOST_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.hostIP"}}},
                        ],
                        "ports": [{"name": "admin-http", "containerPort": AGENT_ADMIN_PORT, "protocol": "TCP"}],
                        "readinessProbe": _probe("/ready", "admin-http", 5),
                        "livenessProbe": _probe("/live", "admin-http", 10),
                        "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"cpu": "2", "memory": "512Mi"}},
                        # Loading BPF programs and attaching them to cgroups needs it.
                        "securityContext": {"privileged": True},
                        "volumeMounts": mounts,
                    }],
                    "volumes": volumes,
                },
            },
        },
    }]


def render(o: InstallOptions = InstallOptions()) -> list[dict[str, Any]]:
    """Every object `nodemesh install` applies, CRDs first (so resources of them can follow)."""
    o.check()
    return [*all_crds(), namespace(o), *rbac(o), *identity_objects(o), *controller(o), *agent(o)]


def render_crds() -> list[dict[str, Any]]:
    return all_crds()


class _Dumper(yaml.SafeDumper):
    pass


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    # Multi-line strings (PEM blocks) as literal blocks, so the output is readable and diffable.
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|" if "\n" in value else None)


_Dumper.add_representer(str, _str)


def to_yaml(docs: Sequence[dict[str, Any]]) -> str:
    """A multi-document YAML stream, keys in the order written above (as kubectl users read them)."""
    return "".join("---\n" + yaml.dump(d, Dumper=_Dumper, sort_keys=False, default_flow_style=False) for d in docs)
