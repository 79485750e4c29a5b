"""The agent's workload and node certificates: keys made here, CSRs out, chains in, renewal due
at 70% of lifetime. Private keys never leave this process: only CSRs go to the controller.

`Credential` is one identity's current key + chain; `CertStore` keeps them, says which are due,
and builds the TLS contexts the proxy uses (see agent/mtls.py). The request loop over the config
stream lives in stream_client; this module has no IO besides the clock.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from nodemesh import spiffe

RENEW_FRACTION = 0.7


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def make_csr(key: ec.EllipticCurvePrivateKey, identity: str) -> str:
    """A PEM CSR for `identity` (one URI SAN, empty subject), signed by `key` (proof of possession)."""
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity)]), critical=True)
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def renew_at(leaf: x509.Certificate, fraction: float = RENEW_FRACTION) -> float:
    start = leaf.not_valid_before_utc.timestamp()
    end = leaf.not_valid_after_utc.timestamp()
    return start + (end - start) * fraction


@dataclass
class Credential:
    identity: str
    key: ec.EllipticCurvePrivateKey
    chain: list[x509.Certificate]  # leaf first, then the issuer
    generation: int = 0  # bumps on every new chain: TLS contexts are cached by it

    @property
    def leaf(self) -> x509.Certificate:
        return self.chain[0]

    @property
    def renew_at(self) -> float:
        return renew_at(self.leaf)

    @property
    def not_after(self) -> float:
        return self.leaf.not_valid_after_utc.timestamp()

    def chain_pem(self) -> bytes:
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in self.chain)

    def key_pem(self) -> bytes:
        return self.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())

    def describe(self) -> dict[str, object]:
        leaf = self.leaf
        return {
            "identity": self.identity,
            "serial": format(leaf.serial_number, "x"),
            "not_before": leaf.not_valid_before_utc.isoformat(),
            "not_after": leaf.not_valid_after_utc.isoformat(),
            "issuer": leaf.issuer.rfc4514_string(),
            "generation": self.generation,
        }


class ChainError(Exception):
    """A chain from the controller that does not fit the request (wrong identity, wrong key)."""


def check_chain(pem_chain: Iterable[str], identity: str, key: ec.EllipticCurvePrivateKey, trust_domain: str) -> list[x509.Certificate]:
    """Parses the controller's answer and checks it is for our key and the identity we asked for."""
    certs: list[x509.Certificate] = []
    for pem in pem_chain:
        try:
            certs.extend(x509.load_pem_x509_certificates(pem.encode()))
        except ValueError as exc:
            raise ChainError(f"certificate chain is not PEM: {exc}") from None
    if len(certs) < 2:
        raise ChainError(f"expected leaf + issuer, got {len(certs)} certificates")
    leaf = certs[0]
    if leaf.public_key().public_numbers() != key.public_key().public_numbers():  # type: ignore[union-attr]
        raise ChainError("the signed certificate is not for the key we generated")
    try:
        sid = spiffe.cert_identity(leaf, trust_domain)
    except spiffe.IdentityError as exc:
        raise ChainError(str(exc)) from None
    if str(sid) != identity:
        raise ChainError(f"asked for {identity}, got a certificate for {sid}")
    return certs


def check_bundle(pem: object) -> list[x509.Certificate]:
    """A trust bundle from the controller: one or more PEM CA certificates, else ChainError
    (the bundle in force stays: a bad push must not leave us trusting nothing)."""
    if not isinstance(pem, str) or "BEGIN CERTIFICATE" not in pem:
        raise ChainError("the trust bundle is not a PEM string with at least one certificate")
    try:
        certs = x509.load_pem_x509_certificates(pem.encode())
    except ValueError as exc:
        raise ChainError(f"the trust bundle is not PEM certificates: {exc}") from None
    for cert in certs:
        try:
            ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        except x509.ExtensionNotFound:
            ca = False
        if not ca:
            raise ChainError(f"the trust bundle holds {cert.subject.rfc4514_string() or 'a certificate'}, which is not a CA certificate")
    return certs


def describe_bundle(pem: str) -> list[dict[str, str]]:
    """The anchors of a bundle for /identity: subject, SHA-256 fingerprint, not-after."""
    try:
        certs = x509.load_pem_x509_certificates(pem.encode()) if pem else []
    except ValueError:
        return []
    return [{"subject": c.subject.rfc4514_string(), "sha256": c.fingerprint(hashes.SHA256()).hex(),
             "not_after": c.not_valid_after_utc.isoformat()} for c in certs]


@dataclass
class PendingCsr:
    identity: str
    key: ec.EllipticCurvePrivateKey
    sent_at: float


@dataclass
class CertStore:
    """Per-identity credentials plus the trust bundle. Single-threaded (the event loop)."""

    trust_domain: str = "cluster.local"
    clock: Callable[[], float] = time.time
    creds: dict[str, Credential] = field(default_factory=dict)
    bundle_pem: str = ""
    bundle_generation: int = 0
    pending: dict[str, PendingCsr] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)  # identity -> last refusal reason
    retry_after: float = 5.0  # seconds before re-asking for an identity whose CSR got no answer

    def get(self, identity: str) -> Credential | None:
        cred = self.creds.get(identity)
        if cred is None or cred.not_after <= self.clock():
            return None  # an expired certificate is as good as none: fail closed
        return cred

    def set_bundle(self, pem: str) -> None:
        if pem != self.bundle_pem:
            self.bundle_pem = pem
            self.bundle_generation += 1

    def due(self, wanted: Iterable[str]) -> list[str]:
        """Identities that need a CSR now: missing, at/after 70% of lifetime, not already asked
        for recently. Credentials no longer wanted are dropped."""
        now = self.clock()
        want = set(wanted)
        for gone in set(self.creds) - want:
            del self.creds[gone]
        out = []
        for ident in sorted(want):
            p = self.pending.get(ident)
            if p is not None and now - p.sent_at < self.retry_after:
                continue
            cred = self.creds.get(ident)
            if cred is None or now >= cred.renew_at:
                out.append(ident)
        return out

    def request(self, identity: str) -> str:
        """A fresh key and CSR for `identity` (the key stays here until the chain comes back)."""
        key = new_key()
        self.pending[identity] = PendingCsr(identity, key, self.clock())
        return make_csr(key, identity)

    def accept(self, identity: str, pem_chain: Iterable[str]) -> Credential:
        p = self.pending.get(identity)
        if p is None:
            raise ChainError(f"got a certificate for {identity}, which we did not ask for")
        certs = check_chain(pem_chain, identity, p.key, self.trust_domain)
        del self.pending[identity]
        self.refused.pop(identity, None)
        old = self.creds.get(identity)
        cred = Credential(identity, p.key, certs, (old.generation + 1) if old else 1)
        self.creds[identity] = cred
        return cred

    def refuse(self, identity: str, reason: str) -> None:
        self.refused[identity] = reason
        # leave it pending: retry_after spaces the next attempt

    def next_due(self) -> float | None:
        """When the next renewal is due (for the renewal timer)."""
        times = [c.renew_at for c in self.creds.values()]
        return min(times) if times else None
