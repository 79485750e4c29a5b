"""CA, CSR policy and the agent's CertStore, sans-IO (no sockets), table-driven."""

from __future__ import annotations

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from nodemesh import spiffe
from nodemesh.agent.identity import CertStore, ChainError, make_csr, new_key, renew_at
from nodemesh.controller.ca import CaError, CertificateAuthority, load_pair, new_issuer, new_trust_anchor
from nodemesh.controller.csr_policy import CsrRefused, allowed_identities, check_csr
from nodemesh.nodeconfig import NodeConfig, WorkloadPod

TD = "cluster.local"
WEB = "spiffe://cluster.local/ns/demo/sa/web"
DB = "spiffe://cluster.local/ns/demo/sa/db"


class Clock:
    def __init__(self, t: float = 1_800_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture(scope="module")
def anchor():
    return new_trust_anchor(TD)


def make_ca(anchor, clock=None, lifetime=60.0) -> CertificateAuthority:
    clock = clock or Clock()
    return CertificateAuthority(TD, [anchor.cert], new_issuer(anchor, TD, now=clock()), lifetime, clock)


def cfg() -> NodeConfig:
    return NodeConfig(1, "node1", pods=(
        WorkloadPod("demo", "web-1", "10.244.1.2", "node1", "web", WEB),
        WorkloadPod("demo", "db-1", "10.244.2.2", "node2", "db", DB),
    ))


def csr_with(key, sans) -> str:
    b = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    if sans is not None:
        b = b.add_extension(x509.SubjectAlternativeName(sans), critical=True)
    return b.sign(key, None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode()


def test_leaf_chains_to_anchor_with_spiffe_san(anchor):
    clock = Clock()
    ca = make_ca(anchor, clock, lifetime=30)
    key = new_key()
    leaf, issuer = ca.sign(key.public_key(), WEB)
    leaf.verify_directly_issued_by(issuer)
    issuer.verify_directly_issued_by(anchor.cert)
    assert str(spiffe.cert_identity(leaf, TD)) == WEB
    assert leaf.not_valid_after_utc.timestamp() == clock() + 30
    assert leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert renew_at(leaf) == pytest.approx(clock() - 3 + 0.7 * (30 + 3))


def test_issuer_rotation_keeps_old_leaves_valid_under_same_anchor(anchor):
    ca = make_ca(anchor)
    old_leaf, old_issuer = ca.sign(new_key().public_key(), WEB)
    ca.rotate_issuer(new_issuer(anchor, TD))
    new_leaf, new_issuer_cert = ca.sign(new_key().public_key(), WEB)
    assert new_issuer_cert.subject != old_issuer.subject or new_issuer_cert.serial_number != old_issuer.serial_number
    for leaf, iss in ((old_leaf, old_issuer), (new_leaf, new_issuer_cert)):
        leaf.verify_directly_issued_by(iss)
        iss.verify_directly_issued_by(anchor.cert)
    assert ca.rotations == 1


def test_root_rotation_bundle_carries_old_and_new(anchor):
    ca = make_ca(anchor)
    new_root = new_trust_anchor(TD)
    ca.set_anchors([anchor.cert, new_root.cert])
    ca.rotate_issuer(new_issuer(new_root, TD))
    assert len(x509.load_pem_x509_certificates(ca.bundle_pem().encode())) == 2
    with pytest.raises(CaError, match="not signed by any trust anchor"):
        ca.set_anchors([anchor.cert])  # would orphan the current issuer: refused, bundle unchanged
    assert len(ca.anchors) == 2


@pytest.mark.parametrize("case,match", [
    ("foreign_issuer", "not signed by any trust anchor"),
    ("expired_issuer", "expired"),
    ("short_lifetime", "below the 1-second minimum"),
    ("empty_bundle", "at least one trust anchor"),
])
def test_ca_refuses_bad_material(anchor, case, match):
    clock = Clock()
    with pytest.raises(CaError, match=match):
        if case == "foreign_issuer":
            CertificateAuthority(TD, [anchor.cert], new_issuer(new_trust_anchor(TD), TD), 60, clock)
        elif case == "expired_issuer":
            CertificateAuthority(TD, [anchor.cert], new_issuer(anchor, TD, lifetime=10, now=clock() - 100), 60, clock)
        elif case == "short_lifetime":
            CertificateAuthority(TD, [anchor.cert], new_issuer(anchor, TD), 0.5, clock)
        else:
            CertificateAuthority(TD, [], new_issuer(anchor, TD), 60, clock)


def test_load_pair_refuses_mismatched_key(anchor):
    other = new_trust_anchor(TD)
    with pytest.raises(CaError, match="does not belong"):
        load_pair(anchor.cert_pem(), other.key_pem(), "issuer.pem")
    with pytest.raises(CaError, match="not PEM"):
        load_pair(b"garbage", anchor.key_pem(), "issuer.pem")
    assert load_pair(anchor.cert_pem(), anchor.key_pem(), "x").cert == anchor.cert


def test_allowed_identities_are_node_scoped():
    assert allowed_identities(cfg(), "node1") == {WEB, spiffe.node_id(TD, "node1")}
    assert allowed_identities(cfg(), "node2") == {DB, spiffe.node_id(TD, "node2")}
    assert allowed_identities(None, "node1") == frozenset()


def _bad_sig_csr() -> str:
    good = x509.load_pem_x509_csr(make_csr(new_key(), WEB).encode())
    der = bytearray(good.public_bytes(serialization.Encoding.DER))
    der[-5] ^= 0x55  # flip bits inside the signature
    return x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM).decode()


CSR_CASES = [
    # (name, csr factory, reason)
    ("garbage", lambda: "not a csr", "malformed"),
    ("oversize", lambda: "A" * 20000, "malformed"),
    ("rsa_key", lambda: csr_with(rsa.generate_private_key(65537, 2048), [x509.UniformResourceIdentifier(WEB)]), "wrong_key_type"),
    ("p384_key", lambda: csr_with(ec.generate_private_key(ec.SECP384R1()), [x509.UniformResourceIdentifier(WEB)]), "wrong_key_type"),
    ("ed25519_key", lambda: csr_with(ed25519.Ed25519PrivateKey.generate(), [x509.UniformResourceIdentifier(WEB)]), "wrong_key_type"),
    ("bad_signature", _bad_sig_csr, "bad_signature"),
    ("no_san", lambda: csr_with(new_key(), None), "san_mismatch"),
    ("two_uris", lambda: csr_with(new_key(), [x509.UniformResourceIdentifier(WEB), x509.UniformResourceIdentifier(DB)]), "san_mismatch"),
    ("extra_dns", lambda: csr_with(new_key(), [x509.UniformResourceIdentifier(WEB), x509.DNSName("web")]), "san_mismatch"),
    ("not_spiffe", lambda: csr_with(new_key(), [x509.UniformResourceIdentifier("https://evil/ns/demo/sa/web")]), "san_mismatch"),
    ("other_td", lambda: make_csr(new_key(), "spiffe://evil.local/ns/demo/sa/web"), "wrong_trust_domain"),
    ("other_node", lambda: make_csr(new_key(), DB), "not_on_node"),
    ("other_nodes_node_id", lambda: make_csr(new_key(), spiffe.node_id(TD, "node2")), "not_on_node"),
]


@pytest.mark.parametrize("name,factory,reason", CSR_CASES, ids=[c[0] for c in CSR_CASES])
def test_csr_refusals(name, factory, reason):
    with pytest.raises(CsrRefused) as err:
        check_csr(factory(), "node1", TD, allowed_identities(cfg(), "node1"))
    assert err.value.reason == reason
    assert str(err.value)  # a sentence, not just a code


@pytest.mark.parametrize("ident", [WEB, spiffe.node_id(TD, "node1")])
def test_csr_granted(ident):
    key = new_key()
    grant = check_csr(make_csr(key, ident), "node1", TD, allowed_identities(cfg(), "node1"))
    assert grant.identity == ident
    assert grant.public_key.public_numbers() == key.public_key().public_numbers()


def test_certstore_request_accept_renew_cycle(anchor):
    clock = Clock()
    ca = make_ca(anchor, clock, lifetime=100)
    store = CertStore(TD, clock)
    assert store.due([WEB]) == [WEB]
    csr = store.request(WEB)
    assert store.due([WEB]) == []  # asked already; wait for the answer
    grant = check_csr(csr, "node1", TD, {WEB})
    chain = [c.public_bytes(serialization.Encoding.PEM).decode() for c in ca.sign(grant.public_key, grant.identity)]
    cred = store.accept(WEB, chain)
    assert store.get(WEB) is cred and cred.generation == 1
    assert store.due([WEB]) == []
    clock.t = cred.renew_at  # 70% of lifetime reached
    assert store.due([WEB]) == [WEB]
    clock.t = cred.not_after  # expired: fail closed
    assert store.get(WEB) is None
    assert store.due([]) == [] and WEB not in store.creds  # no longer wanted: dropped


@pytest.mark.parametrize("case,match", [
    ("not_requested", "did not ask for"),
    ("other_key", "not for the key"),
    ("other_identity", "asked for"),
    ("garbage", "not PEM"),
    ("leaf_only", "expected leaf"),
])
def test_certstore_refuses_wrong_chain(anchor, case, match):
    ca = make_ca(anchor)
    store = CertStore(TD)
    pem = lambda certs: [c.public_bytes(serialization.Encoding.PEM).decode() for c in certs]  # noqa: E731
    with pytest.raises(ChainError, match=match):
        if case == "not_requested":
            store.accept(WEB, pem(ca.sign(new_key().public_key(), WEB)))
        store.request(WEB)
        if case == "other_key":
            store.accept(WEB, pem(ca.sign(new_key().public_key(), WEB)))
        elif case == "other_identity":
            store.accept(WEB, pem(ca.sign(store.pending[WEB].key.public_key(), DB)))
        elif case == "garbage":
            store.accept(WEB, ["-----BEGIN CERTIFICATE-----\nxx\n-----END CERTIFICATE-----\n"])
        else:
            store.accept(WEB, pem(ca.sign(store.pending[WEB].key.public_key(), WEB))[:1])


@pytest.mark.parametrize("uri,ok", [
    (WEB, True),
    ("spiffe://cluster.local/nodemesh/node/node1", True),
    ("http://cluster.local/ns/a/sa/b", False),
    ("spiffe:///ns/a/sa/b", False),
    ("spiffe://Cluster.Local/ns/a", False),
    ("spiffe://td/ns/../sa/b", False),
    ("spiffe://td", False),
    ("spiffe://td/ns//sa", False),
])
def test_spiffe_parse(uri, ok):
    if ok:
        assert str(spiffe.parse(uri)) == uri
    else:
        with pytest.raises(spiffe.IdentityError):
            spiffe.parse(uri)
