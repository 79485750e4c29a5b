"""Checks that the machine can run the lab or an agent, before anything is created.

Each check returns None or one sentence saying what is missing and how to fix it; `require` raises
PreflightError with all of them so a user fixes everything in one go.
"""

from __future__ import annotations

import errno
import importlib.util
import os
from collections.abc import Callable, Sequence

from nodemesh.cgroups import cgroup2_mount
from nodemesh.errors import PreflightError

Check = Callable[[], "str | None"]


def check_root(euid: int | None = None) -> str | None:
    if (os.geteuid() if euid is None else euid) != 0:
        return "nodemesh lab needs root (it creates network namespaces, cgroups and BPF programs): run it with sudo or as root."
    return None


def check_cgroup2(mounts_text: str | None = None) -> str | None:
    try:
        cgroup2_mount(mounts_text)
    except PreflightError as exc:
        return f"{exc}."
    return None


def check_bpffs(mounts_text: str | None = None) -> str | None:
    if mounts_text is None:
        with open("/proc/mounts", encoding="utf-8") as f:
            mounts_text = f.read()
    if not any(len(p := line.split()) >= 3 and p[2] == "bpf" for line in mounts_text.splitlines()):
        return "the BPF filesystem is not mounted: run `mount -t bpf bpf /sys/fs/bpf` (or `make setup`)."
    return None


def check_bcc(find_spec: Callable[[str], object] = importlib.util.find_spec) -> str | None:
    if find_spec("bcc") is None:
        return "the bcc Python module is missing: run `make setup` (it installs Debian's python3-bpfcc and a venv with --system-site-packages)."
    return None


def bpf_syscall_errno() -> int:
    """Creates and closes a 1-entry array map; returns 0 or the errno of the bpf() syscall."""
    from nodemesh.agent.bpf_maps import MAP_TYPE_ARRAY, create_map

    try:
        os.close(create_map(MAP_TYPE_ARRAY, 4, 4, 1))
    except OSError as exc:
        return exc.errno or errno.EINVAL
    return 0


def explain_bpf_errno(err: int) -> str | None:
    if err == 0:
        return None
    if err == errno.ENOSYS:
        return "this kernel has no BPF syscall (CONFIG_BPF_SYSCALL is off): nodemesh needs a kernel with BPF (5.10 or newer)."
    if err in (errno.EPERM, errno.EACCES):
        return "the kernel refused a BPF map (permission denied): run as root, or check kernel.unprivileged_bpf_disabled and lockdown settings."
    return f"the BPF syscall failed ({errno.errorcode.get(err, err)}): nodemesh needs a kernel with BPF."


def check_bpf() -> str | None:
    return explain_bpf_errno(bpf_syscall_errno())


LAB_CHECKS: Sequence[Check] = (check_root, check_cgroup2, check_bpffs, check_bcc, check_bpf)


def require(checks: Sequence[Check] = LAB_CHECKS) -> None:
    problems = []
    for check in checks:
        problem = check()
        if problem:
            problems.append(problem)
            if check is check_root:
                break  # the other checks would only repeat "permission denied"
    if problems:
        raise PreflightError(" ".join(problems))
