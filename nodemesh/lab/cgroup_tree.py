"""The lab's cgroup v2 subtree: one per node (BPF attach point), one child per pod and agent."""

from __future__ import annotations

import os
import time


def make(path: str) -> None:
    os.makedirs(path, exist_ok=True)


def populated(path: str) -> bool:
    try:
        with open(os.path.join(path, "cgroup.events"), encoding="ascii") as f:
            return any(line.strip() == "populated 1" for line in f)
    except FileNotFoundError:
        return False


def kill(path: str, timeout: float = 5.0) -> bool:
    """SIGKILLs every process in the subtree (cgroup.kill, Linux 5.14+); True once it is empty."""
    if not os.path.isdir(path):
        return True
    try:
        with open(os.path.join(path, "cgroup.kill"), "w", encoding="ascii") as f:
            f.write("1")
    except OSError:
        _kill_listed(path)
    deadline = time.monotonic() + timeout
    while populated(path):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def _kill_listed(path: str) -> None:
    for root, _dirs, _files in os.walk(path):
        try:
            with open(os.path.join(root, "cgroup.procs"), encoding="ascii") as f:
                pids = [int(p) for p in f.read().split()]
        except OSError:
            continue
        for pid in pids:
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass


def remove(path: str) -> None:
    """rmdir bottom-up (cgroupfs refuses recursive removal); BPF programs attached go with it."""
    if not os.path.isdir(path):
        return
    for root, dirs, _files in os.walk(path, topdown=False):
        for d in dirs:
            try:
                os.rmdir(os.path.join(root, d))
            except FileNotFoundError:
                pass
    os.rmdir(path)


def procs(path: str) -> list[int]:
    try:
        with open(os.path.join(path, "cgroup.procs"), encoding="ascii") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []
