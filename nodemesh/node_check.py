"""`nodemesh check --pre`: can this node run the agent? Kernel, BPF features, cgroup v2, bpffs.

Each check is (name, function) returning (ok, detail); the probes are real (bpf() syscalls that
load the program types the agent attaches), and the pure parts (version parsing, verdicts) are
unit-tested with injected inputs.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from nodemesh import preflight

MIN_KERNEL = (5, 10)  # cgroup/connect4 + sockops + sockhash with the helpers the agent uses

_SYS_BPF = 321  # x86_64
_BPF_PROG_LOAD = 5
_PROG_TYPES = {  # name -> (prog type, expected attach type): what bpf/ attaches
    "cgroup/connect4": (18, 10),  # BPF_PROG_TYPE_CGROUP_SOCK_ADDR, BPF_CGROUP_INET4_CONNECT
    "sock_ops": (13, 0),  # BPF_PROG_TYPE_SOCK_OPS
    "sk_msg": (16, 0),  # BPF_PROG_TYPE_SK_MSG
}


@dataclass(frozen=True)
class Result:
    name: str
    ok: bool
    detail: str


def kernel_version(release: str) -> tuple[int, int] | None:
    m = re.match(r"^(\d+)\.(\d+)", release)
    return (int(m.group(1)), int(m.group(2))) if m else None


def check_kernel(release: str | None = None) -> tuple[bool, str]:
    release = release or platform.release()
    v = kernel_version(release)
    if v is None:
        return False, f"cannot read the kernel version from {release!r}"
    if v < MIN_KERNEL:
        return False, f"kernel {release} is older than {MIN_KERNEL[0]}.{MIN_KERNEL[1]}: upgrade the node's kernel"
    return True, f"kernel {release}"


def prog_load_errno(prog_type: int, attach_type: int) -> int:
    """Loads `r0 = 1; exit` as the given program type; 0 or the errno of bpf(BPF_PROG_LOAD)."""
    insns = (ctypes.c_uint8 * 16)(0xB7, 0, 0, 0, 1, 0, 0, 0, 0x95, 0, 0, 0, 0, 0, 0, 0)
    license_ = ctypes.create_string_buffer(b"GPL")
    attr = (ctypes.c_uint8 * 128)()
    base = ctypes.addressof(attr)
    ctypes.c_uint32.from_address(base + 0).value = prog_type
    ctypes.c_uint32.from_address(base + 4).value = 2
    ctypes.c_uint64.from_address(base + 8).value = ctypes.addressof(insns)
    ctypes.c_uint64.from_address(base + 16).value = ctypes.addressof(license_)
    ctypes.c_uint32.from_address(base + 68).value = attach_type
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.syscall(_SYS_BPF, _BPF_PROG_LOAD, ctypes.byref(attr), ctypes.sizeof(attr))
    if fd < 0:
        return ctypes.get_errno()
    os.close(fd)
    return 0


def check_prog_type(name: str, load: Callable[[int, int], int] = prog_load_errno) -> tuple[bool, str]:
    err = load(*_PROG_TYPES[name])
    if err == 0:
        return True, f"the kernel loads {name} programs"
    if err in (errno.EPERM, errno.EACCES):
        return False, f"loading a {name} program was refused (permission): run as root / privileged"
    return False, f"the kernel cannot load {name} programs ({errno.errorcode.get(err, err)}): it lacks a BPF feature the agent needs"


def _wrap(check: Callable[[], str | None], ok_detail: str) -> Callable[[], tuple[bool, str]]:
    def run() -> tuple[bool, str]:
        problem = check()
        return (False, problem) if problem else (True, ok_detail)
    return run


def check_headers(release: str | None = None, exists: Callable[[str], bool] = os.path.exists) -> tuple[bool, str]:
    path = f"/lib/modules/{release or platform.release()}/build"
    if exists(path):
        return True, f"kernel headers at {path} (bcc compiles the BPF programs against them)"
    return False, f"no kernel headers at {path}: install the node's linux-headers package (bcc compiles against them)"


CHECKS: Sequence[tuple[str, Callable[[], tuple[bool, str]]]] = (
    ("root", _wrap(preflight.check_root, "running as root")),
    ("kernel", check_kernel),
    ("bpf-syscall", _wrap(preflight.check_bpf, "bpf() works")),
    *((f"bpf-{n}", (lambda n: lambda: check_prog_type(n))(n)) for n in _PROG_TYPES),
    ("cgroup2", _wrap(preflight.check_cgroup2, "cgroup v2 is mounted")),
    ("bpffs", _wrap(preflight.check_bpffs, "the BPF filesystem is mounted")),
    ("kernel-headers", check_headers),
    ("bcc", _wrap(preflight.check_bcc, "the bcc Python module is importable")),
)


def run_checks(checks: Sequence[tuple[str, Callable[[], tuple[bool, str]]]] = CHECKS) -> list[Result]:
    out = []
    for name, fn in checks:
        try:
            ok, detail = fn()
        except Exception as exc:  # a probe that crashes is a failed check, not a crashed command
            ok, detail = False, f"the check failed: {exc}"
        out.append(Result(name, ok, detail))
    return out
