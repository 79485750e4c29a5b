"""The store bumps a node's version only when that node's config really changed."""

from __future__ import annotations

import asyncio
from dataclasses import replace

from nodemesh.controller.config_store import ConfigStore
from nodemesh.model import ClusterState, Container, Namespace, Node, Pod, Service, ServiceAccount, ServicePort

BASE = (Node("node1", "192.168.0.1", "10.244.1.0/24"), Node("node2", "192.168.0.2", "10.244.2.0/24"),
        Namespace("demo", labels={"nodemesh.io/mesh": "enabled"}))
WEB = Service("demo", "web", "10.96.0.10", (ServicePort(80, 8080, "http"),), selector={"app": "web"})


def web_pod(name: str, ip: str) -> Pod:
    return Pod("demo", name, "node1", "web", labels={"app": "web"}, containers=(Container("c"),), pod_ip=ip)


def state(*objs) -> ClusterState:
    return ClusterState().apply(BASE + objs)


def test_not_ready_until_first_state():
    store = ConfigStore(first_revision=0)
    assert not store.ready and store.config_for("node1") is None
    assert store.update(state()) == ["node1", "node2"]
    assert store.ready and store.revision == 1
    assert store.config_for("node1").version == 1


def test_unchanged_state_bumps_nothing():
    store = ConfigStore(first_revision=0)
    store.update(state(WEB))
    assert store.update(state(WEB)) == []
    assert store.revision == 1
    assert [store.config_for(n).version for n in ("node1", "node2")] == [1, 1]


def test_only_changed_nodes_bump():
    store = ConfigStore(first_revision=0)
    store.update(state(WEB))
    # A new node changes the node list every config carries: all bump, the newcomer included.
    changed = store.update(state(WEB, Node("node3", "192.168.0.3", "10.244.3.0/24")))
    assert changed == ["node1", "node2", "node3"] and store.revision == 2
    # An object that is not part of any config (a ServiceAccount) bumps nothing.
    assert store.update(state(WEB, Node("node3", "192.168.0.3", "10.244.3.0/24"), ServiceAccount("demo", "web"))) == []
    assert store.revision == 2
    assert {n: store.config_for(n).version for n in store.nodes()} == {"node1": 2, "node2": 2, "node3": 2}


def test_node_removed_from_state_still_gets_updates():
    # An agent of a removed node may still be connected: its config keeps following the state.
    store = ConfigStore(first_revision=0)
    store.update(state())
    assert store.update(ClusterState().apply((BASE[0], BASE[2]))) == ["node1", "node2"]
    assert [n.name for n in store.config_for("node2").nodes] == ["node1"]


def test_unknown_node_gets_a_config_on_demand_and_is_tracked():
    store = ConfigStore(first_revision=10)
    store.update(state(WEB))
    cfg = store.config_for("edge")
    assert cfg.node == "edge" and cfg.version == 11
    assert store.update(state(WEB, web_pod("a", "10.244.1.2"))) == ["edge", "node1", "node2"]
    assert store.config_for("edge").version == 12


def test_config_content_matches_state():
    store = ConfigStore(first_revision=0)
    store.update(state(WEB, web_pod("a", "10.244.1.2")))
    cfg = store.config_for("node1")
    assert [e.pod for e in cfg.services[0].ports[0].endpoints] == ["a"]
    # Everything but the authorization policy (local pods only) is the same for every node.
    assert replace(store.config_for("node2"), node="node1", extra={}) == replace(cfg, extra={})
    assert [p["name"] for p in cfg.extra["policy"]["pods"]] == ["a"] and store.config_for("node2").extra["policy"]["pods"] == ()


def test_waiters_wake_on_change_only_for_their_node_version():
    async def main() -> None:
        store = ConfigStore(first_revision=0)
        waiter = asyncio.ensure_future(store.wait_for_change("node1", 0))
        await asyncio.sleep(0)
        assert not waiter.done()
        store.update(state())
        assert (await asyncio.wait_for(waiter, 1)).version == 1
        # holding the current version: no wake-up on an update that changes nothing
        waiter = asyncio.ensure_future(store.wait_for_change("node1", 1))
        store.update(state())
        await asyncio.sleep(0.01)
        assert not waiter.done()
        store.update(state(WEB))
        assert (await asyncio.wait_for(waiter, 1)).version == 2

    asyncio.run(main())


def test_default_revision_is_time_based_so_restarts_never_reuse_versions():
    a = ConfigStore()
    b = ConfigStore()
    assert a.revision > 1_600_000_000_000 and b.revision >= a.revision
