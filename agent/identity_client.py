"""The agent's side of identity: bootstrap a node certificate with the node token, then keep every
wanted certificate (node + local workloads) fresh by sending CSRs over the mTLS config stream.

Keys are generated here (CertStore.request) and never sent anywhere; only CSRs and chains travel.
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
import time
from collections.abc import Callable
from typing import Any

from nodemesh import spiffe, tlsctx, wire
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from nodemesh.agent.identity import CertStore, ChainError, Credential, check_bundle, check_chain, describe_bundle
from nodemesh.errors import NodemeshError, ProtocolError
from nodemesh.nodeconfig import NodeConfig

log = logging.getLogger(__name__)

BOOTSTRAP_TIMEOUT = 10.0
CSR_TICK = 0.5  # upper bound between checks for due renewals (renewal itself is at 70% of life)


class BootstrapError(NodemeshError):
    """The controller refused our bootstrap (bad/reused token, unknown node)."""


def verify_peer(transport_or_writer: Any, expected: str, trust_domain: str) -> str:
    """Checks the verified TLS peer's SPIFFE ID is `expected`; returns it or raises IdentityError."""
    ssl_obj = transport_or_writer.get_extra_info("ssl_object")
    if ssl_obj is None:
        raise spiffe.IdentityError("connection is not TLS", "no_certificate")
    sid = str(spiffe.der_identity(ssl_obj.getpeercert(binary_form=True), trust_domain))
    if sid != expected:
        raise spiffe.IdentityError(f"peer is {sid}, expected {expected}", "unexpected_identity")
    return sid


class AgentIdentity:
    def __init__(self, node: str, token: str | Callable[[], str], trust_anchor_pem: str, trust_domain: str = "cluster.local",
                 clock: Callable[[], float] = time.time, state_dir: str = "") -> None:
        self.node = node
        self._token = token  # a callable is read at each bootstrap (a rotated projected token)
        self.trust_domain = trust_domain
        self.store = CertStore(trust_domain, clock)
        self.store.set_bundle(trust_anchor_pem)
        self.node_identity = spiffe.node_id(trust_domain, node)
        self.workloads: frozenset[str] = frozenset()
        self.on_change: list[Callable[[Credential], None]] = []
        self._ids: dict[int, str] = {}
        self._next_id = 0
        self._wake = asyncio.Event()
        self.issued = 0
        self.refusals = 0
        self.bundle_refusals = 0  # bundle pushes that were not PEM CA certificates
        self.state_dir = state_dir
        if state_dir:
            self._load_node_credential()
            self.on_change.append(self._save_node_credential)

    # --- node credential across restarts (the token is single use) ------------------------------

    def _node_file(self) -> str:
        return os.path.join(self.state_dir, "node-credential.pem")

    def _load_node_credential(self) -> None:
        try:
            with open(self._node_file(), "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return
        try:
            key = serialization.load_pem_private_key(data, password=None)
            chain = [c.public_bytes(serialization.Encoding.PEM).decode() for c in x509.load_pem_x509_certificates(data)]
            assert isinstance(key, ec.EllipticCurvePrivateKey)
            certs = check_chain(chain, self.node_identity, key, self.trust_domain)
        except (ValueError, TypeError, AssertionError, ChainError) as exc:
            log.warning("ignoring the stored node credential %s: %s", self._node_file(), exc)
            return
        self.store.creds[self.node_identity] = Credential(self.node_identity, key, certs, 1)
        if self.store.get(self.node_identity) is not None:
            log.info("reusing the stored node certificate (valid until %s)", certs[0].not_valid_after_utc)

    def _save_node_credential(self, cred: Credential) -> None:
        if cred.identity != self.node_identity:
            return
        os.makedirs(self.state_dir, mode=0o700, exist_ok=True)
        path = self._node_file()
        tmp = path + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(cred.key_pem() + cred.chain_pem())
        os.replace(tmp, path)

    def wrap(self, on_config: Callable[[NodeConfig], None]) -> Callable[[NodeConfig], None]:
        """on_config for the stream: the proxy's, then which certificates this node must hold."""
        def both(cfg: NodeConfig) -> None:
            on_config(cfg)
            self.set_config(cfg)
        return both

    # --- what we want ---------------------------------------------------------------------------

    def set_config(self, cfg: NodeConfig) -> None:
        """Local pods' identities are what this node must hold certificates for."""
        wanted = frozenset(p.identity for p in cfg.local_pods() if p.identity)
        if wanted != self.workloads:
            self.workloads = wanted
            self._wake.set()

    def wanted(self) -> set[str]:
        return {self.node_identity, *self.workloads}

    def credential(self, identity: str) -> Credential | None:
        return self.store.get(identity)

    # --- the config stream's transport ----------------------------------------------------------

    def has_node_cert(self) -> bool:
        return self.store.get(self.node_identity) is not None

    def stream_ssl(self) -> ssl.SSLContext:
        cred = self.store.get(self.node_identity)
        if cred is None:
            return tlsctx.client_context(self.store.bundle_pem)  # bootstrap: server-authenticated only
        return tlsctx.client_context(self.store.bundle_pem, cred.chain_pem(), cred.key_pem())

    def verify_controller(self, writer: Any) -> None:
        try:
            verify_peer(writer, spiffe.controller_id(self.trust_domain), self.trust_domain)
        except spiffe.IdentityError as exc:
            raise ProtocolError(f"the config stream's server is not the controller: {exc}") from None

    async def bootstrap(self, controller: tuple[str, int]) -> None:
        """Token -> node certificate over a server-authenticated TLS connection. The token is
        single use, so this runs only when we hold no valid node certificate."""
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(*controller, ssl=self.stream_ssl()), BOOTSTRAP_TIMEOUT)
        try:
            self.verify_controller(writer)
            csr = self.store.request(self.node_identity)
            writer.write(wire.encode({"type": "bootstrap", "node": self.node, "token": self._token() if callable(self._token) else self._token, "csr": csr}))
            await writer.drain()
            decoder = wire.FrameDecoder()
            async with asyncio.timeout(BOOTSTRAP_TIMEOUT):
                while True:
                    data = await reader.read(65536)
                    if not data:
                        raise EOFError("controller closed the bootstrap connection without an answer")
                    for msg in decoder.feed(data):
                        if msg["type"] == "error":
                            raise BootstrapError(f"bootstrap of node {self.node} refused: {msg.get('reason')}")
                        if msg["type"] == "node_cert":
                            self._accept(self.node_identity, msg)
                            log.info("node %s bootstrapped as %s", self.node, self.node_identity)
                            return
        finally:
            writer.close()

    # --- CSRs over the stream -------------------------------------------------------------------

    async def run_csrs(self, send: Callable[[dict[str, Any]], None]) -> None:
        """While the stream is up: send a CSR for each identity that is missing or due."""
        while True:
            for ident in self.store.due(self.wanted()):
                self._next_id += 1
                self._ids[self._next_id] = ident
                send({"type": "csr", "id": self._next_id, "csr": self.store.request(ident)})
            nxt = self.store.next_due()
            delay = CSR_TICK if nxt is None else max(0.05, min(CSR_TICK, nxt - self.store.clock()))
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), delay)
            except asyncio.TimeoutError:
                pass

    def on_message(self, msg: dict[str, Any]) -> None:
        """A `cert` or `csr_refused` answer from the controller."""
        ident = self._ids.pop(msg.get("id"), None)  # type: ignore[arg-type]
        if ident is None:
            log.warning("controller answered an unknown CSR id %r; ignored", msg.get("id"))
            return
        if msg["type"] == "csr_refused":
            self.refusals += 1
            self.store.refuse(ident, str(msg.get("reason")))
            log.error("controller refused a certificate for %s (%s): %s", ident, msg.get("reason"), msg.get("message"))
            return
        try:
            self._accept(ident, msg)
        except ChainError as exc:
            log.error("certificate for %s rejected: %s", ident, exc)

    def on_bundle(self, msg: dict[str, Any]) -> None:
        """A `bundle` push (root rotation): new TLS handshakes, tunnel client and server side and
        the next stream connection, verify against it; live connections stay up. A bundle that is
        not PEM CA certificates is refused, counted and logged, and the one in force stays."""
        try:
            self._set_bundle(msg.get("bundle"))
        except ChainError as exc:
            self.bundle_refusals += 1
            log.error("trust bundle from the controller refused, keeping the current one: %s", exc)

    def _set_bundle(self, pem: object) -> None:
        check_bundle(pem)
        assert isinstance(pem, str)
        before = self.store.bundle_generation
        self.store.set_bundle(pem)
        if self.store.bundle_generation != before:
            log.info("trust bundle updated (generation %d): %d anchor(s)", self.store.bundle_generation, len(describe_bundle(pem)))

    def describe_bundle(self) -> dict[str, object]:
        return {"generation": self.store.bundle_generation, "anchors": describe_bundle(self.store.bundle_pem)}

    def _accept(self, ident: str, msg: dict[str, Any]) -> None:
        chain = msg.get("chain")
        if not isinstance(chain, list) or not all(isinstance(c, str) for c in chain):
            raise ChainError("the answer has no 'chain' list of PEM strings")
        if isinstance(msg.get("bundle"), str) and msg["bundle"]:
            self._set_bundle(msg["bundle"])
        cred = self.store.accept(ident, chain)
        self.issued += 1
        log.info("certificate for %s: serial %x, valid until %s", ident, cred.leaf.serial_number, cred.leaf.not_valid_after_utc)
        for cb in self.on_change:
            cb(cred)

    def describe(self) -> list[dict[str, object]]:
        return [c.describe() for _, c in sorted(self.store.creds.items())]
