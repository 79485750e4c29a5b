"""EndpointSlice (discovery.k8s.io/v1) in the model, and discovery taking a Service's endpoints
from its slices when it has any (Kubernetes) and from its selector when not (the lab)."""

from __future__ import annotations

from typing import Any

import pytest

from nodemesh.controller.discovery import endpoints_for
from nodemesh.endpointslice_model import EndpointSlice, SliceEndpoint, SlicePort
from nodemesh.errors import ConfigError
from nodemesh.model import ServicePort, dump_object, parse_object

from tests.unit.test_discovery import names, pod, state, svc


def slice_doc(**over: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
        "metadata": {"name": "web-abc", "namespace": "demo", "labels": {"kubernetes.io/service-name": "web"}},
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": [{"addresses": ["10.244.1.2"], "conditions": {"ready": True}, "nodeName": "node1",
                       "targetRef": {"kind": "Pod", "namespace": "demo", "name": "a"}}],
    }
    doc.update(over)
    return doc


def test_parses_a_slice_and_dumps_it_back() -> None:
    s = parse_object(slice_doc(), "api")
    assert s == EndpointSlice("demo", "web-abc", "web", "IPv4", (SlicePort("http", 8080, "TCP"),),
                              (SliceEndpoint(("10.244.1.2",), True, "node1", "a", "demo"),),
                              {"kubernetes.io/service-name": "web"})
    assert parse_object(dump_object(s), "again") == s


def test_what_the_api_leaves_unset_is_read_as_the_api_says() -> None:
    s = parse_object(slice_doc(ports=[{"port": None}], endpoints=[{"addresses": ["10.244.1.2"]}]), "api")
    assert s.ports == (SlicePort("", None, "TCP"),)  # null port: "all ports"
    assert s.endpoints[0].ready and s.endpoints[0].pod == ""  # unset ready counts as ready; no targetRef


@pytest.mark.parametrize("over, field, words", [
    ({"addressType": "IPX"}, "addressType", "must be one of IPv4, IPv6, FQDN"),
    ({"endpoints": [{"addresses": ["10.244.1.300"]}]}, "endpoints[0].addresses[0]", "is not an IPv4 address"),
    ({"endpoints": [{"addresses": []}]}, "endpoints[0].addresses", "at least one address"),
    ({"endpoints": ["10.0.0.1"]}, "endpoints[0]", "must be a mapping"),
    ({"ports": [{"name": "http", "port": 70000}]}, "ports[0].port", "1-65535"),
    ({"apiVersion": "discovery.k8s.io/v1beta1"}, "apiVersion", "must be 'discovery.k8s.io/v1'"),
])
def test_bad_slices_are_refused_naming_the_field(over: dict[str, Any], field: str, words: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_object(slice_doc(**over), "api")
    assert err.value.field == field and words in str(err.value), str(err.value)


def eps(service_ports: tuple[ServicePort, ...] = (ServicePort(80, "http", "http"),), slices: tuple[dict[str, Any], ...] = (),
        pods: tuple[Any, ...] = ()) -> list[list[tuple[str, str, int]]]:
    objs = [parse_object(d, "api") for d in slices]
    st = state(svc(ports=service_ports), *pods, *objs)
    return [[(e.pod, e.ip, e.port) for e in port] for port in endpoints_for(st, st.get("Service", "demo", "web"))]


def ep(name: str, ip: str, ready: bool | None = True, kind: str = "Pod") -> dict[str, Any]:
    e: dict[str, Any] = {"addresses": [ip], "nodeName": "node1", "targetRef": {"kind": kind, "namespace": "demo", "name": name}}
    if ready is not None:
        e["conditions"] = {"ready": ready}
    return e


A, B = pod("a", "10.244.1.2"), pod("b", "10.244.1.3")


@pytest.mark.parametrize("case, slices, pods, expected", [
    ("no slices: the selector decides (the lab)", (), (A, B), [[("a", "10.244.1.2", 8080), ("b", "10.244.1.3", 8080)]]),
    ("slices decide, not the selector", (slice_doc(endpoints=[ep("b", "10.244.1.3")]),), (A, B), [[("b", "10.244.1.3", 8080)]]),
    ("an empty slice means no endpoints", (slice_doc(endpoints=[]),), (A, B), [[]]),
    ("not ready is no endpoint", (slice_doc(endpoints=[ep("a", "10.244.1.2", ready=False), ep("b", "10.244.1.3")]),), (A, B),
     [[("b", "10.244.1.3", 8080)]]),
    ("ready unset counts as ready", (slice_doc(endpoints=[ep("a", "10.244.1.2", ready=None)]),), (A,), [[("a", "10.244.1.2", 8080)]]),
    ("the slice's port number, resolved by Kubernetes", (slice_doc(ports=[{"name": "http", "port": 9090}]),), (A,),
     [[("a", "10.244.1.2", 9090)]]),
    ("a slice port of another name is not this port", (slice_doc(ports=[{"name": "admin", "port": 9090}]),), (A,), [[]]),
    ("a slice port of another protocol is not this port", (slice_doc(ports=[{"name": "http", "port": 8080, "protocol": "UDP"}]),),
     (A,), [[]]),
    ("a pod in two slices counts once, in name order", (
        slice_doc(endpoints=[ep("b", "10.244.1.3"), ep("a", "10.244.1.2")]),
        slice_doc(metadata={"name": "web-def", "namespace": "demo", "labels": {"kubernetes.io/service-name": "web"}},
                  endpoints=[ep("a", "10.244.1.2")])), (A, B), [[("a", "10.244.1.2", 8080), ("b", "10.244.1.3", 8080)]]),
    ("an endpoint of a pod the mesh does not know is skipped", (slice_doc(endpoints=[ep("ghost", "10.244.1.9")]),), (A,), [[]]),
    ("a non-pod endpoint has no identity: skipped", (slice_doc(endpoints=[ep("a", "10.244.1.2", kind="Node")]),), (A,), [[]]),
    ("IPv6 slices are not routed (yet)", (slice_doc(addressType="IPv6", endpoints=[{"addresses": ["fd00::2"]}]),), (A,), [[]]),
    ("a slice of another service is not ours", (slice_doc(metadata={"name": "x", "namespace": "demo",
                                                                    "labels": {"kubernetes.io/service-name": "other"}}),),
     (A, B), [[("a", "10.244.1.2", 8080), ("b", "10.244.1.3", 8080)]]),
])
def test_slice_endpoints(case: str, slices: tuple[dict[str, Any], ...], pods: tuple[Any, ...], expected: list[Any]) -> None:
    assert eps(slices=slices, pods=pods) == expected, case


def test_non_meshed_pods_stay_out_on_both_paths() -> None:
    plain = pod("p", "10.244.1.7", ns="demo", labels={"app": "web", "nodemesh.io/mesh": "disabled"})
    assert names(endpoints_for(state(svc(), plain), svc())[0]) == []
    sl = slice_doc(endpoints=[ep("p", "10.244.1.7")])
    st = state(svc(), plain, parse_object(sl, "api"))
    assert names(endpoints_for(st, svc())[0]) == []
