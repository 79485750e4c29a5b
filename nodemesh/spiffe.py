"""SPIFFE IDs and certificate identity helpers shared by the controller and the agent, sans-IO.

Workloads are `spiffe://<td>/ns/<namespace>/sa/<serviceaccount>`; a node (the agent itself, for the
config stream) is `spiffe://<td>/nodemesh/node/<name>` and the controller is
`spiffe://<td>/nodemesh/controller`. The x509 helpers read the one URI SAN a mesh certificate has:
OpenSSL verifies the chain, these say *who* the verified peer is.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from cryptography import x509

from nodemesh.errors import NodemeshError

_TD = re.compile(r"^[a-z0-9.\-_]+$")
_SEGMENT = re.compile(r"^[A-Za-z0-9.\-_]+$")


class IdentityError(NodemeshError):
    """A certificate or SPIFFE ID that is not a valid mesh identity. `reason` is a metrics label."""

    def __init__(self, message: str, reason: str = "bad_identity") -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class SpiffeId:
    trust_domain: str
    path: str  # "/ns/default/sa/web"

    def __str__(self) -> str:
        return f"spiffe://{self.trust_domain}{self.path}"

    @property
    def workload(self) -> tuple[str, str] | None:
        """(namespace, service account) for a workload ID, else None."""
        parts = self.path.split("/")
        if len(parts) == 5 and parts[1] == "ns" and parts[3] == "sa":
            return parts[2], parts[4]
        return None


def parse(uri: str) -> SpiffeId:
    """Parses and validates a SPIFFE ID; raises IdentityError naming what is wrong."""
    if not uri.startswith("spiffe://"):
        raise IdentityError(f"{uri[:100]!r} is not a spiffe:// URI")
    rest = uri[len("spiffe://"):]
    td, sep, path = rest.partition("/")
    if not td or not _TD.match(td):
        raise IdentityError(f"{uri[:100]!r} has an invalid trust domain {td[:60]!r}")
    segments = path.split("/") if sep else []
    if not segments or not all(_SEGMENT.match(s) and s not in (".", "..") for s in segments):
        raise IdentityError(f"{uri[:100]!r} has an empty or invalid path")
    return SpiffeId(td, "/" + path)


def workload_id(trust_domain: str, namespace: str, service_account: str) -> str:
    return f"spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}"


def node_id(trust_domain: str, node: str) -> str:
    return f"spiffe://{trust_domain}/nodemesh/node/{node}"


def controller_id(trust_domain: str) -> str:
    return f"spiffe://{trust_domain}/nodemesh/controller"


def node_of(spiffe: SpiffeId) -> str | None:
    """The node name of a node identity, else None."""
    parts = spiffe.path.split("/")
    if len(parts) == 4 and parts[1] == "nodemesh" and parts[2] == "node":
        return parts[3]
    return None


def uri_sans(ext_owner: x509.Certificate | x509.CertificateSigningRequest) -> tuple[list[str], int]:
    """(URI SANs, count of other SAN entries) of a certificate or CSR; ([], 0) without a SAN."""
    try:
        san = ext_owner.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return [], 0
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    return list(uris), len(list(san)) - len(uris)


def cert_identity(cert: x509.Certificate, trust_domain: str | None = None) -> SpiffeId:
    """The SPIFFE ID of a mesh certificate: exactly one URI SAN and nothing else. With
    `trust_domain`, an ID from another trust domain is refused."""
    uris, others = uri_sans(cert)
    if len(uris) != 1 or others:
        raise IdentityError(f"certificate has {len(uris)} URI SANs and {others} other SANs; a mesh certificate has exactly one spiffe:// URI SAN", "san_mismatch")
    sid = parse(uris[0])
    if trust_domain is not None and sid.trust_domain != trust_domain:
        raise IdentityError(f"certificate identity {sid} is not in trust domain {trust_domain!r}", "wrong_trust_domain")
    return sid


def der_identity(der: bytes | None, trust_domain: str | None = None) -> SpiffeId:
    """cert_identity of a DER certificate as `ssl.SSLObject.getpeercert(True)` returns it."""
    if not der:
        raise IdentityError("the peer presented no certificate", "no_certificate")
    try:
        cert = x509.load_der_x509_certificate(der)
    except ValueError as exc:
        raise IdentityError(f"the peer certificate cannot be parsed: {exc}", "malformed") from None
    return cert_identity(cert, trust_domain)
