"""Root rotation in the lab: the three steps on disk (each adopted by the controller's reload
path), their refusals, and the safety predicates the CLI waits on."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from nodemesh.agent.identity import ChainError, check_bundle, describe_bundle
from nodemesh.controller.ca import CertificateAuthority, load_ca_dir, new_issuer, new_trust_anchor, reload_into, to_pem
from nodemesh.errors import ConfigError, LabError
from nodemesh.lab import lab_ca, root_rotation
from nodemesh.lab.state import LabState

TD = "cluster.local"
NOT_RUNNING = "controller is not running"  # the files are written; nobody to SIGHUP in a unit test


@pytest.fixture
def labdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("NODEMESH_LAB_DIR", str(tmp_path))
    return tmp_path


def step(fn, *args, **kw):  # type: ignore[no-untyped-def]
    with pytest.raises(LabError, match=NOT_RUNNING):
        fn(LabState(status="up"), *args, **kw)


def test_three_steps_on_disk_each_adopted_by_the_controller(labdir: Path) -> None:
    d = lab_ca.prepare()
    anchors, issuer = load_ca_dir(d)
    ca = CertificateAuthority(TD, anchors, issuer)
    old_fp = lab_ca.bundle_fingerprints()

    step(lab_ca.add_root)
    both = lab_ca.bundle_fingerprints()
    assert both[0] == old_fp[0] and len(both) == 2 and lab_ca.rotation_in_progress()
    assert reload_into(ca, *load_ca_dir(d)) is False and len(ca.anchors) == 2
    with pytest.raises(LabError, match="still signed by the old root"):  # step 3 before step 2
        lab_ca.drop_root(LabState(status="up"))

    step(lab_ca.rotate_issuer, under_new_root=True)
    new_anchors, new_issuer_pair = load_ca_dir(d)
    assert reload_into(ca, new_anchors, new_issuer_pair) is True
    new_issuer_pair.cert.verify_directly_issued_by(new_anchors[1])

    step(lab_ca.drop_root)
    assert lab_ca.bundle_fingerprints() == [both[1]] and not lab_ca.rotation_in_progress()
    assert reload_into(ca, *load_ca_dir(d)) is False and len(ca.anchors) == 1
    # the lab holds the new root's key now: a later plain issuer rotation signs under it
    step(lab_ca.rotate_issuer)
    CertificateAuthority(TD, *load_ca_dir(d))
    assert not os.path.exists(os.path.join(d, lab_ca.NEXT_ANCHOR_KEY_FILE))


def test_refusals_name_what_is_wrong(labdir: Path, tmp_path: Path) -> None:
    lab_ca.prepare()
    with pytest.raises(LabError, match="no root rotation in progress"):
        lab_ca.drop_root(LabState(status="up"))
    with pytest.raises(LabError, match="no root rotation in progress"):
        lab_ca.rotate_issuer(LabState(status="up"), under_new_root=True)
    issuer = new_issuer(new_trust_anchor(TD), TD)  # a CA certificate, but not a root
    (tmp_path / "issuer.pem").write_bytes(issuer.cert_pem())
    with pytest.raises(ConfigError, match="not a self-signed CA certificate"):
        lab_ca.add_root(LabState(status="up"), str(tmp_path / "issuer.pem"))
    (tmp_path / "two.pem").write_bytes(new_trust_anchor(TD).cert_pem() + new_trust_anchor(TD).cert_pem())
    with pytest.raises(ConfigError, match="holds 2 certificates"):
        lab_ca.add_root(LabState(status="up"), str(tmp_path / "two.pem"))
    (tmp_path / "garbage.pem").write_bytes(b"nope")
    with pytest.raises(ConfigError, match="not PEM"):
        lab_ca.add_root(LabState(status="up"), str(tmp_path / "garbage.pem"))
    assert not lab_ca.rotation_in_progress()  # nothing half-written
    step(lab_ca.add_root)
    with pytest.raises(LabError, match="already in progress"):
        lab_ca.add_root(LabState(status="up"))


def test_user_supplied_new_root_needs_a_user_issuer(labdir: Path, tmp_path: Path) -> None:
    lab_ca.prepare()
    root = new_trust_anchor(TD)
    (tmp_path / "root.pem").write_bytes(root.cert_pem())
    step(lab_ca.add_root, str(tmp_path / "root.pem"))
    with pytest.raises(LabError, match="key the lab does not hold"):
        lab_ca.rotate_issuer(LabState(status="up"), under_new_root=True)
    wrong = new_issuer(new_trust_anchor(TD), TD)
    (tmp_path / "i.pem").write_bytes(wrong.cert_pem())
    (tmp_path / "k.pem").write_bytes(wrong.key_pem())
    with pytest.raises(ConfigError, match="cannot be used"):
        lab_ca.rotate_issuer(LabState(status="up"), (str(tmp_path / "i.pem"), str(tmp_path / "k.pem")), under_new_root=True)
    good = new_issuer(root, TD)
    (tmp_path / "i.pem").write_bytes(good.cert_pem())
    (tmp_path / "k.pem").write_bytes(good.key_pem())
    step(lab_ca.rotate_issuer, (str(tmp_path / "i.pem"), str(tmp_path / "k.pem")), under_new_root=True)
    step(lab_ca.drop_root)
    assert not os.path.exists(os.path.join(lab_ca.ca_dir(), lab_ca.ANCHOR_KEY_FILE))  # no key for the user's root


def _node(name: str, fps: list[str], issuers: list[str]) -> dict:
    return {"node": name, "bundle": {"generation": 2, "anchors": [{"sha256": f} for f in fps]},
            "certificates": [{"identity": f"id{i}", "issuer": iss} for i, iss in enumerate(issuers)]}


@pytest.mark.parametrize("nodes,lagging", [
    ([_node("n1", ["a", "b"], []), _node("n2", ["b", "a"], [])], []),
    ([_node("n1", ["a", "b"], []), _node("n2", ["a"], [])], ["n2"]),
    ([_node("n1", ["a", "b", "c"], []), {"node": "n2", "error": "refused"}], ["n1", "n2"]),
])
def test_lagging_bundles(nodes: list, lagging: list) -> None:
    assert [s.split(" ")[0] for s in root_rotation.lagging_bundles(nodes, ["a", "b"])] == lagging


def test_stale_certificates_and_bounded_wait() -> None:
    nodes = [_node("n1", [], ["new", "old"]), _node("n2", [], ["new"])]
    assert root_rotation.stale_certificates(nodes, "new") == ["n1: id1 (issuer old)"]
    t = [0.0]
    answers = iter([["x"], ["x"], []])
    assert root_rotation.wait_for(lambda: next(answers), 10, 1, clock=lambda: t[0], sleep=lambda s: t.__setitem__(0, t[0] + s)) == []
    assert root_rotation.wait_for(lambda: ["never"], 3, 1, clock=lambda: t[0], sleep=lambda s: t.__setitem__(0, t[0] + s)) == ["never"]


@pytest.mark.parametrize("pem,match", [
    (None, "not a PEM string"),
    ("", "not a PEM string"),
    ("-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n", "not PEM certificates"),
])
def test_bad_bundle_pushes_are_refused(pem: object, match: str) -> None:
    with pytest.raises(ChainError, match=match):
        check_bundle(pem)


def test_a_leaf_in_a_bundle_is_refused_and_roots_are_described() -> None:
    root = new_trust_anchor(TD)
    ca = CertificateAuthority(TD, [root.cert], new_issuer(root, TD))
    leaf = ca.sign(new_trust_anchor(TD).key.public_key(), "spiffe://cluster.local/ns/a/sa/b")[0]
    with pytest.raises(ChainError, match="not a CA certificate"):
        check_bundle(to_pem([root.cert, leaf]))
    assert len(check_bundle(to_pem([root.cert]))) == 1
    assert describe_bundle(to_pem([root.cert]))[0]["subject"] == root.cert.subject.rfc4514_string()


def test_agent_keeps_its_bundle_when_a_push_is_bad_and_counts_it() -> None:
    from nodemesh.agent.identity_client import AgentIdentity

    root = new_trust_anchor(TD)
    agent = AgentIdentity("node1", "t", to_pem([root.cert]), TD)
    gen = agent.store.bundle_generation
    agent.on_bundle({"type": "bundle", "bundle": "not pem"})
    agent.on_bundle({"type": "bundle"})
    assert agent.bundle_refusals == 2 and agent.store.bundle_generation == gen
    both = to_pem([root.cert, new_trust_anchor(TD).cert])
    agent.on_bundle({"type": "bundle", "bundle": both})
    assert agent.store.bundle_pem == both and agent.store.bundle_generation == gen + 1
    assert len(agent.describe_bundle()["anchors"]) == 2  # type: ignore[arg-type]
