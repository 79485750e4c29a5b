"""A test double of Kubernetes' EndpointSlice controller: the slices a cluster would hold for the
Services and Pods in the API test server, reconciled into it after each change.

The API test server runs no controllers, so without this the Kubernetes source would see no slices
at all. The rules are the EndpointSlice controller's (pkg/controller/endpointslice), reduced to
what the tests exercise: a Service with a selector selects scheduled, non-terminal pods of its
namespace that have an IP; a named targetPort is resolved per pod (a pod without that port name
is no endpoint for the port, and pods are grouped into one slice per resolved port set); a
Service with pods selected by none gets one empty slice; `ready` is the pod's Ready condition.
Not modelled: maxEndpointsPerSlice splitting, topology hints, terminating/serving conditions,
dual-stack slices, publishNotReadyAddresses.
"""

from __future__ import annotations

import copy
import hashlib
from typing import Any

from tests.kubeapi.server import KubeApiServer

MANAGED_BY = "endpointslice-controller.k8s.io"


def _selected(svc: dict[str, Any], pod: dict[str, Any]) -> bool:
    selector = (svc.get("spec") or {}).get("selector") or {}
    labels = pod["metadata"].get("labels") or {}
    spec, st = pod.get("spec") or {}, pod.get("status") or {}
    return (pod["metadata"].get("namespace") == svc["metadata"]["namespace"] and bool(selector)
            and all(labels.get(k) == v for k, v in selector.items())
            and bool(spec.get("nodeName")) and bool(st.get("podIP"))
            and st.get("phase") not in ("Succeeded", "Failed") and not pod["metadata"].get("deletionTimestamp"))


def _resolve(port: dict[str, Any], pod: dict[str, Any]) -> int | None:
    target = port.get("targetPort", port["port"])
    if isinstance(target, int):
        return target
    for c in pod["spec"].get("containers", []):
        for cp in c.get("ports", []):
            if cp.get("name") == target and cp.get("protocol", "TCP") == port.get("protocol", "TCP"):
                return int(cp["containerPort"])
    return None


def _ready(pod: dict[str, Any]) -> bool:
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in (pod.get("status") or {}).get("conditions", []))


def desired_slices(objs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    services = [o for o in objs if o["kind"] == "Service" and (o.get("spec") or {}).get("selector")]
    pods = [o for o in objs if o["kind"] == "Pod"]
    out = []
    for svc in services:
        ns, name = svc["metadata"]["namespace"], svc["metadata"]["name"]
        groups: dict[tuple[tuple[str, int, str], ...], list[dict[str, Any]]] = {}
        for pod in sorted((p for p in pods if _selected(svc, p)), key=lambda p: p["metadata"]["name"]):
            ports = tuple((p.get("name", ""), n, p.get("protocol", "TCP")) for p in svc["spec"]["ports"]
                          if (n := _resolve(p, pod)) is not None)
            groups.setdefault(ports, []).append(pod)
        if not groups:
            groups[()] = []  # the controller keeps one (empty) slice for a Service with no endpoints
        for ports, members in sorted(groups.items()):
            suffix = hashlib.sha256(repr(ports).encode()).hexdigest()[:5]
            out.append({
                "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
                "metadata": {"name": f"{name}-{suffix}", "namespace": ns, "labels": {
                    "kubernetes.io/service-name": name, "endpointslice.kubernetes.io/managed-by": MANAGED_BY}},
                "ports": [{"name": n, "port": port, "protocol": proto} for n, port, proto in ports],
                "endpoints": [{
                    "addresses": [p["status"]["podIP"]],
                    "conditions": {"ready": _ready(p), "serving": _ready(p), "terminating": False},
                    "nodeName": p["spec"]["nodeName"],
                    "targetRef": {"kind": "Pod", "namespace": ns, "name": p["metadata"]["name"]},
                } for p in members],
            })
    return out


def reconcile(server: KubeApiServer) -> None:
    """Makes the server's EndpointSlices what its Services and Pods call for (as the controller
    does after each watch event): creates, updates and deletes through the server's API."""
    with server.store.cond:
        objs = [{**copy.deepcopy(o), "kind": res.kind} for res, items in server.store.objects.items()
                if res.kind in ("Service", "Pod") for o in items.values()]
    desired = {(s["metadata"]["namespace"], s["metadata"]["name"]): s for s in desired_slices(objs)}
    for key in set(server.keys("EndpointSlice")) - set(desired):
        server.delete("EndpointSlice", *key)
    for s in desired.values():
        server.apply(s)
