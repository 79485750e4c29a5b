"""Which CSRs the controller signs, as a pure function of (CSR, requesting node, node config).

A node may get certificates only for its own node identity and for the service accounts of pods
scheduled on it (the NodeConfig lists every meshed pod with its node and identity). Each refusal
has a `reason` from REASONS, used as a metrics label, and a sentence saying what was wrong.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from nodemesh import spiffe
from nodemesh.errors import NodemeshError
from nodemesh.nodeconfig import NodeConfig

MAX_CSR = 16 * 1024

REASONS = (
    "malformed",  # not a PEM CSR, or oversize
    "bad_signature",  # the CSR is not signed by its own key (no proof of possession)
    "wrong_key_type",  # not ECDSA P-256
    "san_mismatch",  # not exactly one spiffe:// URI SAN (or extra SANs)
    "wrong_trust_domain",
    "not_on_node",  # identity of a workload not scheduled on the requesting node
)


class CsrRefused(NodemeshError):
    def __init__(self, reason: str, message: str) -> None:
        assert reason in REASONS, reason
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class CsrGrant:
    identity: str
    public_key: ec.EllipticCurvePublicKey


def allowed_identities(cfg: NodeConfig | None, node: str) -> frozenset[str]:
    """What `node` may hold: its node identity and the identities of pods scheduled on it."""
    if cfg is None:
        return frozenset()
    ids = {spiffe.node_id(cfg.trust_domain, node)}
    ids.update(p.identity for p in cfg.pods if p.node == node)
    return frozenset(ids)


def check_csr(pem: str | bytes, node: str, trust_domain: str, allowed: Collection[str]) -> CsrGrant:
    """Validates a CSR from `node`; raises CsrRefused with the first problem found."""
    data = pem.encode() if isinstance(pem, str) else pem
    if len(data) > MAX_CSR:
        raise CsrRefused("malformed", f"CSR of {len(data)} bytes exceeds the {MAX_CSR}-byte limit")
    try:
        csr = x509.load_pem_x509_csr(data)
    except ValueError as exc:
        raise CsrRefused("malformed", f"not a PEM certificate signing request: {exc}") from None
    key = csr.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise CsrRefused("wrong_key_type", f"CSR key is {type(key).__name__.lstrip('_')}"
                         f"{'/' + key.curve.name if isinstance(key, ec.EllipticCurvePublicKey) else ''}; the mesh requires ECDSA P-256")
    if not csr.is_signature_valid:
        raise CsrRefused("bad_signature", "CSR signature does not verify with its own public key")
    uris, others = spiffe.uri_sans(csr)
    if len(uris) != 1 or others:
        raise CsrRefused("san_mismatch", f"CSR must carry exactly one spiffe:// URI SAN and nothing else; it has {len(uris)} URI and {others} other SANs")
    try:
        sid = spiffe.parse(uris[0])
    except spiffe.IdentityError as exc:
        raise CsrRefused("san_mismatch", f"CSR SAN is not a valid SPIFFE ID: {exc}") from None
    if sid.trust_domain != trust_domain:
        raise CsrRefused("wrong_trust_domain", f"CSR asks for {sid} but this mesh's trust domain is {trust_domain!r}")
    if str(sid) not in allowed:
        raise CsrRefused("not_on_node", f"node {node!r} may not hold {sid}: no pod with that service account runs on it")
    return CsrGrant(str(sid), key)
