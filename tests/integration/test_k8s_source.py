"""The controller's Kubernetes source, driven through the real `kubernetes` client against the API
test server: sync, resume, relist on 410, backoff, bad objects, and lab parity."""

from __future__ import annotations

import asyncio
import copy
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import pytest
import yaml

from nodemesh.controller.config_store import ConfigStore
from nodemesh.controller.file_source import read_dir
from nodemesh.controller.k8s_source import Backoff, KubeSource
from nodemesh.model import ClusterState
from nodemesh.nodeconfig import NodeConfig

from tests.kubeapi.client import api_client
from tests.kubeapi.endpointslices import reconcile as reconcile_slices
from tests.kubeapi.objects import cluster, namespace, pod, service
from tests.kubeapi.server import KubeApiServer


class FastBackoff(Backoff):
    def __init__(self) -> None:
        super().__init__(base=0.05, cap=0.2)


class Harness:
    def __init__(self, server: KubeApiServer, **kw: Any) -> None:
        self.server = server
        self.states: list[ClusterState] = []
        self.source = KubeSource(api_client(server), self.states.append, watch_seconds=kw.pop("watch_seconds", 2),
                                 backoff=kw.pop("backoff", FastBackoff), **kw)

    def wait(self, pred: Callable[[ClusterState], bool], timeout: float = 5.0) -> ClusterState:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.source.rebuild()
            if self.source.state is not None and pred(self.source.state):
                return self.source.state
            time.sleep(0.02)
        raise AssertionError(f"state never matched; last: {sorted(self.source.state.objects) if self.source.state else None}")


@pytest.fixture
def server() -> Iterator[KubeApiServer]:
    with KubeApiServer(history=200, bookmark_interval=0.2) as s:
        yield s


@pytest.fixture
def harness(server: KubeApiServer) -> Iterator[Harness]:
    h = Harness(server)
    yield h
    h.source.stop_threads()


def has(kind: str, ns: str, name: str) -> Callable[[ClusterState], bool]:
    return lambda st: (kind, ns, name) in st.objects


def lacks(kind: str, ns: str, name: str) -> Callable[[ClusterState], bool]:
    return lambda st: (kind, ns, name) not in st.objects


def live(server: KubeApiServer, kind: str, ns: str, name: str) -> dict[str, Any]:
    res = next(r for r in server.store.objects if r.kind == kind)
    return copy.deepcopy(server.store.objects[res][(ns, name)])


# --- sync, watch, resume ---------------------------------------------------------------------


def test_first_state_waits_for_every_kind_and_skips_non_workloads(server: KubeApiServer, harness: Harness) -> None:
    for o in cluster():
        server.create(o)
    server.fail_next(500, count=2, path_contains="/pods")  # pods list late: no partial state meanwhile
    harness.source.start_threads()
    st = harness.wait(has("Pod", "demo", "client"))
    assert harness.states[0] is st or has("Pod", "demo", "client")(harness.states[0]), "a state without pods was delivered"
    assert {o.name for o in st.pods} == {"hello-1", "hello-2", "client", "kube-proxy-x"}  # not pending or finished ones
    assert st.get("Pod", "kube-system", "kube-proxy-x").pod_ip is None  # host network: the node's IP, not the pod's
    assert harness.source.errors == []


def test_watch_events_flow_and_resume_from_the_last_version(server: KubeApiServer, harness: Harness) -> None:
    for o in cluster():
        server.create(o)
    harness.source.start_threads()
    harness.wait(has("Service", "demo", "hello"))
    server.create(service("demo", "web", "10.96.0.20", {"app": "web"}))
    harness.wait(has("Service", "demo", "web"))
    lists_before = sum(1 for m, p, q in server.requests if q.get("watch") != "true" and p.endswith("/services"))
    server.drop_watches()
    server.create(service("demo", "api", "10.96.0.21", {"app": "api"}))
    harness.wait(has("Service", "demo", "api"))
    lists_after = sum(1 for m, p, q in server.requests if q.get("watch") != "true" and p.endswith("/services"))
    assert lists_after == lists_before, "a dropped stream resumes by resourceVersion, without relisting"
    resumed = [q for m, p, q in server.requests if q.get("watch") == "true" and p.endswith("/services")][-1]
    assert resumed["allowWatchBookmarks"] == "true" and int(resumed["resourceVersion"]) > 100
    server.delete("Service", "demo", "web")
    harness.wait(lacks("Service", "demo", "web"))


def test_410_gone_relists_and_catches_up(server: KubeApiServer, harness: Harness) -> None:
    for o in cluster():
        server.create(o)
    harness.source.start_threads()
    harness.wait(has("Pod", "demo", "client"))
    server.force_410(watches=len(harness.source.kinds))
    server.drop_watches()
    server.delete("Pod", "demo", "client")
    server.compact()
    harness.wait(lacks("Pod", "demo", "client"))
    deadline = time.monotonic() + 5
    while harness.source.relists == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert harness.source.relists >= 1


@pytest.mark.parametrize("code", [401, 403, 429, 500])
def test_api_errors_keep_the_last_good_state_and_recover(server: KubeApiServer, harness: Harness, code: int,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    for o in cluster():
        server.create(o)
    harness.source.start_threads()
    good = harness.wait(has("Pod", "demo", "client"))
    caplog.set_level(logging.WARNING, logger="nodemesh.controller.k8s_source")
    server.fail_next(code, count=3, path_contains="/services", retry_after=1 if code == 429 else None)
    server.force_410(watches=1)  # make the services reflector go back to the API (relist) and hit the fault
    server.drop_watches()
    time.sleep(0.3)
    assert harness.source.state == good, "the last good state is kept while the API fails"
    server.create(service("demo", "late", "10.96.0.30", {"app": "late"}))
    harness.wait(has("Service", "demo", "late"), timeout=8)
    assert any(f"API error {code}" in r.getMessage() for r in caplog.records), [r.getMessage() for r in caplog.records]
    if code == 403:
        assert any("RBAC" in r.getMessage() for r in caplog.records)


def test_retry_after_is_honoured() -> None:
    b = Backoff(base=0.05, cap=30)
    assert b.next(retry_after=2.0) >= 2.0
    assert b.next() <= 0.05 * 4
    b.reset()
    assert b.attempt == 0


# --- bad objects -----------------------------------------------------------------------------


def test_malformed_objects_only_reject_themselves(server: KubeApiServer, harness: Harness) -> None:
    for o in cluster():
        server.create(o)
    portless = service("demo", "portless", "10.96.0.40", {"app": "x"})
    portless["spec"]["ports"] = []
    server.create(portless)
    bad_route = {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
                 "metadata": {"name": "to-nowhere", "namespace": "demo"},
                 "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": "missing", "port": 80}],
                          "rules": [{"backendRefs": [{"name": "hello", "port": 80}]}]}}
    server.create(bad_route)
    bad_policy = {"apiVersion": "policy.nodemesh.io/v1alpha1", "kind": "Server",
                  "metadata": {"name": "bad", "namespace": "demo"},
                  "spec": {"podSelector": {"matchLabels": {"app": "hello"}}, "port": 70000}}
    server.create(bad_policy)
    harness.source.start_threads()
    st = harness.wait(has("Pod", "demo", "client"))
    assert ("Service", "demo", "hello") in st.objects
    rejected = {e.obj for e in harness.source.errors}
    assert {"Service demo/portless", "HTTPRoute demo/to-nowhere", "Server demo/bad"} <= rejected, harness.source.errors
    assert all(("Service", "demo", "portless") != k for k in st.objects)
    msgs = " ".join(str(e) for e in harness.source.errors)
    assert "must list at least one port" in msgs and "does not exist" in msgs


def test_an_invalid_update_keeps_the_last_good_version(server: KubeApiServer, harness: Harness) -> None:
    for o in cluster():
        server.create(o)
    harness.source.start_threads()
    harness.wait(has("Service", "demo", "hello"))
    svc = live(server, "Service", "demo", "hello")
    svc["spec"]["ports"] = [{"name": "http", "port": 99999}]
    server.apply(svc)
    deadline = time.monotonic() + 5
    while not harness.source.errors and time.monotonic() < deadline:
        harness.source.rebuild()
        time.sleep(0.02)
    assert "port number 1-65535" in str(harness.source.errors[0])
    assert harness.source.state.get("Service", "demo", "hello").ports[0].port == 80  # type: ignore[union-attr]
    svc["spec"]["ports"] = [{"name": "http", "port": 81, "targetPort": 8080}]
    server.apply(svc)
    harness.wait(lambda st: st.get("Service", "demo", "hello").ports[0].port == 81)
    assert harness.source.errors == []


# --- parity with the standalone lab source -----------------------------------------------------


def _configs(state: ClusterState) -> dict[str, NodeConfig]:
    store = ConfigStore(first_revision=0)
    store.update(state)
    return {n: replace(store.config_for(n), version=0) for n in ("node1", "node2")}  # type: ignore[arg-type]


def _lab_state(tmp_path: Any, objs: list[dict[str, Any]]) -> ClusterState:
    d = tmp_path / "state"
    d.mkdir(exist_ok=True)
    for f in d.iterdir():
        f.unlink()
    (d / "cluster.yaml").write_text(yaml.safe_dump_all(objs))
    state, errors = read_dir(str(d))
    assert errors == []
    return state


def _slices_current(server: KubeApiServer, st: ClusterState) -> bool:
    """The source holds the slices the server holds (configs are compared by the caller)."""
    return {(k[1], k[2]) for k in st.objects if k[0] == "EndpointSlice"} == set(server.keys("EndpointSlice"))


LAB_NOISE = ("kube-proxy-x", "pending", "job-done")  # objects a lab cannot have; the k8s source skips them


def test_lab_and_kubernetes_sources_give_agents_identical_config(server: KubeApiServer, harness: Harness, tmp_path: Any) -> None:
    objs = cluster()
    lab_objs = [o for o in objs if o["metadata"]["name"] not in LAB_NOISE]
    for o in objs:
        server.create(o)
    harness.source.start_threads()

    def step(check: Callable[[ClusterState], bool]) -> None:
        # Kubernetes: endpoints come from the EndpointSlices its controller writes (a test double
        # here, tests/kubeapi/endpointslices.py); the lab derives them from selectors.
        reconcile_slices(server)
        want = _configs(_lab_state(tmp_path, lab_objs))
        k8s = harness.wait(lambda st: check(st) and _configs(st) == want and _slices_current(server, st))
        assert _configs(k8s) == want
        assert {s.service for s in k8s.of_kind("EndpointSlice")} == {s.name for s in k8s.services}

    step(has("Pod", "demo", "client"))

    # Service added.
    web = service("demo", "web", "10.96.0.20", {"app": "hello"}, port=8080, target="http")
    lab_objs.append(web)
    server.create(web)
    step(has("Service", "demo", "web"))

    # Endpoint churn: a third replica appears, the first goes away.
    extra = pod("demo", "hello-3", "node2", "10.244.2.9", {"app": "hello"}, sa="hello")
    lab_objs.append(extra)
    server.create(extra)
    lab_objs = [o for o in lab_objs if o["metadata"]["name"] != "hello-1"]
    server.delete("Pod", "demo", "hello-1")
    step(lambda st: has("Pod", "demo", "hello-3")(st) and lacks("Pod", "demo", "hello-1")(st))

    # A pod "moves": deleted on node1, recreated under the same name on node2 with a new IP.
    lab_objs = [o for o in lab_objs if o["metadata"]["name"] != "client"]
    server.delete("Pod", "demo", "client")
    moved = pod("demo", "client", "node2", "10.244.2.7", {"app": "client"}, sa="client")
    lab_objs.append(moved)
    server.create(moved)
    step(lambda st: getattr(st.get("Pod", "demo", "client"), "node_name", None) == "node2")
    k8s_cfg = _configs(harness.source.state)  # type: ignore[arg-type]
    assert [p.node for p in k8s_cfg["node1"].pods if p.name == "client"] == ["node2"]

    # HTTPRoute added, then changed (weights).
    route = {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
             "metadata": {"name": "split", "namespace": "demo"},
             "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": "hello", "port": 80}],
                      "rules": [{"backendRefs": [{"name": "hello", "port": 80, "weight": 90}, {"name": "web", "port": 8080, "weight": 10}]}]}}
    lab_objs.append(copy.deepcopy(route))
    server.create(route)
    step(has("HTTPRoute", "demo", "split"))
    route["spec"]["rules"][0]["backendRefs"][0]["weight"] = 50
    lab_objs = [o for o in lab_objs if o["metadata"]["name"] != "split"] + [copy.deepcopy(route)]
    server.apply(route)
    step(lambda st: st.get("HTTPRoute", "demo", "split") == _lab_state(tmp_path, lab_objs).get("HTTPRoute", "demo", "split"))


def test_source_runs_on_the_event_loop_and_feeds_the_config_store(server: KubeApiServer) -> None:
    for o in cluster():
        server.create(o)

    async def main() -> None:
        store = ConfigStore(first_revision=0)
        source = KubeSource(api_client(server), store.update, watch_seconds=2, backoff=FastBackoff)
        task = asyncio.create_task(source.run())
        try:
            cfg = await asyncio.wait_for(store.wait_for_change("node1", 0), 5)
            assert {p.name for p in cfg.pods} == {"hello-1", "hello-2", "client"}
            server.create(namespace("other"))
            server.create(pod("other", "meshed", "node1", "10.244.1.50", {"app": "m"}))
            cfg2 = await asyncio.wait_for(store.wait_for_change("node1", cfg.version), 5)
            assert "meshed" in {p.name for p in cfg2.pods}
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        assert not any(r._watch for r in source.reflectors), "reflector threads stopped"

    asyncio.run(main())


def test_endpoints_follow_kubernetes_readiness_through_endpoint_slices(server: KubeApiServer, harness: Harness) -> None:
    """A selected pod that Kubernetes does not consider Ready is in the slice with ready=false and
    gets no traffic; the selector alone would have routed to it."""
    for o in cluster():
        server.create(o)
    starting = pod("demo", "hello-3", "node2", "10.244.2.9", {"app": "hello"}, sa="hello")
    starting["status"]["conditions"] = [{"type": "Ready", "status": "False"}]
    server.create(starting)
    reconcile_slices(server)
    harness.source.start_threads()

    def hello_pods(st: ClusterState) -> list[str]:
        svc = next(s for s in _configs(st)["node1"].services if s.name == "hello")
        return [e.pod for e in svc.ports[0].endpoints]

    st = harness.wait(lambda st: bool(st.of_kind("EndpointSlice")) and hello_pods(st) == ["hello-1", "hello-2"])
    (slice_,) = [s for s in st.of_kind("EndpointSlice") if s.service == "hello"]
    assert [(e.pod, e.ready) for e in slice_.endpoints] == [("hello-1", True), ("hello-2", True), ("hello-3", False)]
    starting["status"]["conditions"] = [{"type": "Ready", "status": "True"}]
    server.apply(starting)
    reconcile_slices(server)
    harness.wait(lambda st: hello_pods(st) == ["hello-1", "hello-2", "hello-3"])
