"""The controller process: file source -> config store -> config stream, plus the admin server."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from dataclasses import dataclass
from typing import Any

import uvloop

from nodemesh.errors import ConfigError, NodemeshError
from nodemesh.model import DEFAULT_TRUST_DOMAIN
from nodemesh.policy_model import check_default_policy

from nodemesh.controller.admin import serve_controller_admin
from nodemesh.controller.agent_auth import AgentAuthenticator, StaticTokens, TokenReviewAuthenticator
from nodemesh.controller.ca import DEFAULT_LEAF_LIFETIME, CaError, CertificateAuthority, load_ca_dir
from nodemesh.controller.ca_watch import DEFAULT_INTERVAL, watch_ca_dir
from nodemesh.controller.config_store import ConfigStore
from nodemesh.controller.identity_service import IdentityService
from nodemesh.controller.file_source import DirSource
from nodemesh.controller.stream_server import StreamServer, load_tokens

log = logging.getLogger("nodemesh.controller")


@dataclass(frozen=True)
class ControllerOptions:
    """Everything `nodemesh controller run` configures (the CLI's flags, one field each)."""

    state_dir: str = ""
    listen: tuple[str, int] = ("0.0.0.0", 8086)
    admin: tuple[str, int] = ("0.0.0.0", 9990)
    tokens_file: str | None = None
    trust_domain: str = DEFAULT_TRUST_DOMAIN
    default_policy: str = "all-unauthenticated"
    ca_dir: str | None = None
    leaf_lifetime: float | None = None
    source_kind: str = "files"
    kubeconfig: str | None = None
    agent_auth: str = "tokens"
    token_audience: str = "nodemesh-controller"
    agent_service_account: str = "nodemesh/nodemesh-agent"
    ca_reload_interval: float = DEFAULT_INTERVAL  # seconds between checks of ca_dir (0: SIGHUP only)


async def serve(opts: ControllerOptions) -> None:
    """Runs the controller until SIGTERM/SIGINT (or until cancelled), then shuts down cleanly.
    With `ca_dir` the controller is the mesh CA and the config stream is mTLS (a change of the
    files in `ca_dir`, or SIGHUP, re-reads the issuer and trust bundle: issuer rotation). Agents are authenticated by the
    static tokens in `tokens_file` (agent_auth "tokens") or by TokenReview ("tokenreview")."""
    state_dir, listen, admin, ca_dir, source_kind = opts.state_dir, opts.listen, opts.admin, opts.ca_dir, opts.source_kind
    store = ConfigStore(default_policy=check_default_policy(opts.default_policy, "--default-inbound-policy"))
    # fail fast: without tokens (or API access for TokenReview) no agent can ever connect
    authenticator = _authenticator(opts.agent_auth, opts.tokens_file, opts.kubeconfig, opts.token_audience,
                                   opts.agent_service_account, store)
    source = _make_source(source_kind, state_dir, opts.kubeconfig, store, opts.trust_domain)
    identity = _identity_service(ca_dir, opts.trust_domain, opts.leaf_lifetime, store, authenticator) if ca_dir else None
    stream = StreamServer(store, identity=identity, authenticator=authenticator)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    handled = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):  # not the main thread
            loop.add_signal_handler(sig, stop.set)
            handled.append(sig)
    if identity is not None:
        assert ca_dir is not None
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(signal.SIGHUP, _reload_ca, identity, ca_dir)
            handled.append(signal.SIGHUP)

    admin_server = await serve_controller_admin(*admin, store, stream, lambda: source.errors_total)
    try:
        await stream.start(*listen, ssl=identity.server_context() if identity is not None else None)
        watch = asyncio.create_task(source.run(), name="file-source")
        ca_watch = None
        if identity is not None and ca_dir is not None and opts.ca_reload_interval > 0:
            ca_watch = asyncio.create_task(watch_ca_dir(ca_dir, lambda: _reload_ca(identity, ca_dir), opts.ca_reload_interval),
                                           name="ca-watch")
        log.info("controller up: config stream on %s:%d, admin on %s:%d, state from %s, agents authenticated by %s",
                 listen[0], stream.port, admin[0], admin_server.sockets[0].getsockname()[1],
                 state_dir if source_kind == "files" else "the Kubernetes API", opts.agent_auth)
        try:
            await stop.wait()
            log.info("signal received; shutting down")
        finally:
            for task in (watch, ca_watch):
                if task is not None:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
    finally:
        await stream.close()
        admin_server.close()
        for sig in handled:
            loop.remove_signal_handler(sig)


def _make_source(kind: str, state_dir: str, kubeconfig: str | None, store: ConfigStore, trust_domain: str) -> Any:
    """The standalone file source, or list+watch of a Kubernetes API server (same contract)."""
    if kind == "kubernetes":
        from nodemesh.controller.k8s_source import KubeSource, make_api_client

        return KubeSource(make_api_client(kubeconfig), store.update, trust_domain=trust_domain)
    return DirSource(state_dir, store.update, trust_domain=trust_domain)


def _authenticator(kind: str, tokens_file: str | None, kubeconfig: str | None, audience: str, service_account: str,
                   store: ConfigStore) -> AgentAuthenticator:
    """The lab's static tokens, or TokenReview against the API server (in-cluster or --kubeconfig)."""
    if kind == "tokenreview":
        from nodemesh.controller.k8s_source import make_api_client

        namespace, _, name = service_account.partition("/")
        # The state resolves pod-bound tokens (API servers before 1.30) to the agent pod's node.
        return TokenReviewAuthenticator(make_api_client(kubeconfig), audience, namespace, name, state=lambda: store.state)
    if kind != "tokens" or not tokens_file:
        raise ConfigError(f"agent authentication {kind!r} needs a tokens file" if kind == "tokens"
                          else f"unknown agent authentication {kind!r}: use tokens or tokenreview")
    return StaticTokens(load_tokens(tokens_file))


def _identity_service(ca_dir: str, trust_domain: str, leaf_lifetime: float | None, store: ConfigStore,
                      authenticator: AgentAuthenticator) -> IdentityService:
    anchors, issuer = load_ca_dir(ca_dir)  # CaError (a NodemeshError) names the bad file
    ca = CertificateAuthority(trust_domain, anchors, issuer, leaf_lifetime or DEFAULT_LEAF_LIFETIME)
    log.info("CA ready: issuer %s (until %s), %d trust anchor(s), leaf lifetime %gs", issuer.cert.subject.rfc4514_string(),
             issuer.cert.not_valid_after_utc, len(anchors), ca.leaf_lifetime)
    return IdentityService(ca, store, authenticator=authenticator)


def _reload_ca(identity: IdentityService, ca_dir: str) -> None:
    """SIGHUP or a change in `ca_dir`: adopt the issuer/bundle on disk. A bad file is logged and the
    CA in force stays."""
    try:
        anchors, issuer = load_ca_dir(ca_dir)
        if identity.reload(anchors, issuer):  # new handshakes and every agent get the new bundle
            log.info("issuer rotated: now %s", issuer.cert.subject.rfc4514_string())
        else:
            log.info("CA reloaded: issuer unchanged, %d trust anchor(s)", len(anchors))
    except CaError as exc:
        log.error("CA reload refused, keeping the current issuer: %s", exc)


def run(opts: ControllerOptions, log_level: str = "INFO") -> None:
    """Entry point for the CLI: logs to stderr and runs `serve` on uvloop."""
    logging.basicConfig(stream=sys.stderr, level=log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        uvloop.run(serve(opts))
    except NodemeshError as exc:  # one clear sentence, no traceback
        log.error("%s", exc)
        sys.exit(exc.exit_code)
