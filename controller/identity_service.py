"""The controller's identity service: node bootstrap (token -> node certificate), workload CSR
signing for authenticated nodes, and the controller's own TLS server context.

Who a bootstrapping node is, is the `AgentAuthenticator`'s answer (controller/agent_auth.py: the
lab's static tokens, or TokenReview in Kubernetes). Bootstrap tokens are single use: once a node
holds a certificate it authenticates with it (mTLS) and renews it over the stream; a second
bootstrap spending the same `bootstrap_key` is refused as reused (per node for static tokens, per
token value for projected service-account tokens: see agent_auth).
Every refusal is counted by reason (read by the admin metrics) and logged with its sentence.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from nodemesh import spiffe, tlsctx
from nodemesh.controller.agent_auth import REASONS as AUTH_REASONS, AgentAuthenticator, AgentAuthRefused, StaticTokens
from nodemesh.controller.ca import CaError, CertificateAuthority, KeyPair, new_key, reload_into, to_pem
from nodemesh.controller.config_store import ConfigStore
from nodemesh.controller.csr_policy import CsrRefused, allowed_identities, check_csr

log = logging.getLogger(__name__)

SERVER_CERT_LIFETIME = 7 * 86400.0
# The authenticator's reasons (bad_request, unknown_node, bad_token, wrong_node...) plus our own.
BOOTSTRAP_REASONS = (*AUTH_REASONS, "reused_token", "bad_csr")


class BootstrapRefused(Exception):
    def __init__(self, reason: str, message: str) -> None:
        assert reason in BOOTSTRAP_REASONS, reason
        super().__init__(message)
        self.reason = reason


def _pem_chain(certs: list[Any]) -> list[str]:
    return [c.public_bytes(serialization.Encoding.PEM).decode() for c in certs]


class IdentityService:
    def __init__(self, ca: CertificateAuthority, store: ConfigStore, tokens: Mapping[str, str] | None = None,
                 authenticator: AgentAuthenticator | None = None) -> None:
        """`authenticator` checks bootstrap tokens; without one, `tokens` (node -> token) are the lab's static tokens."""
        self.ca = ca
        self.store = store
        self.authenticator: AgentAuthenticator = authenticator if authenticator is not None else StaticTokens(tokens or {})
        self.spent: dict[str, float | None] = {}  # bootstrap_key -> forget after (epoch s; None = never)
        self.signed: Counter[str] = Counter()  # kind ("node", "workload") -> certificates signed
        self.csr_refused: Counter[str] = Counter()  # csr_policy reason -> count
        self.bootstrap_refused: Counter[str] = Counter()  # BOOTSTRAP_REASONS -> count
        self.bundle_changes = 0
        self._server_key = new_key()
        self._server_chain_pem: tuple[bytes, bytes] | None = None
        self._current_ctx: ssl.SSLContext | None = None  # bundle + our chain; rebuilt, never mutated
        self._listener_ctx: ssl.SSLContext | None = None
        self._bundle_changed = asyncio.Event()  # set and replaced on each bundle change (wakes streams)

    @property
    def trust_domain(self) -> str:
        return self.ca.trust_domain

    # --- the controller's own certificate -------------------------------------------------------

    def _server_chain(self) -> tuple[bytes, bytes]:
        # Longer-lived than test leaves (agents reconnect with it), re-signed on issuer rotation.
        chain = self.ca.sign(self._server_key.public_key(), spiffe.controller_id(self.trust_domain),
                             lifetime=max(self.ca.leaf_lifetime, SERVER_CERT_LIFETIME))
        key = self._server_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        return to_pem(chain).encode(), key

    def current_context(self) -> ssl.SSLContext:
        """Our chain and the trust bundle in force. An SSLContext can add roots but never drop
        them, so a bundle change builds a new one; handshakes pick it up through server_context()."""
        if self._current_ctx is None:
            if self._server_chain_pem is None:
                self._server_chain_pem = self._server_chain()
            self._current_ctx = tlsctx.server_context(self.ca.bundle_pem(), *self._server_chain_pem, require_client_cert=False)
        return self._current_ctx

    def server_context(self) -> ssl.SSLContext:
        """The stream listener's TLS context (stable for the listener's life): its SNI callback,
        which runs for every ClientHello, hands the handshake to current_context(), so a new
        bundle or certificate applies to new connections while live ones stay up. Client
        certificates are optional (bootstrap comes without one); the handler decides what an
        unauthenticated peer may do (bootstrap only)."""
        if self._listener_ctx is None:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_3
            ctx.verify_mode = ssl.CERT_OPTIONAL

            def pick(sslobj: ssl.SSLObject, _name: str | None, _ctx: ssl.SSLContext) -> None:
                sslobj.context = self.current_context()

            ctx.sni_callback = pick
            self._listener_ctx = ctx
        return self._listener_ctx

    def refresh_server_cert(self) -> None:
        """Re-sign our own certificate (after an issuer rotation, or as it nears expiry)."""
        self._server_chain_pem = self._server_chain()
        self._current_ctx = None

    def rotate_issuer(self, issuer: KeyPair) -> None:
        self.ca.rotate_issuer(issuer)
        self.refresh_server_cert()
        log.info("issuer rotated to %s", issuer.cert.subject.rfc4514_string())

    def set_anchors(self, anchors: Sequence[x509.Certificate]) -> None:
        """A new trust bundle (root rotation): new handshakes verify against it, and every agent's
        stream is told at once (StreamServer pushes {type: bundle})."""
        before = self.ca.bundle_pem()
        self.ca.set_anchors(anchors)
        if self.ca.bundle_pem() != before:
            self._bundle_moved()

    def reload(self, anchors: Sequence[x509.Certificate], issuer: KeyPair) -> bool:
        """Adopt a CA directory's bundle and issuer (SIGHUP). True when the issuer changed.
        Raises CaError and keeps what is in force when the files do not fit together."""
        before = self.ca.bundle_pem()
        changed = reload_into(self.ca, anchors, issuer)
        if changed:
            self.refresh_server_cert()
        if self.ca.bundle_pem() != before:
            self._bundle_moved()
        return changed

    def _bundle_moved(self) -> None:
        self._current_ctx = None
        self.bundle_changes += 1
        event, self._bundle_changed = self._bundle_changed, asyncio.Event()
        event.set()
        log.info("trust bundle now holds %d anchor(s): %s", len(self.ca.anchors),
                 ", ".join(a.subject.rfc4514_string() for a in self.ca.anchors))

    async def wait_bundle(self, known: str) -> str:
        """The bundle PEM as soon as it differs from `known` (at once if it already does)."""
        while self.ca.bundle_pem() == known:
            await self._bundle_changed.wait()
        return self.ca.bundle_pem()

    # --- requests -------------------------------------------------------------------------------

    async def bootstrap(self, msg: Mapping[str, Any]) -> dict[str, Any]:
        """{type: bootstrap, node, token, csr} -> {type: node_cert, chain, bundle}; raises BootstrapRefused."""
        try:
            return await self._bootstrap(msg)
        except BootstrapRefused as exc:
            self.bootstrap_refused[exc.reason] += 1
            log.warning("bootstrap refused (%s): %s", exc.reason, exc)
            raise

    async def _bootstrap(self, msg: Mapping[str, Any]) -> dict[str, Any]:
        node, token, csr = msg.get("node"), msg.get("token"), msg.get("csr")
        if not all(isinstance(v, str) and v for v in (node, token, csr)):
            raise BootstrapRefused("bad_request", "bootstrap needs {type: bootstrap, node: str, token: str, csr: PEM str}")
        assert isinstance(node, str) and isinstance(token, str) and isinstance(csr, str)
        try:
            node = await self.authenticator.authenticate(node, token)
        except AgentAuthRefused as exc:
            raise BootstrapRefused(exc.reason, str(exc)) from None
        # From here to `spent[key] = ...` nothing awaits: two concurrent bootstraps with one token
        # cannot both pass the reuse check.
        key, until = self.authenticator.bootstrap_key(node, token)
        self._forget_expired()
        if key in self.spent:
            raise BootstrapRefused("reused_token", f"the bootstrap token of node {node!r} was already used; "
                                   "the node renews with its certificate, a new token is needed to bootstrap again")
        try:
            grant = check_csr(csr, node, self.trust_domain, {spiffe.node_id(self.trust_domain, node)})
        except CsrRefused as exc:
            self.csr_refused[exc.reason] += 1
            raise BootstrapRefused("bad_csr", f"node {node!r} bootstrap CSR refused ({exc.reason}): {exc}") from None
        self.spent[key] = until
        chain = self.ca.sign(grant.public_key, grant.identity)
        self.signed["node"] += 1
        log.info("node %s bootstrapped: issued %s", node, grant.identity)
        return {"type": "node_cert", "identity": grant.identity, "chain": _pem_chain(chain), "bundle": self.ca.bundle_pem()}

    def _forget_expired(self) -> None:
        """Spent tokens past their expiry cannot authenticate any more: no need to remember them."""
        now = time.time()
        for key in [k for k, until in self.spent.items() if until is not None and until < now]:
            del self.spent[key]

    def sign(self, node: str, msg: Mapping[str, Any]) -> dict[str, Any]:
        """{type: csr, id, csr} from authenticated `node` -> {type: cert, ...} or {type: csr_refused, ...}."""
        rid = msg.get("id")
        try:
            csr = msg.get("csr")
            if not isinstance(csr, str):
                raise CsrRefused("malformed", "a csr message needs a 'csr' PEM string")
            grant = check_csr(csr, node, self.trust_domain, allowed_identities(self.store.config_for(node), node))
            chain = self.ca.sign(grant.public_key, grant.identity)
        except CsrRefused as exc:
            self.csr_refused[exc.reason] += 1
            log.warning("CSR from node %s refused (%s): %s", node, exc.reason, exc)
            return {"type": "csr_refused", "id": rid, "reason": exc.reason, "message": str(exc)}
        except CaError as exc:  # e.g. the issuer expired: the node's request is fine, we are not
            log.error("cannot sign for node %s: %s", node, exc)
            return {"type": "csr_refused", "id": rid, "reason": "ca_unavailable", "message": str(exc)}
        self.signed["node" if spiffe.node_of(spiffe.parse(grant.identity)) else "workload"] += 1
        return {"type": "cert", "id": rid, "identity": grant.identity, "chain": _pem_chain(chain), "bundle": self.ca.bundle_pem()}

    def peer_node(self, der: bytes | None) -> str | None:
        """The node a verified TLS client certificate names, or None (no cert / not a node ID)."""
        if not der:
            return None
        sid = spiffe.der_identity(der, self.trust_domain)
        return spiffe.node_of(sid)
