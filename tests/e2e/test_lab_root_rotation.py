"""Trust anchor (root) rotation on the real lab with traffic flowing (issue 4): `nodemesh identity
rotate-root` runs add-root, rotate-issuer --under-new-root, waits until every leaf (4 s lifetime)
is re-issued, then drop-root; a keep-alive cross-node connection and a new connection per request
see zero failed requests, and every agent ends up trusting the new root alone."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest

from nodemesh.controller.ca import load_ca_dir
from nodemesh.lab import lab_ca

from .labtools import cli, client_summary, eventually, fresh_lab, requires_root
from .test_lab_mtls import HELLO_URL, LEAF_LIFETIME, background_client, finish, identities

pytestmark = [pytest.mark.e2e, requires_root]
# enough to outlast the rotation (a few leaf lifetimes) on a busy 2-core machine
LONG_LIVED_REQUESTS = 1_000_000  # bounded by TRAFFIC_SECONDS, so traffic spans the rotation however fast it runs
NEW_CONNECTION_REQUESTS = 1_000_000
TRAFFIC_SECONDS = 10.0


@pytest.fixture(scope="module")
def rotation_lab() -> Iterator[None]:
    with fresh_lab(leaf_lifetime=LEAF_LIFETIME):
        yield


def test_root_rotation_with_traffic_flowing(rotation_lab: None) -> None:
    eventually(lambda: all(len(n.get("certificates", [])) >= 2 for n in identities().values()))
    old_roots = lab_ca.bundle_fingerprints()
    long_lived = background_client(LONG_LIVED_REQUESTS, new_connection=False, duration=TRAFFIC_SECONDS)
    stream = background_client(NEW_CONNECTION_REQUESTS, new_connection=True, duration=TRAFFIC_SECONDS)
    time.sleep(1.0)
    started = time.monotonic()
    out = cli("identity", "rotate-root", "--timeout", str(4 * LEAF_LIFETIME))
    took = time.monotonic() - started
    assert out.returncode == 0, out.stdout + out.stderr
    # both clients were still sending when the old root was dropped: traffic spanned all three steps
    assert long_lived.poll() is None and stream.poll() is None, f"a client finished before the rotation did ({took:.1f}s)"
    assert "3/3 old root dropped" in out.stdout
    summaries = [finish(long_lived, timeout=300), finish(stream, timeout=300)]
    for summary in summaries:
        assert summary["errors"] == 0, summary["last_error"]
        assert summary["by_node"].get("node2", 0) > 0
    print(f"rotate-root took {took:.1f}s; ok requests: keep-alive {summaries[0]['ok']}, new-connection {summaries[1]['ok']}")
    new_roots = lab_ca.bundle_fingerprints()
    assert len(new_roots) == 1 and new_roots[0] not in old_roots
    issuer = load_ca_dir(lab_ca.ca_dir())[1].cert.subject.rfc4514_string()
    for node in identities().values():
        assert [a["sha256"] for a in node["bundle"]["anchors"]] == new_roots
        assert all(c["issuer"] == issuer for c in node["certificates"])
    assert client_summary("client", HELLO_URL, 10)["errors"] == 0  # new handshakes on the new root alone
    # a second rotation step 3 without step 1 is refused by name
    again = cli("identity", "drop-root")
    assert again.returncode != 0 and "no root rotation in progress" in (again.stdout + again.stderr)
    json.dumps(identities())  # the agents still answer
