"""`nodemesh check` (identity material): verdicts on certificates generated here (valid, expiring,
expired, wrong chain, wrong key, not a CA), leaf verdicts from agents' answers, the CLI's table,
JSON and exit codes (0 ok, 1 warn, 2 error)."""

from __future__ import annotations

import datetime as dt
import json
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from nodemesh import ca_check
from nodemesh.cli import cli
from nodemesh.controller.ca import ANCHOR_FILE, ISSUER_FILE, ISSUER_KEY_FILE, KeyPair, new_issuer, new_trust_anchor, to_pem, write_pem

TD = "cluster.local"
DAY = 86400.0
NOW = time.time()


def anchor(days: float = 3650, start_days_ago: float = 1) -> KeyPair:
    return new_trust_anchor(TD, lifetime=(days + start_days_ago) * DAY, now=NOW - start_days_ago * DAY)


def issuer(a: KeyPair, days: float = 365, start_days_ago: float = 1) -> KeyPair:
    return new_issuer(a, TD, lifetime=(days + start_days_ago) * DAY, now=NOW - start_days_ago * DAY)


@pytest.mark.parametrize("days, start, level, words", [
    (3650, 1, "ok", "valid for"),
    (20, 1, "warn", "expires in 20 days"),
    (-2, 10, "error", "expired 2 days ago"),
    (100, -1, "error", "not valid before"),
])
def test_anchor_validity(days: float, start: float, level: str, words: str) -> None:
    [f] = ca_check.check_anchors([anchor(days, start).cert], NOW)
    assert (f.level, f.kind) == (level, "trust-anchor") and words in f.detail, f


@pytest.mark.parametrize("days, level, words", [
    (365, "ok", "valid for"),
    (5, "warn", "expires in 5 days"),
    (8, "ok", "valid for 8 days"),
    (-1, "error", "expired"),
])
def test_issuer_validity(days: float, level: str, words: str) -> None:
    a = anchor()
    f = ca_check.check_issuer(issuer(a, days).cert, [a.cert], NOW)
    assert (f.level, f.kind) == (level, "issuer") and words in f.detail, f


def test_issuer_wrong_chain_wrong_key_outliving_anchor_and_leaf_as_issuer() -> None:
    a, other = anchor(), anchor()
    i = issuer(a)
    f = ca_check.check_issuer(i.cert, [other.cert], NOW)
    assert f.level == "error" and "not signed by any trust anchor" in f.detail
    f = ca_check.check_issuer(i.cert, [other.cert, a.cert], NOW, key=issuer(a).key)  # old+new bundle: chains; key wrong
    assert f.level == "error" and "key does not belong" in f.detail
    assert ca_check.check_issuer(i.cert, [other.cert, a.cert], NOW, key=i.key).level == "ok"
    # our CA caps an issuer at its anchor's expiry; a user-made one may not: same root key, longer-lived twin
    from nodemesh.controller.ca import _ca_cert, new_key as ca_key
    root_key = ca_key()
    short = _ca_cert(f"root.{TD}", root_key, None, 100 * DAY, NOW, 1)
    twin = KeyPair(_ca_cert(f"root.{TD}", root_key, None, 400 * DAY, NOW, 1), root_key)
    f = ca_check.check_issuer(_ca_cert("issuer", ca_key(), twin, 365 * DAY, NOW, 0), [short], NOW)
    assert f.level == "warn" and "outlives its trust anchor" in f.detail
    from nodemesh.controller.ca import CertificateAuthority
    from nodemesh.agent.identity import new_key
    leaf = CertificateAuthority(TD, [a.cert], i).sign(new_key().public_key(), f"spiffe://{TD}/ns/demo/sa/x")[0]
    f = ca_check.check_issuer(leaf, [a.cert], time.time())  # the CA signs at the real now, not at NOW
    assert f.level == "error" and "not a CA" in f.detail


def iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc).isoformat()


def test_leaves_from_agents() -> None:
    cur = "CN=issuer.cluster.local"
    nodes = [
        {"node": "node1", "certificates": [
            {"identity": "spiffe://cluster.local/ns/demo/sa/fresh", "not_before": iso(NOW - 60), "not_after": iso(NOW + DAY), "issuer": cur},
            {"identity": "spiffe://cluster.local/ns/demo/sa/late", "not_before": iso(NOW - 0.9 * DAY), "not_after": iso(NOW + 0.1 * DAY), "issuer": cur},
            {"identity": "spiffe://cluster.local/ns/demo/sa/dead", "not_before": iso(NOW - 2 * DAY), "not_after": iso(NOW - DAY), "issuer": cur},
            {"identity": "spiffe://cluster.local/ns/demo/sa/old-issuer", "not_before": iso(NOW - 60), "not_after": iso(NOW + DAY), "issuer": "CN=old"},
            {"identity": "spiffe://cluster.local/ns/demo/sa/garbled", "not_after": "yesterday"},
        ]},
        {"node": "node2", "error": "connection refused"},
    ]
    got = {(f.subject, f.level) for f in ca_check.check_leaves(nodes, cur, NOW)}
    assert got == {
        ("spiffe://cluster.local/ns/demo/sa/fresh", "ok"), ("spiffe://cluster.local/ns/demo/sa/late", "warn"),
        ("spiffe://cluster.local/ns/demo/sa/dead", "error"), ("spiffe://cluster.local/ns/demo/sa/old-issuer", "warn"),
        ("spiffe://cluster.local/ns/demo/sa/garbled", "error"), ("agent node2", "error"),
    }


def ca_dir(tmp: Path, a: KeyPair, i: KeyPair, bundle: list[KeyPair] | None = None) -> Path:
    d = tmp / "ca"
    d.mkdir()
    write_pem(str(d / ANCHOR_FILE), to_pem([b.cert for b in (bundle or [a])]).encode())
    write_pem(str(d / ISSUER_FILE), i.cert_pem())
    write_pem(str(d / ISSUER_KEY_FILE), i.key_pem(), private=True)
    return d


@pytest.mark.parametrize("case, code", [("ok", 0), ("issuer expiring", 1), ("anchor expiring", 1), ("expired issuer", 2), ("wrong chain", 2)])
def test_cli_exit_codes_table_and_json(tmp_path: Path, case: str, code: int) -> None:
    a = anchor(days=10) if case == "anchor expiring" else anchor()
    i = {"issuer expiring": lambda: issuer(a, 3), "expired issuer": lambda: issuer(a, -1, 5)}.get(case, lambda: issuer(a, 5 if case == "anchor expiring" else 365))()
    if case == "wrong chain":
        i = issuer(anchor())
    d = ca_dir(tmp_path, a, i)
    result = CliRunner().invoke(cli, ["check", "--ca-dir", str(d), "--json"])
    assert result.exit_code == code, result.output
    data = json.loads(result.output)
    assert data["exit_code"] == code and data["thresholds"]["issuer_warn_days"] == 7 and data["thresholds"]["trust_anchor_warn_days"] == 30
    assert {c["kind"] for c in data["checks"]} == {"trust-anchor", "issuer"}
    text = CliRunner().invoke(cli, ["check", "--trust-anchor", str(d / ANCHOR_FILE), "--issuer-cert", str(d / ISSUER_FILE)])
    assert text.exit_code == code and "STATUS" in text.output and "warning(s)" in text.output


def test_root_rotation_bundle_is_ok_and_bad_files_are_errors(tmp_path: Path) -> None:
    old, new = anchor(), anchor()
    d = ca_dir(tmp_path, new, issuer(new), bundle=[old, new])
    data = json.loads(CliRunner().invoke(cli, ["check", "--ca-dir", str(d), "--json"]).output)
    assert [c["level"] for c in data["checks"]] == ["ok", "ok", "ok"]
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate")
    r = CliRunner().invoke(cli, ["check", "--trust-anchor", str(junk), "--json"])
    assert r.exit_code == 2 and "not PEM certificates" in r.output
    r = CliRunner().invoke(cli, ["check", "--issuer-cert", str(junk)])
    assert r.exit_code == 2 and "needs --trust-anchor" in r.output
