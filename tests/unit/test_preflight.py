import errno

import pytest

from nodemesh import preflight
from nodemesh.errors import PreflightError

HYBRID = "cgroup /sys/fs/cgroup/memory cgroup rw 0 0\ncgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\nbpf /sys/fs/bpf bpf rw 0 0\n"
V1_ONLY = "cgroup /sys/fs/cgroup/memory cgroup rw 0 0\n"


def test_root_check() -> None:
    assert preflight.check_root(0) is None
    assert "needs root" in (preflight.check_root(1000) or "")


def test_cgroup2_missing_says_how_to_mount_it() -> None:
    assert preflight.check_cgroup2(HYBRID) is None
    msg = preflight.check_cgroup2(V1_ONLY) or ""
    assert "cgroup v2" in msg and "mount -t cgroup2" in msg


def test_bpffs_missing() -> None:
    assert preflight.check_bpffs(HYBRID) is None
    assert "mount -t bpf" in (preflight.check_bpffs(V1_ONLY) or "")


def test_bcc_missing() -> None:
    assert preflight.check_bcc(lambda name: object()) is None
    assert "python3-bpfcc" in (preflight.check_bcc(lambda name: None) or "")


@pytest.mark.parametrize("err, words", [(errno.ENOSYS, "no BPF syscall"), (errno.EPERM, "permission denied"), (errno.EINVAL, "EINVAL")])
def test_bpf_errors_are_explained(err: int, words: str) -> None:
    assert words in (preflight.explain_bpf_errno(err) or "")
    assert preflight.explain_bpf_errno(0) is None


def test_require_collects_every_problem() -> None:
    with pytest.raises(PreflightError) as info:
        preflight.require([lambda: None, lambda: "first problem.", lambda: "second problem."])
    assert str(info.value) == "first problem. second problem."
    assert info.value.exit_code == 3
