"""cgroup2_mount / on_cgroup2 parse /proc/mounts text (pure, no real mounts needed)."""

from __future__ import annotations

import pytest

from nodemesh.cgroups import cgroup2_mount, cgroup2_mounts, on_cgroup2
from nodemesh.errors import NodemeshError, PreflightError

HYBRID = """\
sysfs /sys sysfs rw,nosuid,nodev,noexec,relatime 0 0
tmpfs /sys/fs/cgroup tmpfs rw,relatime,mode=755 0 0
cgroup /sys/fs/cgroup/cpu cgroup rw,relatime,cpu 0 0
cgroup /sys/fs/cgroup/memory cgroup rw,relatime,memory 0 0
cgroup /sys/fs/cgroup/systemd cgroup rw,relatime,name=systemd 0 0
cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0
bpf /sys/fs/bpf bpf rw,relatime 0 0
"""

UNIFIED = """\
sysfs /sys sysfs rw,nosuid,nodev,noexec,relatime 0 0
cgroup2 /sys/fs/cgroup cgroup2 rw,nosuid,nodev,noexec,relatime,nsdelegate,memory_recursiveprot 0 0
bpf /sys/fs/bpf bpf rw,relatime 0 0
"""

V1_ONLY = """\
tmpfs /sys/fs/cgroup tmpfs rw,relatime,mode=755 0 0
cgroup /sys/fs/cgroup/memory cgroup rw,relatime,memory 0 0
"""


def test_hybrid_layout_finds_unified_subdir() -> None:
    assert cgroup2_mount(HYBRID) == "/sys/fs/cgroup/unified"


def test_unified_layout_finds_sys_fs_cgroup() -> None:
    assert cgroup2_mount(UNIFIED) == "/sys/fs/cgroup"


@pytest.mark.parametrize("text", [V1_ONLY, ""])
def test_no_cgroup2_is_a_clear_preflight_error(text: str) -> None:
    with pytest.raises(PreflightError, match="no cgroup v2 filesystem is mounted") as info:
        cgroup2_mount(text)
    assert isinstance(info.value, NodemeshError)
    assert "mount -t cgroup2" in str(info.value)  # says what to do next


def test_escaped_mount_point_and_several_mounts() -> None:
    text = UNIFIED + "cgroup2 /mnt/my\\040cg cgroup2 rw 0 0\n"
    assert cgroup2_mounts(text) == ["/sys/fs/cgroup", "/mnt/my cg"]
    assert cgroup2_mount(text) == "/sys/fs/cgroup"  # first one wins


def test_cgroup2_type_is_matched_exactly_not_by_device_name() -> None:
    # The device field may say "cgroup2" on a v1 mount; only the type column counts.
    text = "cgroup2 /sys/fs/cgroup/memory cgroup rw,memory 0 0\n" + HYBRID
    assert cgroup2_mount(text) == "/sys/fs/cgroup/unified"


def test_real_proc_mounts_parses() -> None:
    # On this machine kind there is always a cgroup2 mount; the default reads /proc/mounts.
    assert cgroup2_mount().startswith("/")


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/sys/fs/cgroup/unified", True),
        ("/sys/fs/cgroup/unified/nmt/node", True),
        ("/sys/fs/cgroup/memory/nmt", False),  # v1 hierarchy beside the v2 one
        ("/sys/fs/cgroup", False),  # the tmpfs holding the hierarchies
        ("/sys/fs/cgroup/unifiedx", False),  # prefix of a name is not containment
    ],
)
def test_on_cgroup2_hybrid(path: str, expected: bool) -> None:
    assert on_cgroup2(path, HYBRID) is expected


def test_on_cgroup2_unified() -> None:
    assert on_cgroup2("/sys/fs/cgroup/kubepods/pod1", UNIFIED)
    assert not on_cgroup2("/sys/fs/bpf", UNIFIED)
