"""The API test server against the real `kubernetes` client: pins the client behaviour the
controller's Kubernetes source relies on, and the server's own protocol rules."""

from __future__ import annotations

import threading

import pytest
from kubernetes import client, watch
from kubernetes.client.rest import ApiException

from tests.kubeapi.client import api_client
from tests.kubeapi.objects import namespace, pod
from tests.kubeapi.server import KubeApiServer


@pytest.fixture
def server() -> KubeApiServer:
    with KubeApiServer(history=50, bookmark_interval=0.1) as s:
        yield s


def test_list_carries_a_resource_version_and_items_without_kind(server: KubeApiServer) -> None:
    server.create(namespace("demo"))
    core = client.CoreV1Api(api_client(server))
    raw = core.list_namespace(_preload_content=False)
    import json
    body = json.loads(raw.data)
    assert body["kind"] == "NamespaceList" and int(body["metadata"]["resourceVersion"]) > 100
    assert "kind" not in body["items"][0] and body["items"][0]["metadata"]["uid"]
    assert core.list_namespace().items[0].metadata.generation == 1


def test_client_hands_bookmarks_over_as_plain_dicts(server: KubeApiServer) -> None:
    core = client.CoreV1Api(api_client(server))
    rv = core.list_namespace().metadata.resource_version
    threading.Timer(0.2, lambda: server.create(namespace("late"))).start()
    events = list(watch.Watch().stream(core.list_namespace, resource_version=rv, allow_watch_bookmarks=True, timeout_seconds=1))
    types = [e["type"] for e in events]
    assert "ADDED" in types and "BOOKMARK" in types
    bookmark = [e for e in events if e["type"] == "BOOKMARK"][-1]  # the last one follows the ADDED
    assert isinstance(bookmark["object"], dict) and int(bookmark["object"]["metadata"]["resourceVersion"]) == int(rv) + 1
    assert isinstance(next(e for e in events if e["type"] == "ADDED")["object"], client.V1Namespace)


def test_client_retries_a_410_once_then_raises(server: KubeApiServer) -> None:
    core = client.CoreV1Api(api_client(server))
    server.create(namespace("a"))
    old = core.list_namespace().metadata.resource_version
    server.create(namespace("b"))
    server.compact()
    w = watch.Watch()
    with pytest.raises(ApiException) as info:
        # Without timeout_seconds the client resumes once on 410 (from the same version), then gives up.
        for _ in w.stream(core.list_namespace, resource_version=old):
            pass
    assert info.value.status == 410 and "too old resource version" in info.value.reason
    watches = [q for m, p, q in server.requests if q.get("watch") == "true"]
    assert len(watches) == 2


def test_with_timeout_seconds_the_client_raises_410_at_once(server: KubeApiServer) -> None:
    core = client.CoreV1Api(api_client(server))
    server.force_410()
    with pytest.raises(ApiException) as info:
        list(watch.Watch().stream(core.list_namespace, resource_version="101", timeout_seconds=1))
    assert info.value.status == 410


def test_bounded_history_expires_old_versions(server: KubeApiServer) -> None:
    core = client.CoreV1Api(api_client(server))
    first = core.list_namespace().metadata.resource_version
    for i in range(60):  # history=50
        server.create(namespace(f"ns{i}"))
    with pytest.raises(ApiException) as info:
        list(watch.Watch().stream(core.list_namespace, resource_version=first, timeout_seconds=1))
    assert info.value.status == 410
    recent = str(int(core.list_namespace().metadata.resource_version) - 10)
    events = list(watch.Watch().stream(core.list_namespace, resource_version=recent, timeout_seconds=1))
    assert [e["type"] for e in events] == ["ADDED"] * 10


def test_duplicate_create_and_stale_update_are_409_with_status_bodies(server: KubeApiServer) -> None:
    core = client.CoreV1Api(api_client(server))
    core.create_namespace({"metadata": {"name": "x"}})
    with pytest.raises(ApiException) as info:
        core.create_namespace({"metadata": {"name": "x"}})
    assert info.value.status == 409 and '"reason": "AlreadyExists"' in info.value.body
    ns = core.read_namespace("x")
    stale = ns.metadata.resource_version
    ns.metadata.labels = {"a": "1"}
    core.replace_namespace("x", ns)
    ns.metadata.resource_version = stale
    with pytest.raises(ApiException) as info:
        core.replace_namespace("x", ns)
    assert info.value.status == 409 and '"reason": "Conflict"' in info.value.body
    with pytest.raises(ApiException) as info:
        core.read_namespace("missing")
    assert info.value.status == 404 and '"kind": "Status"' in info.value.body


def test_selectors_filter_lists_and_watches(server: KubeApiServer) -> None:
    server.create(namespace("demo"))
    server.create(pod("demo", "a", "node1", "10.0.0.1", {"app": "web", "tier": "fe"}))
    server.create(pod("demo", "b", "node2", "10.0.0.2", {"app": "db"}))
    core = client.CoreV1Api(api_client(server))
    names = lambda **kw: sorted(p.metadata.name for p in core.list_pod_for_all_namespaces(**kw).items)
    assert names(label_selector="app=web") == ["a"]
    assert names(label_selector="app in (web,db),tier") == ["a"]
    assert names(label_selector="!tier") == ["b"]
    assert names(label_selector="app!=web") == ["b"]
    assert names(field_selector="spec.nodeName=node2") == ["b"]
    with pytest.raises(ApiException) as info:
        names(field_selector="spec.bogus=1")
    assert info.value.status == 400
    # On a filtered watch, an object that stops matching is DELETED, one that starts is ADDED.
    rv = core.list_pod_for_all_namespaces().metadata.resource_version
    def relabel() -> None:
        p = server.store.objects[next(r for r in server.store.objects if r.kind == "Pod")][("demo", "a")]
        server.apply({**p, "metadata": {**p["metadata"], "labels": {"app": "other"}}})
        p = server.store.objects[next(r for r in server.store.objects if r.kind == "Pod")][("demo", "b")]
        server.apply({**p, "metadata": {**p["metadata"], "labels": {"app": "web"}}})
    threading.Timer(0.2, relabel).start()
    events = list(watch.Watch().stream(core.list_pod_for_all_namespaces, label_selector="app=web", resource_version=rv, timeout_seconds=1))
    assert [(e["type"], e["object"].metadata.name) for e in events] == [("DELETED", "a"), ("ADDED", "b")]


def test_list_paging_with_continue(server: KubeApiServer) -> None:
    for i in range(5):
        server.create(namespace(f"n{i}"))
    core = client.CoreV1Api(api_client(server))
    page = core.list_namespace(limit=2)
    seen = [n.metadata.name for n in page.items]
    while page.metadata._continue:
        page = core.list_namespace(limit=2, _continue=page.metadata._continue)
        seen += [n.metadata.name for n in page.items]
    assert seen == [f"n{i}" for i in range(5)]


def test_auth_and_injected_faults(server: KubeApiServer) -> None:
    with pytest.raises(ApiException) as info:
        client.CoreV1Api(api_client(server, token="wrong")).list_namespace()
    assert info.value.status == 401
    core = client.CoreV1Api(api_client(server))
    server.fail_next(429, retry_after=3)
    with pytest.raises(ApiException) as info:
        core.list_namespace()
    assert info.value.status == 429 and info.value.headers["Retry-After"] == "3"
    server.fail_next(500, path_contains="/pods")
    core.list_namespace()  # not matched by the fault
    with pytest.raises(ApiException) as info:
        core.list_pod_for_all_namespaces()
    assert info.value.status == 500
    core.list_pod_for_all_namespaces()  # the fault was used up


def test_dropped_watch_ends_the_stream_abruptly(server: KubeApiServer) -> None:
    core = client.CoreV1Api(api_client(server))
    threading.Timer(0.3, server.drop_watches).start()
    with pytest.raises(Exception) as info:
        list(watch.Watch().stream(core.list_namespace, resource_version="101", timeout_seconds=5))
    assert "ended prematurely" in str(info.value) or "Connection" in type(info.value).__name__


def test_token_review_checks_audience(server: KubeApiServer) -> None:
    server.add_service_account_token("tok", "nodemesh", "nodemesh-agent", ["nodemesh-controller"], pod="agent-x", node="node1")
    auth = client.AuthenticationV1Api(api_client(server))
    review = lambda token, aud: auth.create_token_review(client.V1TokenReview(spec=client.V1TokenReviewSpec(token=token, audiences=aud))).status
    ok = review("tok", ["nodemesh-controller"])
    assert ok.authenticated and ok.user.username == "system:serviceaccount:nodemesh:nodemesh-agent"
    assert ok.user.extra["authentication.kubernetes.io/node-name"] == ["node1"] and ok.audiences == ["nodemesh-controller"]
    assert not review("tok", ["kubernetes"]).authenticated
    assert not review("nope", ["nodemesh-controller"]).authenticated
