"""`nodemesh check --pre`: verdicts from injected inputs, and the real probes on this machine."""

from __future__ import annotations

import errno
import json
import os

import pytest
from click.testing import CliRunner

from nodemesh.cli import cli
from nodemesh.node_check import check_headers, check_kernel, check_prog_type, prog_load_errno, run_checks


@pytest.mark.parametrize("release, ok, words", [
    ("6.1.0-18-amd64", True, "kernel 6.1.0"),
    ("5.10.0", True, "kernel 5.10.0"),
    ("5.4.0-150-generic", False, "older than 5.10"),
    ("weird", False, "cannot read the kernel version"),
])
def test_kernel_version_verdicts(release: str, ok: bool, words: str) -> None:
    got_ok, detail = check_kernel(release)
    assert got_ok is ok and words in detail


@pytest.mark.parametrize("err, ok, words", [
    (0, True, "loads sock_ops"),
    (errno.EPERM, False, "permission"),
    (errno.EINVAL, False, "EINVAL"),
])
def test_prog_type_verdicts(err: int, ok: bool, words: str) -> None:
    got_ok, detail = check_prog_type("sock_ops", load=lambda t, a: err)
    assert got_ok is ok and words in detail


def test_headers_verdict() -> None:
    assert check_headers("1.2.3", exists=lambda p: False)[1].startswith("no kernel headers at /lib/modules/1.2.3/build")


@pytest.mark.skipif(os.geteuid() != 0, reason="BPF program loads need root")
def test_real_probe_loads_what_the_agent_attaches_and_refuses_nonsense() -> None:
    assert prog_load_errno(18, 10) == 0  # cgroup/connect4
    assert prog_load_errno(13, 0) == 0  # sock_ops
    assert prog_load_errno(9999, 0) == errno.EINVAL


def test_a_crashing_probe_is_a_failed_check() -> None:
    def boom() -> tuple[bool, str]:
        raise OSError("no /proc")
    [r] = run_checks([("x", boom)])
    assert not r.ok and "no /proc" in r.detail


def test_check_pre_cli_is_readable_and_scriptable() -> None:
    result = CliRunner().invoke(cli, ["check", "--pre", "--json"])
    data = json.loads(result.output)
    assert result.exit_code == (0 if data["ok"] else 3)
    assert {c["name"] for c in data["checks"]} >= {"kernel", "bpf-cgroup/connect4", "cgroup2", "bpffs"}
    text = CliRunner().invoke(cli, ["check", "--pre"])
    assert "CHECK" in text.output and "checks passed" in text.output
    # without --pre it checks the identity material (tests/unit/test_ca_check.py): a missing file is an error
    assert CliRunner().invoke(cli, ["check", "--trust-anchor", "/nonexistent/anchor.pem"]).exit_code == 2
