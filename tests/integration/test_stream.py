"""Both ends of the config stream over real loopback sockets (127.0.0.1, ephemeral ports), on uvloop."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import uvloop

from nodemesh import wire
from nodemesh.agent.stream_client import ConfigStream
from nodemesh.controller.admin import serve_controller_admin
from nodemesh.controller.config_store import ConfigStore
from nodemesh.controller.main import ControllerOptions, serve
from nodemesh.controller.stream_server import PING_INTERVAL, StreamServer
from nodemesh.model import ClusterState, Container, Namespace, Node, Pod, Service, ServicePort
from nodemesh.nodeconfig import NodeConfig

TOKENS = {"node1": "s3cret-1", "node2": "s3cret-2"}
FAST = dict(backoff_base=0.02, backoff_cap=0.1, auth_retry=0.2, ping_interval=0.2)


def run(coro: Awaitable[Any]) -> Any:
    return uvloop.run(asyncio.wait_for(coro, 5))


async def until(cond: Callable[[], bool], timeout: float = 1.5) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


def cluster(*pod_ips: str) -> ClusterState:
    objs: list[Any] = [
        Node("node1", "192.168.0.1", "10.244.1.0/24"), Node("node2", "192.168.0.2", "10.244.2.0/24"),
        Namespace("demo", labels={"nodemesh.io/mesh": "enabled"}),
        Service("demo", "web", "10.96.0.10", (ServicePort(80, 8080, "http"),), selector={"app": "web"}),
    ]
    objs += [Pod("demo", f"web-{i}", "node1", "web", labels={"app": "web"}, containers=(Container("c"),), pod_ip=ip)
             for i, ip in enumerate(pod_ips)]
    return ClusterState().apply(objs)


def endpoint_ips(cfg: NodeConfig | None) -> list[str]:
    assert cfg is not None
    return [e.ip for e in cfg.services[0].ports[0].endpoints]


class Agent:
    """A ConfigStream plus a record of what its callback saw."""

    def __init__(self, port: int, node: str = "node1", token: str | None = None, fail: bool = False) -> None:
        self.seen: list[NodeConfig] = []
        self.fail = fail
        self.stream = ConfigStream(("127.0.0.1", port), node, TOKENS.get(node, "") if token is None else token,
                                   self.on_config, **FAST)
        self.task = asyncio.ensure_future(self.stream.run())

    def on_config(self, cfg: NodeConfig) -> None:
        if self.fail:
            raise ValueError("agent cannot program this config")
        self.seen.append(cfg)

    async def stop(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


async def controller(store: ConfigStore, port: int = 0) -> StreamServer:
    server = StreamServer(store, TOKENS, ping_interval=0.2)
    await server.start("127.0.0.1", port)
    return server


async def raw_hello(port: int, hello: dict[str, Any]) -> tuple[list[dict[str, Any]], bool]:
    """Sends one hello; returns the messages received within 0.3 s and whether the server closed."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(wire.encode(hello))
    dec, msgs, closed = wire.FrameDecoder(), [], False
    deadline = asyncio.get_running_loop().time() + 0.3
    try:
        while True:
            data = await asyncio.wait_for(reader.read(65536), deadline - asyncio.get_running_loop().time())
            if not data:
                closed = True
                break
            msgs += dec.feed(data)
    except asyncio.TimeoutError:
        pass
    writer.close()
    return msgs, closed


def test_agent_receives_config_and_later_changes():
    async def main() -> None:
        store = ConfigStore(first_revision=100)
        store.update(cluster("10.244.1.2"))
        server = await controller(store)
        agent = Agent(server.port)
        await until(lambda: agent.stream.version == 101)
        assert agent.stream.connected and agent.stream.last_error is None
        assert endpoint_ips(agent.stream.config) == ["10.244.1.2"] and agent.seen[0].node == "node1"

        store.update(cluster("10.244.1.2", "10.244.1.3"))
        await until(lambda: agent.stream.version == 102)
        assert endpoint_ips(agent.seen[-1]) == ["10.244.1.2", "10.244.1.3"]
        assert server.pushes["node1"] == 2 and server.agents_connected == 1
        await agent.stop()
        await until(lambda: server.agents_connected == 0)
        await server.close()

    run(main())


def test_agent_waits_for_first_state():
    async def main() -> None:
        store = ConfigStore(first_revision=0)
        server = await controller(store)
        agent = Agent(server.port)
        await asyncio.sleep(0.3)  # authenticated (pings flow) but nothing to send yet
        assert agent.stream.connected and agent.stream.version == 0 and agent.seen == []
        store.update(cluster())
        await until(lambda: agent.stream.version == 1)
        await agent.stop()
        await server.close()

    run(main())


@pytest.mark.parametrize("node, token, reason", [
    ("node1", "wrong", "bad bootstrap token for node 'node1'"),
    ("node9", "s3cret-1", "unknown node 'node9'"),
])
def test_bad_credentials_rejected_with_reason_and_counted(node, token, reason):
    async def main() -> None:
        store = ConfigStore(first_revision=0)
        store.update(cluster())
        server = await controller(store)
        msgs, closed = await raw_hello(server.port, {"type": "hello", "node": node, "token": token, "version": 0})
        assert msgs == [{"type": "error", "reason": msgs[0]["reason"]}] and closed
        assert reason in msgs[0]["reason"]
        assert server.auth_failures == 1 and server.agents_connected == 0

        agent = Agent(server.port, node=node, token=token)
        await until(lambda: agent.stream.last_error is not None and server.auth_failures >= 2)
        assert reason in agent.stream.last_error
        assert not agent.stream.connected and agent.stream.config is None and agent.seen == []
        assert server.pushes == {}
        await agent.stop()
        await server.close()

    run(main())


def test_malformed_hello_rejected_and_counted():
    async def main() -> None:
        store = ConfigStore(first_revision=0)
        server = await controller(store)
        msgs, closed = await raw_hello(server.port, {"type": "hello", "node": "node1"})
        assert closed and msgs[0]["type"] == "error" and "first message must be" in msgs[0]["reason"]
        # garbage instead of a frame: the server just closes
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"GET / HTTP/1.1\r\n\r\n")
        assert await asyncio.wait_for(reader.read(), 1) == b""
        writer.close()
        assert server.auth_failures == 1
        await server.close()

    run(main())


def test_resume_does_not_resend_unchanged_config():
    async def main() -> None:
        store = ConfigStore(first_revision=0)
        store.update(cluster("10.244.1.2"))
        server = await controller(store)
        # raw: holding the current version gets pings only, no config
        msgs, closed = await raw_hello(server.port, {"type": "hello", "node": "node1", "token": "s3cret-1", "version": 1})
        assert msgs and {m["type"] for m in msgs} == {"ping"} and not closed
        # holding another version (e.g. from another controller) gets the config
        msgs, _ = await raw_hello(server.port, {"type": "hello", "node": "node1", "token": "s3cret-1", "version": 7})
        assert msgs[0]["type"] == "config" and msgs[0]["version"] == 1

        agent = Agent(server.port)
        await until(lambda: agent.stream.version == 1)
        port = server.port
        await server.close()  # drops the connection; the store (the state) survives
        await until(lambda: not agent.stream.connected)
        server = await controller(store, port)
        await until(lambda: agent.stream.connected and server.agents_connected == 1)
        await asyncio.sleep(0.1)
        assert server.pushes == {} and len(agent.seen) == 1  # resumed at version 1: nothing resent
        store.update(cluster("10.244.1.3"))
        await until(lambda: agent.stream.version == 2)
        assert server.pushes["node1"] == 1
        await agent.stop()
        await server.close()

    run(main())


def test_controller_away_and_back_client_keeps_config_then_resyncs():
    async def main() -> None:
        store = ConfigStore(first_revision=0)
        store.update(cluster("10.244.1.2"))
        server = await controller(store)
        port = server.port
        agent = Agent(port)
        await until(lambda: agent.stream.version == 1)
        await server.close()

        await until(lambda: not agent.stream.connected and agent.stream.last_error is not None)
        await asyncio.sleep(0.2)  # several refused reconnects meanwhile
        assert agent.stream.version == 1 and endpoint_ips(agent.stream.config) == ["10.244.1.2"]

        # A restarted controller: a fresh store with a newer state.
        store = ConfigStore(first_revision=1000)
        store.update(cluster("10.244.1.3"))
        server = await controller(store, port)
        await until(lambda: agent.stream.version == 1001)
        assert agent.stream.connected and agent.stream.last_error is None
        assert endpoint_ips(agent.stream.config) == ["10.244.1.3"]
        await agent.stop()
        await server.close()

    run(main())


def test_rejected_config_keeps_the_old_one():
    async def main() -> None:
        store = ConfigStore(first_revision=0)
        store.update(cluster("10.244.1.2"))
        server = await controller(store)
        agent = Agent(server.port)
        await until(lambda: agent.stream.version == 1)
        agent.fail = True
        store.update(cluster("10.244.1.3"))
        await until(lambda: agent.stream.rejected_configs == 1)
        assert agent.stream.version == 1 and endpoint_ips(agent.stream.config) == ["10.244.1.2"]
        assert "rejected" in agent.stream.last_error and agent.stream.connected
        agent.fail = False
        store.update(cluster("10.244.1.4"))
        await until(lambda: agent.stream.version == 3)
        await agent.stop()
        await server.close()

    run(main())


# ---------------------------------------------------------------------------------------------
# Admin endpoints (h11 over asyncio) and the whole controller process


async def http(port: int, raw: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    await writer.drain()
    data = b""
    try:
        while True:
            chunk = await asyncio.wait_for(reader.read(65536), 0.3)
            if not chunk:
                break
            data += chunk
    except asyncio.TimeoutError:
        pass  # keep-alive: the server leaves the connection open
    writer.close()
    return data


def test_admin_endpoints_and_metrics():
    async def main() -> None:
        store = ConfigStore(first_revision=0)
        server = await controller(store)
        admin = await serve_controller_admin("127.0.0.1", 0, store, server, lambda: 3)
        aport = admin.sockets[0].getsockname()[1]
        assert (await http(aport, b"GET /ready HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")).startswith(b"HTTP/1.1 503 ")
        store.update(cluster())
        await raw_hello(server.port, {"type": "hello", "node": "node1", "token": "nope", "version": 0})
        # two requests on one keep-alive connection
        both = await http(aport, b"GET /ready HTTP/1.1\r\nhost: x\r\n\r\nGET /live HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        assert both.count(b"HTTP/1.1 200 ") == 2 and b"ready\n" in both and b"live\n" in both
        metrics = (await http(aport, b"GET /metrics?x=1 HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")).decode()
        assert metrics.startswith("HTTP/1.1 200 ")
        for line in ("nodemesh_controller_auth_failures_total 1.0", "nodemesh_controller_state_errors_total 3.0",
                     "nodemesh_controller_agents_connected 0.0", "nodemesh_controller_revision 1.0"):
            assert line in metrics
        assert (await http(aport, b"GET /nope HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")).startswith(b"HTTP/1.1 404 ")
        resp = await http(aport, b"POST /ready HTTP/1.1\r\nhost: x\r\nconnection: close\r\ncontent-length: 2\r\n\r\nhi")
        assert resp.startswith(b"HTTP/1.1 405 ") and b"allow: GET, HEAD" in resp
        assert (await http(aport, b"garbage\r\n\r\n")).startswith(b"HTTP/1.1 400 ")
        head = await http(aport, b"HEAD /live HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ") and head.endswith(b"\r\n\r\n")
        admin.close()
        await server.close()

    run(main())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_end_to_end(tmp_path: Path):
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    src = Path(__file__).parents[2] / "nodemesh" / "labs" / "default.yaml"
    lab = src.read_text().replace("name: node1\n", "name: node1\nspec: {podCIDR: 10.244.1.0/24}\n"
                                  "status: {addresses: [{type: InternalIP, address: 192.168.0.1}]}\n", 1)
    (state_dir / "lab.yaml").write_text(lab)
    tokens = tmp_path / "tokens.json"
    tokens.write_text(json.dumps(TOKENS))
    sport, aport = free_port(), free_port()

    async def main() -> None:
        task = asyncio.ensure_future(serve(ControllerOptions(str(state_dir), ("127.0.0.1", sport), ("127.0.0.1", aport), str(tokens), "example.org")))
        agent = Agent(sport)
        # serve() pings every PING_INTERVAL: an agent expecting FAST pings would time out and reconnect
        agent.stream.ping_interval = PING_INTERVAL
        await until(lambda: agent.stream.version > 0)
        cfg = agent.stream.config
        assert cfg.trust_domain == "example.org" and [n.name for n in cfg.nodes] == ["node1"]
        assert (await http(aport, b"GET /ready HTTP/1.1\r\nhost: x\r\n\r\n")).startswith(b"HTTP/1.1 200 ")
        # the lab assigns a pod IP: the endpoint reaches the agent
        text = (state_dir / "lab.yaml").read_text()
        text += "---\napiVersion: v1\nkind: Pod\nmetadata: {name: hello-3, namespace: demo, labels: {app: hello}}\n" \
                "spec: {nodeName: node1, serviceAccountName: hello}\nstatus: {podIP: 10.244.1.7}\n"
        # atomically (as `lab apply` does): a watcher that sees the truncated file would push twice
        (state_dir / ".lab.yaml.tmp").write_text(text)
        os.replace(state_dir / ".lab.yaml.tmp", state_dir / "lab.yaml")
        await until(lambda: endpoint_ips(agent.stream.config) == ["10.244.1.7"])
        assert agent.stream.config.pods[0].identity == "spiffe://example.org/ns/demo/sa/hello"
        # a malformed file is counted and changes nothing else
        (state_dir / "bad.yaml").write_text("kind: [")
        for _ in range(100):
            metrics = await http(aport, b"GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            if b"nodemesh_controller_state_errors_total 1.0" in metrics:
                break
            await asyncio.sleep(0.05)
        assert b"nodemesh_controller_state_errors_total 1.0" in metrics
        assert b'nodemesh_controller_config_pushes_total{node="node1"} 2.0' in metrics
        assert agent.stream.connected and endpoint_ips(agent.stream.config) == ["10.244.1.7"]
        await agent.stop()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    run(main())


def _secret_volume(root: Path, files: dict[str, bytes], generation: int) -> None:
    """Lay out `files` the way the kubelet projects a Secret: real files in a timestamped dir,
    `..data` a symlink to it (swapped atomically), each key a symlink through `..data`."""
    data = root / f"..{generation}"
    data.mkdir()
    for name, content in files.items():
        (data / name).write_bytes(content)
    tmp = root / "..data_tmp"
    os.symlink(data.name, tmp)
    os.replace(tmp, root / "..data")
    for name in files:
        if not (root / name).is_symlink():
            os.symlink(f"..data/{name}", root / name)


def test_controller_adopts_a_renewed_issuer_secret_without_sighup(tmp_path: Path):
    from nodemesh.controller.ca import ANCHOR_FILE, ISSUER_FILE, ISSUER_KEY_FILE, new_issuer, new_trust_anchor, to_pem
    from nodemesh.scrape import total

    state_dir = tmp_path / "state"
    state_dir.mkdir()
    tokens = tmp_path / "tokens.json"
    tokens.write_text(json.dumps(TOKENS))
    anchor = new_trust_anchor("example.org")

    def issuer_files() -> dict[str, bytes]:
        issuer = new_issuer(anchor, "example.org")
        return {ANCHOR_FILE: to_pem([anchor.cert]).encode(), ISSUER_FILE: issuer.cert_pem(), ISSUER_KEY_FILE: issuer.key_pem()}

    secret = tmp_path / "issuer"
    secret.mkdir()
    _secret_volume(secret, issuer_files(), 1)
    sport, aport = free_port(), free_port()

    async def rotations() -> float:
        response = await http(aport, b"GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        return total(response.partition(b"\r\n\r\n")[2].decode(), "nodemesh_controller_issuer_rotations_total")

    async def main() -> None:
        opts = ControllerOptions(str(state_dir), ("127.0.0.1", sport), ("127.0.0.1", aport), str(tokens), "example.org",
                                 ca_dir=str(secret), ca_reload_interval=0.05)
        task = asyncio.ensure_future(serve(opts))
        try:
            for _ in range(100):
                with contextlib.suppress(OSError):
                    if await rotations() == 0:
                        break
                await asyncio.sleep(0.05)
            assert await rotations() == 0
            await asyncio.sleep(0.3)
            assert await rotations() == 0  # nothing changed: nothing reloaded
            _secret_volume(secret, issuer_files(), 2)  # the kubelet projects the renewed Secret
            for _ in range(100):
                if await rotations() == 1:
                    break
                await asyncio.sleep(0.05)
            assert await rotations() == 1
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    run(main())
