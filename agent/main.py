"""The agent process: BPF redirect programs + node proxy + config stream + admin server.

Start order matters: BPF is attached before the listeners accept (a redirected connect must find
a listener, and a failed attach must stop the agent before it pretends to be ready); the config
stream starts after the listeners, because applying a config is what makes BPF redirect anything.
Shutdown (SIGTERM/SIGINT): stop accepting, detach BPF, exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import uvloop

from nodemesh.agent.config import AgentConfig
from nodemesh.agent.metrics import CONTENT_TYPE
from nodemesh.agent.outbound import OutboundConnection
from nodemesh.agent.proxy import NodeProxy
from nodemesh.errors import NodemeshError, PreflightError

log = logging.getLogger("nodemesh.agent")

Response = tuple[int, str, bytes]


class AgentStartError(PreflightError):
    """The agent cannot start (token unreadable, BPF cannot attach, a port is taken)."""


class AgentFailed(NodemeshError):
    """The agent stopped serving because a part it cannot run without failed."""


def readiness(bpf_attached: bool, listening: bool, config_applied: bool, stream_error: str | None) -> Response:
    """/ready: 200 only when traffic can flow; otherwise 503 and the first missing piece, one line."""
    if not bpf_attached:
        reason = "BPF redirect programs are not attached"
    elif not listening:
        reason = "proxy listeners are not up"
    elif not config_applied:
        reason = "no config from the controller yet" + (f" (last error: {stream_error})" if stream_error else "")
    else:
        return 200, "text/plain; charset=utf-8", b"ready\n"
    return 503, "text/plain; charset=utf-8", (reason + "\n").encode()


def _read_token(path: str) -> str:
    try:
        token = Path(path).read_text().strip()
    except OSError as exc:
        raise AgentStartError(f"cannot read the node token from {path}: {exc.strerror or exc}; check AgentConfig.token_file") from None
    if not token:
        raise AgentStartError(f"the node token file {path} is empty")
    return token


def _identity(cfg: AgentConfig, token: Callable[[], str]) -> Any:
    from nodemesh.agent.identity_client import AgentIdentity

    try:
        anchor = Path(cfg.trust_anchor_file).read_text()
    except OSError as exc:
        raise AgentStartError(f"cannot read the trust anchor {cfg.trust_anchor_file}: {exc.strerror or exc}") from None
    if "BEGIN CERTIFICATE" not in anchor:
        raise AgentStartError(f"the trust anchor file {cfg.trust_anchor_file} holds no PEM certificate")
    return AgentIdentity(cfg.node, token, anchor, cfg.trust_domain, state_dir=cfg.identity_dir)


async def serve(cfg: AgentConfig) -> None:
    """Run the agent until SIGTERM/SIGINT. Raises AgentStartError / AgentFailed (NodemeshError)."""
    # Imported here: a bpf=False run (and import-time tests) need none of it. The agent itself never
    # imports bcc: with a pin dir the loader compiles in a child process (agent/bpf_child.py).
    from nodemesh.admin_http import serve_admin
    from nodemesh.agent.stream_client import ConfigStream

    _read_token(cfg.token_file)  # fail fast; then re-read at each use: Kubernetes rotates projected tokens

    def token() -> str:
        return _read_token(cfg.token_file)

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    from nodemesh.agent.redirect_mode import choose_redirect

    # BPF, or the nftables fallback (`--redirect`): decided and logged once, before listening.
    progs, nat = choose_redirect(cfg)
    proxy: NodeProxy

    def set_meshed(dsts: Any) -> None:
        if progs is not None:
            progs.set_meshed(dsts)
        if nat is not None:
            nat.update(proxy.view)

    proxy = NodeProxy(
        cfg.node,
        original_dst=progs.lookup_original_dst if progs is not None else (lambda ip, port: None),
        set_meshed=set_meshed if progs is not None or nat is not None else None,
        bpf_counters=progs.counters if progs is not None else None,
        connect_timeout=cfg.connect_timeout,
    )
    if nat is not None and nat.redirect:
        proxy.use_conntrack_original_dst()
    if progs is not None and progs.splice_ready:  # cfg.splice is nm_settings[1]: switchable at run time
        from nodemesh.agent.splice import Splicer

        proxy.enable_splice(Splicer(progs))
    identity = _identity(cfg, token) if cfg.trust_anchor_file else None
    admin = None
    stream_task: asyncio.Task[None] | None = None
    try:
        try:
            if identity is not None:  # before start(): remote plans go through mTLS tunnels only
                await proxy.enable_mtls(identity, (cfg.inbound_bind_ip, cfg.tunnel_port))
            await proxy.start((cfg.proxy_ip, cfg.outbound_port), (cfg.inbound_bind_ip, cfg.inbound_port))
            if progs is not None:  # connect4 spreads destinations over these too (bpf/connect.c)
                for port in cfg.outbound_spread_ports:
                    await proxy.listen_extra(OutboundConnection, (cfg.proxy_ip, port))
            if nat is not None:
                from nodemesh.agent.capture import CapturedConnection, CaptureStats

                captured = CaptureStats()
                proxy.metrics.registry.register(captured)
                await proxy.listen_extra(lambda ctx: CapturedConnection(ctx, captured), (cfg.proxy_ip, cfg.capture_port))
        except OSError as exc:
            raise AgentStartError(f"cannot listen on {cfg.proxy_ip}:{cfg.outbound_port} (and spread ports "
                                  f"{','.join(map(str, cfg.outbound_spread_ports)) or 'none'}) / "
                                  f"{cfg.inbound_bind_ip}:{cfg.inbound_port}: {exc.strerror or exc}") from exc

        # The stream treats an exception from on_config as "this config rejected, keep the last".
        on_config = identity.wrap(proxy.apply_config) if identity is not None else proxy.apply_config
        stream = ConfigStream(cfg.controller, cfg.node, token, on_config, identity=identity)
        routes = {
            "/ready": lambda: readiness(progs is not None or nat is not None or not cfg.bpf, proxy.listening, proxy.config_applied, stream.last_error),
            "/live": lambda: (200, "text/plain; charset=utf-8", b"live\n"),
            "/metrics": lambda: (200, CONTENT_TYPE, proxy.metrics.render()),
        }
        if identity is not None:  # `nodemesh identity` reads this: certificates held, never keys
            routes["/identity"] = lambda: (200, "application/json", json.dumps(
                {"node": cfg.node, "certificates": identity.describe(), "refused": identity.store.refused, "bundle": identity.describe_bundle(),
                 "tunnel_handshakes": proxy.tunnels.tls.handshakes, "tunnel_connections": proxy.tunnels.connections_opened}).encode())
        try:
            admin = await serve_admin(cfg.admin[0], cfg.admin[1], routes)
        except OSError as exc:
            raise AgentStartError(f"cannot listen on admin {cfg.admin[0]}:{cfg.admin[1]}: {exc.strerror or exc}") from exc
        stream_task = loop.create_task(stream.run(), name="config-stream")
        log.info("agent for node %s up (redirect=%s, capture=%s)", cfg.node,
                 "bpf" if progs is not None else "iptables" if nat is not None and nat.redirect else "none", nat is not None)

        stopped = loop.create_task(stop.wait())
        await asyncio.wait({stopped, stream_task}, return_when=asyncio.FIRST_COMPLETED)
        if not stop.is_set():
            stopped.cancel()
            exc = stream_task.exception() if not stream_task.cancelled() else None
            raise AgentFailed(f"config stream to {cfg.controller[0]}:{cfg.controller[1]} ended: {exc or 'returned'}")
        log.info("signal received: stopping")
    finally:
        if stream_task is not None and not stream_task.done():
            stream_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await stream_task
        await proxy.stop()
        if progs is not None:
            progs.close()  # unpinned: detach (pods connect directly again); pinned: stays for the next agent
        if nat is not None and not cfg.bpf_pin_dir:
            # Like pinned BPF, the NAT rules outlive a supervised agent: while it is down, captured
            # and redirected connects are refused (fail closed) instead of bypassing the mesh.
            with contextlib.suppress(NodemeshError):
                nat.remove()
        if admin is not None:
            admin.close()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


def run(cfg: AgentConfig) -> None:
    """Blocking entry point (uvloop). Exits the process with the error's exit code on failure, 0 on signal."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        uvloop.run(serve(cfg))
    except NodemeshError as exc:
        log.error("%s", exc)
        sys.exit(exc.exit_code)
