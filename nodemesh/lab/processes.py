"""Starting processes inside a pod or node: its netns and its cgroup.

The child joins the cgroup first (preexec, before exec) and then enters the netns with nsenter:
`ip netns exec` remounts /sys, which would hide cgroup.procs (see EBPF-NOTES). Cgroup membership
survives exec, so everything the command starts stays in the pod's cgroup.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from typing import IO, Any

from nodemesh.lab.network import NETNS_DIR


def _join_cgroup(cgroup: str):  # type: ignore[no-untyped-def]
    def preexec() -> None:
        with open(os.path.join(cgroup, "cgroup.procs"), "w", encoding="ascii") as f:
            f.write(str(os.getpid()))

    return preexec


def venv_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for lab processes: our venv's bin first so `nodemesh` resolves in pods."""
    env = dict(os.environ)
    bindir = os.path.dirname(sys.executable)
    env["PATH"] = f"{bindir}:{env.get('PATH', '/usr/local/bin:/usr/bin:/bin')}"
    env.update(extra or {})
    return env


def command_in(netns: str | None, argv: Sequence[str]) -> list[str]:
    return (["nsenter", f"--net={NETNS_DIR}/{netns}"] if netns else []) + list(argv)


def spawn(
    argv: Sequence[str],
    *,
    netns: str | None,
    cgroup: str | None,
    env: Mapping[str, str] | None = None,
    log: IO[Any] | None = None,
    daemon: bool = True,
) -> subprocess.Popen[bytes]:
    """Starts argv in the given netns and cgroup. daemon=True detaches it (own session, no stdin)."""
    kwargs: dict[str, Any] = {}
    if daemon:
        kwargs = {"stdin": subprocess.DEVNULL, "stdout": log, "stderr": subprocess.STDOUT, "start_new_session": True}
    return subprocess.Popen(
        command_in(netns, argv),
        preexec_fn=_join_cgroup(cgroup) if cgroup else None,
        env=venv_env(env),
        **kwargs,
    )


def run(
    argv: Sequence[str], *, netns: str | None, cgroup: str | None, env: Mapping[str, str] | None = None,
    capture: bool = False, timeout: float | None = None,
) -> subprocess.CompletedProcess[bytes]:
    """Runs argv to completion inside the netns and cgroup (used by `lab exec` and tests)."""
    return subprocess.run(
        command_in(netns, argv),
        preexec_fn=_join_cgroup(cgroup) if cgroup else None,
        env=venv_env(env),
        capture_output=capture,
        timeout=timeout,
    )
