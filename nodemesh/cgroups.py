"""cgroup v2 helpers shared by the agent, the lab and tests.

The cgroup v2 mount point differs between hosts (``/sys/fs/cgroup`` in the unified layout,
``/sys/fs/cgroup/unified`` in the hybrid one), so it is always read from /proc/mounts.
"""

from __future__ import annotations

import os
import re

from nodemesh.errors import PreflightError

_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")


def _unescape(field: str) -> str:
    # /proc/mounts escapes space, tab, newline and backslash as \ooo.
    return _OCTAL_ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field)


def _read_mounts(mounts_text: str | None) -> str:
    if mounts_text is not None:
        return mounts_text
    with open("/proc/mounts", encoding="utf-8") as f:
        return f.read()


def cgroup2_mounts(mounts_text: str | None = None) -> list[str]:
    """Every cgroup v2 mount point, in mount order (pure when given the text of /proc/mounts)."""
    points = []
    for line in _read_mounts(mounts_text).splitlines():
        fields = line.split()
        if len(fields) >= 3 and fields[2] == "cgroup2":
            points.append(_unescape(fields[1]))
    return points


def cgroup2_mount(mounts_text: str | None = None) -> str:
    """The cgroup v2 mount point (the first one if several); PreflightError if there is none."""
    points = cgroup2_mounts(mounts_text)
    if not points:
        raise PreflightError(
            "no cgroup v2 filesystem is mounted (no 'cgroup2' line in /proc/mounts): "
            "boot with systemd.unified_cgroup_hierarchy=1 or run "
            "`mount -t cgroup2 none /sys/fs/cgroup/unified`"
        )
    return points[0]


def on_cgroup2(path: str, mounts_text: str | None = None) -> bool:
    """True if ``path`` lies on a cgroup v2 filesystem.

    Decided by the longest mount point containing the path, so a cgroup v1 hierarchy mounted
    below /sys/fs/cgroup (hybrid layout) is told apart from the cgroup2 one beside it.
    """
    real = os.path.realpath(path)
    best, best_type = "", ""
    for line in _read_mounts(mounts_text).splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        point = _unescape(fields[1])
        inside = real == point or real.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, best_type = point, fields[2]
    return best_type == "cgroup2"


def cgroup_id(path: str) -> int:
    """The id the kernel reports for a cgroup (bpf_get_current_cgroup_id): its directory's inode."""
    return os.stat(path).st_ino
