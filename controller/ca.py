"""The mesh certificate authority, sans-IO: trust anchor (root) -> issuer (intermediate) -> leaves.

Keys are ECDSA P-256. Leaves carry exactly one URI SAN (the SPIFFE ID), serverAuth+clientAuth,
and live `leaf_lifetime` seconds (capped at the issuer's own expiry). The issuer can be swapped
while the CA serves (`rotate_issuer`): leaves signed before keep verifying because they chain to
the same anchors, and the trust bundle can hold several anchors during a root rotation.
The clock is injected so expiry is tested without sleeping.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from nodemesh import spiffe
from nodemesh.errors import NodemeshError

DEFAULT_LEAF_LIFETIME = 24 * 3600.0
ANCHOR_LIFETIME = 10 * 365 * 86400.0
ISSUER_LIFETIME = 365 * 86400.0
CLOCK_SKEW = 60.0  # leaves are valid from a minute ago: agents' clocks are not exactly ours

Clock = Callable[[], float]


class CaError(NodemeshError):
    """CA material that cannot be used (unreadable PEM, issuer not signed by an anchor, expired)."""


@dataclass(frozen=True)
class KeyPair:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def key_pem(self) -> bytes:
        return self.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _when(ts: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc)


def _ca_cert(subject: str, key: ec.EllipticCurvePrivateKey, signer: KeyPair | None, lifetime: float, now: float, path_len: int) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "nodemesh"), x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    issuer_name = signer.cert.subject if signer else name
    signing_key = signer.key if signer else key
    not_after = now + lifetime
    if signer is not None:
        not_after = min(not_after, signer.cert.not_valid_after_utc.timestamp())
    b = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(issuer_name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_when(now - CLOCK_SKEW)).not_valid_after(_when(not_after))
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_len), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, key_cert_sign=True, crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if signer is not None:
        b = b.add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.key.public_key()), critical=False)
    return b.sign(signing_key, hashes.SHA256())


def new_trust_anchor(trust_domain: str, lifetime: float = ANCHOR_LIFETIME, now: float | None = None) -> KeyPair:
    key = new_key()
    return KeyPair(_ca_cert(f"root.{trust_domain}", key, None, lifetime, time.time() if now is None else now, 1), key)


def new_issuer(anchor: KeyPair, trust_domain: str, lifetime: float = ISSUER_LIFETIME, now: float | None = None) -> KeyPair:
    key = new_key()
    ts = time.time() if now is None else now
    return KeyPair(_ca_cert(f"issuer.{trust_domain}.{int(ts)}", key, anchor, lifetime, ts, 0), key)


def load_certs(pem: bytes, source: str) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(pem)
    except ValueError as exc:
        raise CaError(f"{source}: not PEM certificates ({exc})") from None
    return certs


def load_pair(cert_pem: bytes, key_pem: bytes, source: str) -> KeyPair:
    cert = load_certs(cert_pem, source)[0]
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as exc:
        raise CaError(f"{source}: the key is not an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise CaError(f"{source}: the key must be ECDSA P-256")
    if key.public_key().public_numbers() != cert.public_key().public_numbers():  # type: ignore[union-attr]
        raise CaError(f"{source}: the key does not belong to the certificate")
    return KeyPair(cert, key)


def _signed_by(cert: x509.Certificate, by: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(by)
        return True
    except (ValueError, TypeError, Exception):  # InvalidSignature and friends
        return False


def to_pem(certs: Sequence[x509.Certificate]) -> str:
    return "".join(c.public_bytes(serialization.Encoding.PEM).decode() for c in certs)


class CertificateAuthority:
    """Signs leaves for already-authorized SPIFFE IDs (authorization is csr_policy's job)."""

    def __init__(self, trust_domain: str, anchors: Sequence[x509.Certificate], issuer: KeyPair,
                 leaf_lifetime: float = DEFAULT_LEAF_LIFETIME, clock: Clock = time.time) -> None:
        if leaf_lifetime < 1:
            raise CaError(f"leaf lifetime {leaf_lifetime}s is below the 1-second minimum")
        self.trust_domain = trust_domain
        self.leaf_lifetime = leaf_lifetime
        self.clock = clock
        self._anchors: tuple[x509.Certificate, ...] = tuple(anchors)
        if not self._anchors:
            raise CaError("the trust bundle needs at least one trust anchor")
        self.issuer = self._check_issuer(issuer)
        self.signed = 0
        self.rotations = 0

    def _check_issuer(self, issuer: KeyPair) -> KeyPair:
        if not any(_signed_by(issuer.cert, a) for a in self._anchors):
            raise CaError(f"issuer {issuer.cert.subject.rfc4514_string()} is not signed by any trust anchor in the bundle")
        if issuer.cert.not_valid_after_utc.timestamp() <= self.clock():
            raise CaError(f"issuer {issuer.cert.subject.rfc4514_string()} expired at {issuer.cert.not_valid_after_utc:%Y-%m-%d %H:%M:%SZ}")
        bc = issuer.cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        if not bc.ca:
            raise CaError("the issuer certificate is not a CA certificate (basicConstraints ca=false)")
        return issuer

    @property
    def anchors(self) -> tuple[x509.Certificate, ...]:
        return self._anchors

    def bundle_pem(self) -> str:
        """Trust bundle: every anchor in force (old + new during a root rotation)."""
        return to_pem(self._anchors)

    def set_anchors(self, anchors: Sequence[x509.Certificate]) -> None:
        """Replace the bundle (root rotation: first old+new, later new only). The current issuer
        must still chain to one of them."""
        if not anchors:
            raise CaError("the trust bundle needs at least one trust anchor")
        old, self._anchors = self._anchors, tuple(anchors)
        try:
            self._check_issuer(self.issuer)
        except CaError:
            self._anchors = old
            raise

    def rotate_issuer(self, issuer: KeyPair) -> None:
        """Swap the issuer; leaves already out stay valid (same anchors)."""
        self.issuer = self._check_issuer(issuer)
        self.rotations += 1

    def sign(self, public_key: ec.EllipticCurvePublicKey, identity: str, lifetime: float | None = None) -> list[x509.Certificate]:
        """A leaf for `identity` (a SPIFFE ID in our trust domain) and the issuer: the chain a peer
        presents. Lifetime (default `leaf_lifetime`) is capped at the issuer's expiry."""
        sid = spiffe.parse(identity)
        if sid.trust_domain != self.trust_domain:
            raise CaError(f"{identity} is not in trust domain {self.trust_domain!r}")
        now = self.clock()
        life = self.leaf_lifetime if lifetime is None else lifetime
        not_after = min(now + life, self.issuer.cert.not_valid_after_utc.timestamp())
        # Backdate for clock skew, but proportionally for short test lifetimes, so that 70% of
        # the certificate's validity is still ahead of us when the agent receives it.
        skew = min(CLOCK_SKEW, life / 10)
        leaf = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))  # identity lives in the SAN alone, as SPIFFE X.509-SVIDs do
            .issuer_name(self.issuer.cert.subject).public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(_when(now - skew)).not_valid_after(_when(not_after))
            .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity)]), critical=True)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, key_cert_sign=False, crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.issuer.key.public_key()), critical=False)
            .sign(self.issuer.key, hashes.SHA256())
        )
        self.signed += 1
        return [leaf, self.issuer.cert]


# ---- files: how the controller is given its CA (the lab writes them; users may bring their own) --

ANCHOR_FILE = "trust-anchor.pem"  # the trust bundle: one or more roots (old + new during a root rotation)
ISSUER_FILE = "issuer.pem"
ISSUER_KEY_FILE = "issuer-key.pem"


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise CaError(f"{path}: cannot be read: {exc.strerror}") from None


def load_ca_dir(directory: str) -> tuple[list[x509.Certificate], KeyPair]:
    """(trust bundle, issuer) from a CA directory; CaError names the file and what is wrong."""
    import os

    anchors = load_certs(_read(os.path.join(directory, ANCHOR_FILE)), os.path.join(directory, ANCHOR_FILE))
    issuer = load_pair(_read(os.path.join(directory, ISSUER_FILE)), _read(os.path.join(directory, ISSUER_KEY_FILE)),
                       os.path.join(directory, ISSUER_FILE))
    return anchors, issuer


def write_pem(path: str, data: bytes, private: bool = False) -> None:
    """Atomic write; private files are created 0600."""
    import os

    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def reload_into(ca: CertificateAuthority, anchors: Sequence[x509.Certificate], issuer: KeyPair) -> bool:
    """Adopt a (possibly) new bundle and issuer from disk; True when the issuer changed. The union
    of old and new anchors is in force while the issuer is swapped, so no step orphans it."""
    changed = issuer.cert != ca.issuer.cert
    ca.set_anchors(list(dict.fromkeys([*ca.anchors, *anchors])))
    if changed:
        ca.rotate_issuer(issuer)
    ca.set_anchors(anchors)
    return changed
