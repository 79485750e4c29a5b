"""What the Kubernetes source watches, and how a raw API object becomes a model document.

Pure: the table of watched kinds, and `admit` (which API objects the mesh model should see at all).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from nodemesh import crds


@dataclass(frozen=True)
class WatchedKind:
    kind: str
    group: str  # "" for the core API
    version: str
    plural: str
    namespaced: bool

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version


WATCHED: tuple[WatchedKind, ...] = (
    WatchedKind("Namespace", "", "v1", "namespaces", False),
    WatchedKind("Node", "", "v1", "nodes", False),
    WatchedKind("ServiceAccount", "", "v1", "serviceaccounts", True),
    WatchedKind("Service", "", "v1", "services", True),
    WatchedKind("Pod", "", "v1", "pods", True),
    WatchedKind("EndpointSlice", "discovery.k8s.io", "v1", "endpointslices", True),
    WatchedKind("HTTPRoute", "gateway.networking.k8s.io", "v1", "httproutes", True),
    *(WatchedKind(k, crds.GROUP, crds.VERSION, crds.plural(k), True) for k in crds.POLICY_KINDS),
)


def watched_kinds(supported: tuple[str, ...]) -> tuple[WatchedKind, ...]:
    """The kinds to watch: those the cluster model parses (a kind the model does not know yet, e.g.
    HTTPRoute before the L7 model lands, would only produce a rejection per object)."""
    return tuple(w for w in WATCHED if w.kind in supported)


def raw_key(wk: WatchedKind, obj: Mapping[str, Any]) -> tuple[str, str]:
    meta = obj.get("metadata") or {}
    return (str(meta.get("namespace") or "") if wk.namespaced else "", str(meta.get("name") or ""))


def admit(wk: WatchedKind, obj: dict[str, Any]) -> tuple[dict[str, Any] | None, str]:
    """The document the model parses, or (None, why) for objects that are not mesh state at all.

    List items of built-in kinds come without apiVersion/kind: they are filled in. Pods that are not
    scheduled yet, have finished (their IP may already be reused) or share the node's network are
    skipped: none of them is a meshed workload, and the model would reject them as invalid.
    """
    doc = dict(obj)
    doc.setdefault("apiVersion", wk.api_version)
    doc.setdefault("kind", wk.kind)
    if wk.kind == "Pod":
        spec, st = doc.get("spec") or {}, doc.get("status") or {}
        if not spec.get("nodeName"):
            return None, "not scheduled yet"
        if st.get("phase") in ("Succeeded", "Failed"):
            return None, f"phase {st['phase']}"
        if spec.get("hostNetwork"):
            # Kept (agent pods are, and TokenReview may need where they run) but without the IP:
            # it is the node's, and such a pod is never a meshed workload.
            doc["status"] = {k: v for k, v in st.items() if k not in ("podIP", "podIPs")}
        if (doc.get("metadata") or {}).get("deletionTimestamp"):
            return None, "terminating"
    return doc, ""
