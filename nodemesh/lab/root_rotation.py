"""Root rotation in the lab: what must be true before each step is safe, read from the agents'
/identity answers (sans-IO predicates), and a bounded wait for them.

- after add-root: every agent trusts the new bundle (old + new) before any leaf is issued under
  the new root, or a peer still holding the old bundle would refuse it;
- after rotate-issuer --under-new-root: every certificate in use is from the new issuer before the
  old root is dropped, or a peer would refuse a not-yet-renewed leaf.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

Nodes = list[dict[str, Any]]  # agents' /identity answers ({"node", "certificates", "bundle"} or {"node", "error"})


def lagging_bundles(nodes: Nodes, fingerprints: Sequence[str]) -> list[str]:
    """Nodes whose agent does not hold exactly the bundle `fingerprints` (or did not answer)."""
    want = sorted(fingerprints)
    out = []
    for n in nodes:
        if "error" in n:
            out.append(f"{n['node']} (unavailable: {n['error']})")
            continue
        have = sorted(a["sha256"] for a in n.get("bundle", {}).get("anchors", []))
        if have != want:
            out.append(f"{n['node']} (holds {len(have)} root(s), not the {len(want)} of the new bundle)")
    return out


def stale_certificates(nodes: Nodes, issuer_subject: str) -> list[str]:
    """Certificates in use that are not from `issuer_subject` (or nodes that did not answer)."""
    out = []
    for n in nodes:
        if "error" in n:
            out.append(f"{n['node']} (unavailable: {n['error']})")
            continue
        out += [f"{n['node']}: {c['identity']} (issuer {c['issuer']})" for c in n.get("certificates", []) if c["issuer"] != issuer_subject]
    return out


def wait_for(check: Callable[[], list[str]], timeout: float, interval: float = 0.5,
             clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep) -> list[str]:
    """Polls `check` (a list of what is not there yet) until it is empty or `timeout` passes;
    returns what was still missing at the end (empty: done)."""
    deadline = clock() + timeout
    while True:
        missing = check()
        if not missing or clock() >= deadline:
            return missing
        sleep(interval)
