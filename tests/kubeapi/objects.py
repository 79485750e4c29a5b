"""Kubernetes objects for the scenario tests, shaped as the API server returns them."""

from __future__ import annotations

from typing import Any


def node(name: str, ip: str, cidr: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
            "spec": {"podCIDR": cidr},
            "status": {"addresses": [{"type": "Hostname", "address": name}, {"type": "InternalIP", "address": ip}]}}


def namespace(name: str, meshed: bool = True) -> dict[str, Any]:
    labels = {"kubernetes.io/metadata.name": name}
    if meshed:
        labels["nodemesh.io/mesh"] = "enabled"
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels},
            "spec": {"finalizers": ["kubernetes"]}, "status": {"phase": "Active"}}


def service_account(ns: str, name: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name, "namespace": ns}}


def service(ns: str, name: str, ip: str, selector: dict[str, str], port: int = 80, target: int | str = 8080) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": ns},
            "spec": {"type": "ClusterIP", "clusterIP": ip, "clusterIPs": [ip], "selector": selector,
                     "sessionAffinity": "None", "ipFamilies": ["IPv4"],
                     "ports": [{"name": "http", "port": port, "targetPort": target, "protocol": "TCP"}]},
            "status": {"loadBalancer": {}}}


def pod(ns: str, name: str, node_name: str, ip: str | None, labels: dict[str, str], sa: str = "default",
        port: int = 8080, phase: str = "Running") -> dict[str, Any]:
    status: dict[str, Any] = {"phase": phase, "hostIP": "192.0.2.1",
                              "conditions": [{"type": "Ready", "status": "True"}]}
    if ip:
        status["podIP"] = ip
        status["podIPs"] = [{"ip": ip}]
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": ns, "labels": labels},
            "spec": {"nodeName": node_name, "serviceAccountName": sa, "serviceAccount": sa,
                     "restartPolicy": "Always", "dnsPolicy": "ClusterFirst",
                     "containers": [{"name": "app", "image": "example/app:1", "imagePullPolicy": "IfNotPresent",
                                     "ports": [{"containerPort": port, "name": "http", "protocol": "TCP"}],
                                     "resources": {}, "terminationMessagePath": "/dev/termination-log"}]},
            "status": status}


def cluster() -> list[dict[str, Any]]:
    """The lab's default topology as a real cluster would hold it."""
    return [
        node("node1", "172.31.255.11", "10.244.1.0/24"),
        node("node2", "172.31.255.12", "10.244.2.0/24"),
        namespace("demo"),
        namespace("kube-system", meshed=False),
        service_account("demo", "hello"),
        service_account("demo", "client"),
        service("demo", "hello", "10.96.0.10", {"app": "hello"}),
        pod("demo", "hello-1", "node1", "10.244.1.2", {"app": "hello"}, sa="hello"),
        pod("demo", "hello-2", "node2", "10.244.2.2", {"app": "hello"}, sa="hello"),
        pod("demo", "client", "node1", "10.244.1.3", {"app": "client"}, sa="client"),
        # Real-cluster noise the model must not choke on:
        host_network(pod("kube-system", "kube-proxy-x", "node1", "172.31.255.11", {"k8s-app": "kube-proxy"})),
        pod("demo", "pending", "", None, {"app": "hello"}),  # not scheduled yet
        pod("demo", "job-done", "node2", "10.244.2.2", {"app": "job"}, phase="Succeeded"),  # IP reused by hello-2
    ]


def host_network(obj: dict[str, Any]) -> dict[str, Any]:
    obj["spec"]["hostNetwork"] = True
    return obj
