"""The lab's state file: what exists, written *before* each thing is created so `lab down` can
remove everything after a crash. Mutating commands hold an exclusive lock on the lab directory."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from nodemesh.lab.topology import DEFAULT_LAB_DIR


def lab_dir() -> str:
    return os.environ.get("NODEMESH_LAB_DIR", DEFAULT_LAB_DIR)


@dataclass
class LabState:
    status: str = "creating"  # creating | up
    started_at: float = field(default_factory=time.time)
    lab_file: str = ""
    cgroup_root: str = ""
    nodes: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> {"index"}
    pods: dict[str, dict[str, Any]] = field(default_factory=dict)  # "ns/name" -> {"node", "index"}
    processes: dict[str, dict[str, Any]] = field(default_factory=dict)  # id -> {"pid", "role", "log"}
    forward_rule: bool = False

    @property
    def path(self) -> str:
        return os.path.join(lab_dir(), "state.json")

    def save(self) -> None:
        os.makedirs(lab_dir(), exist_ok=True)
        tmp = self.path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(asdict(self), f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    @classmethod
    def load(cls) -> LabState | None:
        try:
            with open(os.path.join(lab_dir(), "state.json"), encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return cls(status="corrupt")
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})

    @staticmethod
    def remove() -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(lab_dir(), "state.json"))


@contextlib.contextmanager
def locked() -> Iterator[None]:
    """Serialises lab commands (up/down/apply) across processes."""
    os.makedirs(lab_dir(), exist_ok=True)
    with open(os.path.join(lab_dir(), "lock"), "w", encoding="ascii") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours counts as gone.
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False
