"""Bench note for issue 4: cross-node mTLS tunnel vs the plaintext tunnel, and CSR signing rate.

Two real NodeProxy instances on loopback (node1 -> node2), an echo pod on node2, measured in ONE
run, interleaved (the VM is noisy: only ratios side by side mean anything):
  - latency: 1-byte ping-pong on one kept-alive pod connection, p50/p99 (µs);
  - churn: a new pod connection per request (connect, 1 round trip, close), conn/s and p50;
  - tunnel handshakes: TLS handshakes the node1 pool made over the whole run (the design
    goal: 1 per (source identity, cert generation, destination), not one per connection);
  - CSR signing: check_csr + CA sign per second in the controller (CPU only), and end to end
    over a real mTLS config stream (agent CertStore -> controller -> chain back).

    .venv/bin/python bench/mtls_bench.py [--seconds 3] [--rounds 3]   -> JSON on stdout
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import time
from typing import Any

import uvloop
from cryptography.hazmat.primitives import serialization

from nodemesh import spiffe
from nodemesh.agent.identity import make_csr, new_key
from nodemesh.agent.identity_client import AgentIdentity
from nodemesh.agent.proxy import NodeProxy
from nodemesh.controller.ca import CertificateAuthority, new_issuer, new_trust_anchor
from nodemesh.controller.csr_policy import check_csr
from nodemesh.nodeconfig import Endpoint, NodeConfig, NodeInfo, ServicePortView, ServiceView, WorkloadPod

TD = "cluster.local"
CLIENT_IP, ECHO_IP, VIP = "127.0.1.20", "127.0.2.11", "10.96.0.30"
CLIENT_ID, ECHO_ID = spiffe.workload_id(TD, "default", "client"), spiffe.workload_id(TD, "default", "echo")


class Echo(asyncio.Protocol):
    def connection_made(self, t: Any) -> None:
        self.t = t

    def data_received(self, d: bytes) -> None:
        self.t.write(d)


def provision(ca: CertificateAuthority, ident: AgentIdentity, who: str) -> None:
    grant = check_csr(ident.store.request(who), ident.node, TD, {who})
    ident.store.accept(who, [c.public_bytes(serialization.Encoding.PEM).decode() for c in ca.sign(grant.public_key, grant.identity)])


class Pair:
    """node1 -> node2 with the same config; `mtls` picks the cross-node path."""

    def __init__(self, mtls: bool, ca: CertificateAuthority, echo_port: int) -> None:
        self.mtls, self.ca, self.echo_port = mtls, ca, echo_port
        self.orig: dict[tuple[str, int], tuple[str, int]] = {}

    async def start(self) -> None:
        self.ids = {n: AgentIdentity(n, "-", self.ca.bundle_pem(), TD) for n in ("node1", "node2")}
        self.proxies = {n: NodeProxy(n, original_dst=lambda ip, port: self.orig.get((ip, port)), connect_timeout=2.0) for n in self.ids}
        tports: dict[str, int] = {}
        for n, p in self.proxies.items():
            if self.mtls:
                tports[n] = (await p.enable_mtls(self.ids[n], ("127.0.0.1", 0), tunnel_addr=lambda node, _: ("127.0.0.1", tports[node])))[1]
            await p.start(("127.0.0.1", 0), ("127.0.0.1", 0))
        ep = Endpoint("default", "echo-2", ECHO_IP, self.echo_port, "node2", ECHO_ID)
        nodes = tuple(NodeInfo(n, "127.0.0.1", f"127.0.{i}.0/24", p.addresses.inbound[1]) for i, (n, p) in enumerate(self.proxies.items(), 1))
        for n, p in self.proxies.items():
            cfg = NodeConfig(1, n, nodes=nodes, pods=(WorkloadPod("default", "client-1", CLIENT_IP, "node1", "client", CLIENT_ID),
                                                      WorkloadPod("default", "echo-2", ECHO_IP, "node2", "echo", ECHO_ID)),
                             services=(ServiceView("default", "echo", VIP, (ServicePortView(80, "tcp", "TCP", (ep,)),)),))
            p.apply_config(cfg)
            self.ids[n].set_config(cfg)
        if self.mtls:
            provision(self.ca, self.ids["node1"], CLIENT_ID)
            provision(self.ca, self.ids["node2"], ECHO_ID)

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        loop = asyncio.get_running_loop()
        s = socket.socket()
        s.setblocking(False)
        s.bind((CLIENT_IP, 0))
        self.orig[s.getsockname()] = (ECHO_IP, self.echo_port)  # pod IP: L4 path, no HTTP detection
        await loop.sock_connect(s, self.proxies["node1"].addresses.outbound)
        return await asyncio.open_connection(sock=s)

    async def stop(self) -> None:
        for p in self.proxies.values():
            await p.stop()


async def latency(pair: Pair, seconds: float) -> list[float]:
    r, w = await pair.connect()
    samples: list[float] = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        w.write(b"x")
        await r.readexactly(1)
        samples.append((time.perf_counter() - t0) * 1e6)
    w.close()
    return samples[10:]


async def churn(pair: Pair, seconds: float) -> tuple[float, list[float]]:
    samples: list[float] = []
    start = time.perf_counter()
    end = start + seconds
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        r, w = await pair.connect()
        w.write(b"x")
        await r.readexactly(1)
        w.close()
        samples.append((time.perf_counter() - t0) * 1e6)
    return len(samples) / (time.perf_counter() - start), samples


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(len(xs) * p))], 1)


def csr_rate(ca: CertificateAuthority, n: int = 400) -> float:
    csrs = [make_csr(new_key(), CLIENT_ID) for _ in range(n)]  # agent-side work, not timed
    t0 = time.perf_counter()
    for c in csrs:
        g = check_csr(c, "node1", TD, {CLIENT_ID})
        ca.sign(g.public_key, g.identity)
    return n / (time.perf_counter() - t0)


async def csr_rate_over_stream(n: int = 300) -> float:
    """End to end: n certificates through a real mTLS config stream, pipelined."""
    from nodemesh.agent.stream_client import ConfigStream
    from nodemesh.controller.config_store import ConfigStore
    from nodemesh.controller.identity_service import IdentityService
    from nodemesh.controller.stream_server import StreamServer
    from nodemesh.model import ClusterState, Container, Namespace, Node, Pod

    anchor = new_trust_anchor(TD)
    ca = CertificateAuthority(TD, [anchor.cert], new_issuer(anchor, TD), 3600)
    store = ConfigStore(first_revision=1)
    pods = [Pod("demo", f"p{i}", "node1", f"sa{i}", containers=(Container("c"),), pod_ip=f"10.244.{1 + i // 250}.{i % 250 + 2}") for i in range(n)]
    store.update(ClusterState().apply([Node("node1", "192.168.0.1", "10.244.0.0/16"), Namespace("demo", labels={"nodemesh.io/mesh": "enabled"}), *pods]))
    svc = IdentityService(ca, store, {"node1": "t"})
    server = StreamServer(store, {"node1": "t"}, identity=svc)
    await server.start("127.0.0.1", 0, ssl=svc.server_context())
    ident = AgentIdentity("node1", "t", ca.bundle_pem(), TD)
    t0 = time.perf_counter()
    stream = ConfigStream(("127.0.0.1", server.port), "node1", "", ident.set_config, identity=ident)
    task = asyncio.ensure_future(stream.run())
    while len(ident.store.creds) < n + 1:
        await asyncio.sleep(0.005)
    rate = n / (time.perf_counter() - t0)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await server.close()
    return rate


async def main(seconds: float, rounds: int) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    echo = await loop.create_server(Echo, ECHO_IP, 0)
    port = echo.sockets[0].getsockname()[1]
    anchor = new_trust_anchor(TD)
    ca = CertificateAuthority(TD, [anchor.cert], new_issuer(anchor, TD), 3600)
    pairs = {"plaintext": Pair(False, ca, port), "mtls": Pair(True, ca, port)}
    for p in pairs.values():
        await p.start()
    lat: dict[str, list[float]] = {k: [] for k in pairs}
    conn_rates: dict[str, list[float]] = {k: [] for k in pairs}
    conn_lat: dict[str, list[float]] = {k: [] for k in pairs}
    t_start = time.perf_counter()
    for _ in range(rounds):  # interleaved so drift hits both paths alike
        for name, pair in pairs.items():
            lat[name] += await latency(pair, seconds)
            rate, samples = await churn(pair, seconds)
            conn_rates[name].append(rate)
            conn_lat[name] += samples
    elapsed = time.perf_counter() - t_start
    handshakes = pairs["mtls"].proxies["node1"].tunnels.tls.handshakes
    result: dict[str, Any] = {}
    for name in pairs:
        result[name] = {"rtt_p50_us": pct(lat[name], 0.5), "rtt_p99_us": pct(lat[name], 0.99),
                        "new_conn_per_s": round(statistics.median(conn_rates[name])), "new_conn_p50_us": pct(conn_lat[name], 0.5)}
    result["mtls_added_rtt_p50_us"] = round(result["mtls"]["rtt_p50_us"] - result["plaintext"]["rtt_p50_us"], 1)
    result["mtls_rtt_ratio"] = round(result["mtls"]["rtt_p50_us"] / result["plaintext"]["rtt_p50_us"], 2)
    result["mtls_conn_rate_ratio"] = round(result["mtls"]["new_conn_per_s"] / result["plaintext"]["new_conn_per_s"], 2)
    result["tunnel_tls_handshakes_node1"] = handshakes
    result["tunnel_tls_handshakes_per_s"] = round(handshakes / elapsed, 3)
    result["pod_connections_over_tunnel"] = len(conn_lat["mtls"]) + rounds
    result["csr_sign_per_s_controller_cpu"] = round(csr_rate(ca))
    result["csr_per_s_over_mtls_stream"] = round(await csr_rate_over_stream())
    for p in pairs.values():
        await p.stop()
    echo.close()
    return result


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    print(json.dumps(uvloop.run(main(a.seconds, a.rounds)), indent=2))
