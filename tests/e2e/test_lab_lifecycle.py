"""Lab teardown is complete, also after a crash; bad input is refused before anything is created."""

from __future__ import annotations

import os
import signal
import textwrap

import pytest

from nodemesh.lab import lab
from nodemesh.lab.state import pid_alive

from .labtools import cli, leftovers, requires_root

pytestmark = [pytest.mark.e2e, requires_root]


def test_down_after_a_crash_removes_everything() -> None:
    lab.down()
    state = lab.up()
    try:
        # Simulate a crash: every lab process dies at once, nothing gets to clean up.
        for proc in state.processes.values():
            try:
                os.kill(int(proc["pid"]), signal.SIGKILL)
            except ProcessLookupError:
                pass
        assert leftovers(), "a crashed lab should leave objects for `lab down` to find"
    finally:
        out = cli("lab", "down")
    assert out.returncode == 0, out.stderr
    assert leftovers() == []
    assert not any(pid_alive(int(p["pid"])) for p in state.processes.values())
    again = cli("lab", "down")  # idempotent
    assert again.returncode == 0 and "nothing to remove" in again.stdout


def test_up_with_an_invalid_file_creates_nothing(tmp_path) -> None:
    lab.down()
    bad = tmp_path / "lab.yaml"
    bad.write_text(textwrap.dedent("""
        apiVersion: v1
        kind: Node
        metadata: {name: node1}
        ---
        apiVersion: v1
        kind: Service
        metadata: {name: web, namespace: default}
        spec: {clusterIP: 10.96.300.1, ports: [{port: 80}]}
    """))
    out = cli("lab", "up", "-f", str(bad))
    assert out.returncode == 2
    assert str(bad) in out.stderr and "Service default/web" in out.stderr and "spec.clusterIP" in out.stderr
    assert leftovers() == []


@pytest.mark.parametrize(
    "doc, field",
    [
        ("apiVersion: v1\nkind: Gadget\nmetadata: {name: x}\n", "kind"),
        ("apiVersion: v1\nkind: Service\nmetadata: {name: x}\nspec: {clusterIP: 10.96.0.9}\n", "spec.ports"),
        ("apiVersion: v1\nkind: Node\nmetadata: {name: n1}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: {nodeName: n2}\n", "spec.nodeName"),
    ],
)
def test_up_names_the_bad_field(tmp_path, doc: str, field: str) -> None:
    bad = tmp_path / "lab.yaml"
    bad.write_text(doc)
    out = cli("lab", "up", "-f", str(bad))
    assert out.returncode == 2, out.stderr
    assert field in out.stderr and str(bad) in out.stderr
    assert leftovers() == []


def test_commands_without_a_lab_say_so() -> None:
    lab.down()
    for args in (["lab", "status"], ["lab", "exec", "client", "--", "true"], ["lab", "apply", "-f", os.devnull]):
        out = cli(*args)
        assert out.returncode == 4 and "no lab is up" in out.stderr, (args, out.stderr)


def test_not_root_gets_one_clear_sentence() -> None:
    out = cli_as_nobody("lab", "up")
    assert out.returncode == 3
    assert "needs root" in out.stderr
    assert leftovers() == []


# Imports happen as root, then the process becomes nobody and runs the CLI: a checkout under a
# 0700 directory (e.g. mktemp -d) is not readable by nobody, and that must not decide this test.
_AS_NOBODY = """
import os, sys
import nodemesh.cgroups, nodemesh.cli, nodemesh.lab.lab, nodemesh.preflight
os.setgroups([]); os.setgid(65534); os.setuid(65534)
sys.argv = ["nodemesh", *sys.argv[1:]]
nodemesh.cli.main()
"""


def cli_as_nobody(*args: str):
    import subprocess
    import sys

    env = {"PATH": os.environ.get("PATH", ""), "NODEMESH_LAB_DIR": "/tmp/nodemesh-nobody-lab", "HOME": "/tmp"}
    return subprocess.run([sys.executable, "-c", _AS_NOBODY, *args], capture_output=True, text=True, env=env, timeout=60)
