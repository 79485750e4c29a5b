"""What a node's agent leaves pinned in bpffs, read and removed with bpftool (no bcc needed).

Layout of one node's pin directory (``/sys/fs/bpf/nodemesh/<node>`` in a cluster, the lab's
``BPF_PIN_ROOT/<node>`` in the lab):

    <pin_dir>/maps/<map>     every map of bpf/include/maps.h (adopted by a restarted agent)
    <pin_dir>/progs/<prog>   the programs the current agent loaded

The cgroup attachments themselves are legacy attachments held by the cgroup, not by a pin; they
are found with ``bpftool cgroup show``/``tree`` and matched to our programs by name (``nm_``).
Only bpf_loader.py (through bpf_maps.py) reads or writes map *contents* from the agent; this module runs bpftool, as an
operator would, for ``nodemesh agent uninstall``, ``nodemesh lab down`` and ``nodemesh bpf status``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from typing import Any

from nodemesh.errors import NodemeshError

PROGRAM_PREFIX = "nm_"  # every nodemesh BPF function name starts with it (bpf/*.c)
COUNTERS_MAP = "nm_counters"
SOCKHASH_MAP = "sock_hash"
DEFAULT_PIN_ROOT = "/sys/fs/bpf/nodemesh"


class BpftoolError(NodemeshError):
    """bpftool failed; the message has its command line and stderr."""


def default_pin_dir(node: str, root: str = DEFAULT_PIN_ROOT) -> str:
    return os.path.join(root, node)


def _bpftool_json(*args: str) -> Any:
    cmd = ["bpftool", "-j", *args]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        raise BpftoolError("bpftool is not installed: run `make setup` (Debian package bpftool)") from None
    if out.returncode != 0:
        raise BpftoolError(f"`{' '.join(cmd)}` failed: {(out.stderr or out.stdout).strip()}")
    text = out.stdout.strip()
    return json.loads(text) if text else []  # bpftool prints a bare newline for "nothing"


def attached_to(cgroup_path: str) -> list[dict[str, Any]]:
    """Programs attached directly to a cgroup: [{id, attach_type, name, ...}]."""
    return list(_bpftool_json("cgroup", "show", cgroup_path))


def detach_all(cgroup_path: str) -> list[str]:
    """Detach every nodemesh program attached directly to ``cgroup_path``; returns what went.

    Other tools' programs (names not starting with ``nm_``) are left alone. A missing cgroup
    means there is nothing to detach.
    """
    if not os.path.isdir(cgroup_path):
        return []
    removed = []
    # connect4 first: no connection may be redirected once its re-keying (sock_ops) is gone.
    for prog in sorted(attached_to(cgroup_path), key=lambda p: "connect" not in str(p.get("attach_type"))):
        if not str(prog.get("name", "")).startswith(PROGRAM_PREFIX):
            continue
        cmd = ["bpftool", "cgroup", "detach", cgroup_path, prog["attach_type"], "id", str(prog["id"])]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        if out.returncode != 0 and os.path.isdir(cgroup_path):
            raise BpftoolError(f"`{' '.join(cmd)}` failed: {out.stderr.strip()}")
        removed.append(f"{prog['name']} ({prog['attach_type']}) from {cgroup_path}")
    return removed


def uninstall(cgroup_path: str, pin_dir: str) -> list[str]:
    """Remove a node's redirection: detach from its cgroup (connect4 first, so no connection is
    redirected without its re-keying), then unlink every pin. Idempotent."""
    removed = detach_all(cgroup_path)
    if os.path.isdir(pin_dir):
        shutil.rmtree(pin_dir)
        removed.append(f"pins under {pin_dir}")
    return removed


# ---- status -------------------------------------------------------------------------------------


@dataclass
class MapStatus:
    name: str
    type: str
    max_entries: int
    entries: int | None  # None: bpftool cannot count this map type


@dataclass
class ProgramStatus:
    name: str
    id: int
    type: str
    attached: list[str] = field(default_factory=list)  # "<cgroup> (<attach type>)" or "map sock_hash"


@dataclass
class NodeBpfStatus:
    node: str
    pin_dir: str
    programs: list[ProgramStatus]
    maps: list[MapStatus]
    counters: dict[str, int]


def _cgroup_attachments() -> dict[int, list[str]]:
    """Program id -> where it is attached, over the whole cgroup tree."""
    where: dict[int, list[str]] = {}
    for cg in _bpftool_json("cgroup", "tree"):
        for prog in cg.get("programs", []):
            where.setdefault(int(prog["id"]), []).append(f"{cg['cgroup']} ({prog['attach_type']})")
    return where


def _count_entries(path: str, map_type: str) -> int | None:
    if map_type in ("array", "percpu_array"):
        return None  # every slot always exists: "fill" is meaningless
    try:
        return len(_bpftool_json("map", "dump", "pinned", path))
    except BpftoolError:
        return None  # e.g. sockhash values cannot be read from user space on some kernels


def read_counters(pin_dir: str, names: tuple[str, ...]) -> dict[str, int]:
    """Sum over CPUs of nm_counters, named in index order (bpf_loader.COUNTER_NAMES)."""
    path = os.path.join(pin_dir, "maps", COUNTERS_MAP)
    if not os.path.exists(path):
        return {}
    totals: dict[str, int] = {}
    for entry in _bpftool_json("map", "dump", "pinned", path):
        idx = _as_int(entry.get("key"))
        if idx < len(names):
            totals[names[idx]] = sum(_as_int(v.get("value")) for v in entry.get("values", []))
    return totals


def _as_int(value: Any) -> int:
    """bpftool shows a number as an int (with BTF) or as little-endian hex bytes (without)."""
    if isinstance(value, list):
        return int.from_bytes(bytes(int(b, 16) for b in value), "little")
    return int(value or 0)


def node_status(node: str, pin_dir: str, counter_names: tuple[str, ...]) -> NodeBpfStatus:
    attachments = _cgroup_attachments()
    programs = []
    progs_dir = os.path.join(pin_dir, "progs")
    for name in sorted(os.listdir(progs_dir)) if os.path.isdir(progs_dir) else []:
        info = _bpftool_json("prog", "show", "pinned", os.path.join(progs_dir, name))
        attached = list(attachments.get(int(info["id"]), []))
        if info.get("type") == "sk_msg":
            attached.append(f"map {SOCKHASH_MAP} (sk_msg verdict)")
        elif info.get("type") == "sk_skb":  # the same-node splice (bpf/splice.c)
            attached.append("map splice_hash (sk_skb stream verdict)")
        programs.append(ProgramStatus(name=name, id=int(info["id"]), type=str(info.get("type")), attached=attached))
    maps = []
    maps_dir = os.path.join(pin_dir, "maps")
    for name in sorted(os.listdir(maps_dir)) if os.path.isdir(maps_dir) else []:
        path = os.path.join(maps_dir, name)
        info = _bpftool_json("map", "show", "pinned", path)
        maps.append(MapStatus(name=name, type=str(info.get("type")), max_entries=int(info.get("max_entries", 0)),
                              entries=_count_entries(path, str(info.get("type")))))
    return NodeBpfStatus(node=node, pin_dir=pin_dir, programs=programs, maps=maps,
                         counters=read_counters(pin_dir, counter_names))


def status(pin_root: str, counter_names: tuple[str, ...]) -> list[NodeBpfStatus]:
    """One entry per node directory under ``pin_root`` (empty if nothing is pinned)."""
    if not os.path.isdir(pin_root):
        return []
    return [node_status(n, os.path.join(pin_root, n), counter_names) for n in sorted(os.listdir(pin_root))
            if os.path.isdir(os.path.join(pin_root, n))]
