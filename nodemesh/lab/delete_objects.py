"""`nodemesh lab delete -f FILE`: remove objects (policies, services, accounts...) from a running lab.

Pods and nodes own netns, veths and processes, so deleting them stays a `lab down` + `lab up` job;
everything else is state only: drop the keys, re-validate, write the controller's file atomically.
"""

from __future__ import annotations

import sys

from nodemesh.errors import LabError
from nodemesh.lab import lab
from nodemesh.lab.state import locked
from nodemesh.model import describe, key_of, load_file, parse_documents, validate

_PLACED = ("Pod", "Node")


def delete(path: str) -> list[str]:
    objs = parse_documents(sys.stdin.read(), "<stdin>") if path == "-" else load_file(path)
    placed = [describe(key_of(o)) for o in objs if o.kind in _PLACED]
    if placed:
        raise LabError(f"deleting {', '.join(placed)} is not supported in a running lab; edit the lab file and run `lab down` + `lab up`")
    with locked():
        lab.require_up()
        current = lab._current_cluster()
        keys = [key_of(o) for o in objs]
        new = current.delete(keys)
        validate(new, path)  # e.g. a policy still refers to a deleted Server: refuse, change nothing
        lab._write_cluster(new)
    return [f"{k[0].lower()}/{k[2]} {'deleted' if k in current.objects else 'not found'}" for k in keys]
