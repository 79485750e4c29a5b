"""The lab's CA files: generated or user-supplied (each bad input refused by name), issuer
rotation on disk, and the controller's reload (SIGHUP path) of what is on disk."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from nodemesh.controller.ca import CaError, CertificateAuthority, load_ca_dir, new_issuer, new_trust_anchor, reload_into
from nodemesh.errors import ConfigError, LabError
from nodemesh.lab import lab_ca
from nodemesh.lab.state import LabState

TD = "cluster.local"


@pytest.fixture
def labdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("NODEMESH_LAB_DIR", str(tmp_path))
    return tmp_path


def user_files(tmp: Path, *, foreign: bool = False, garbage_key: bool = False) -> tuple[str, str, str]:
    anchor = new_trust_anchor(TD)
    issuer = new_issuer(new_trust_anchor(TD) if foreign else anchor, TD)
    paths = (tmp / "root.pem", tmp / "issuer.pem", tmp / "issuer-key.pem")
    paths[0].write_bytes(anchor.cert_pem())
    paths[1].write_bytes(issuer.cert_pem())
    paths[2].write_bytes(b"not a key" if garbage_key else issuer.key_pem())
    return tuple(str(p) for p in paths)  # type: ignore[return-value]


def test_generated_ca_is_usable_and_keys_are_private(labdir: Path) -> None:
    d = lab_ca.prepare(leaf_lifetime=5)
    anchors, issuer = load_ca_dir(d)
    CertificateAuthority(TD, anchors, issuer)
    for f in ("issuer-key.pem", lab_ca.ANCHOR_KEY_FILE):
        assert os.stat(os.path.join(d, f)).st_mode & 0o077 == 0
    assert lab_ca.leaf_lifetime() == "5"


def test_user_supplied_ca_is_used(labdir: Path, tmp_path: Path) -> None:
    files = user_files(tmp_path)
    d = lab_ca.prepare(files)
    anchors, _ = load_ca_dir(d)
    assert Path(files[0]).read_bytes() == Path(d, "trust-anchor.pem").read_bytes()
    assert not os.path.exists(os.path.join(d, lab_ca.ANCHOR_KEY_FILE))  # the lab never holds the user's root key


@pytest.mark.parametrize("case,match", [
    ("partial", "pass all of --trust-anchor"),
    ("foreign_issuer", "not signed by any trust anchor"),
    ("garbage_key", "not an unencrypted PEM private key"),
    ("missing_file", "cannot be read"),
    ("short_lifetime", "below the 1-second minimum"),
])
def test_bad_ca_input_is_refused_by_name(labdir: Path, tmp_path: Path, case: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        if case == "partial":
            lab_ca.prepare((user_files(tmp_path)[0], None, None))
        elif case == "foreign_issuer":
            lab_ca.prepare(user_files(tmp_path, foreign=True))
        elif case == "garbage_key":
            lab_ca.prepare(user_files(tmp_path, garbage_key=True))
        elif case == "missing_file":
            lab_ca.prepare((str(tmp_path / "nope.pem"), str(tmp_path / "a"), str(tmp_path / "b")))
        else:
            lab_ca.prepare(leaf_lifetime=0.5)


def test_rotate_issuer_writes_a_new_issuer_the_controller_adopts(labdir: Path) -> None:
    d = lab_ca.prepare()
    anchors, old = load_ca_dir(d)
    ca = CertificateAuthority(TD, anchors, old)
    with pytest.raises(LabError, match="controller is not running"):  # written, but nobody to signal
        lab_ca.rotate_issuer(LabState(status="up"))
    anchors2, new = load_ca_dir(d)
    assert new.cert != old.cert
    assert reload_into(ca, anchors2, new) is True and ca.issuer.cert == new.cert and ca.rotations == 1
    assert reload_into(ca, anchors2, new) is False  # same files again: nothing changes


def test_rotate_issuer_without_the_anchor_key_needs_an_issuer(labdir: Path, tmp_path: Path) -> None:
    lab_ca.prepare(user_files(tmp_path))
    with pytest.raises(LabError, match="user-supplied trust anchor"):
        lab_ca.rotate_issuer(LabState(status="up"))


def test_root_rotation_on_disk_keeps_old_and_new(labdir: Path) -> None:
    d = lab_ca.prepare()
    anchors, issuer = load_ca_dir(d)
    ca = CertificateAuthority(TD, anchors, issuer)
    new_root = new_trust_anchor(TD)
    both = [*anchors, new_root.cert]
    assert reload_into(ca, both, new_issuer(new_root, TD)) is True
    assert len(ca.anchors) == 2
    with pytest.raises(CaError):  # dropping the root the new issuer hangs from is refused
        reload_into(ca, anchors, ca.issuer)
    assert len(ca.anchors) == 2
