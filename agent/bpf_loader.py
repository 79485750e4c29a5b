"""Load, attach, configure and detach the connect4 + sock_ops redirect programs.

This is the only Python that touches BPF map file descriptors (STYLE.md). It compiles
bpf/connect.c and bpf/sockops.c as ONE bcc module so both programs share the maps declared in
bpf/include/maps.h, attaches them to a node's cgroup v2 directory, and answers the node proxy's
"where was this accepted connection really going?" question.

Byte orders (checked by tests/e2e/test_bpf_redirect.py): map addresses are network order;
ports are network order except the client port in ``orig_dst_by_tuple``'s key (host order,
as ``bpf_sock_ops.local_port`` gives it).
"""

from __future__ import annotations

import ctypes
import errno
import importlib.resources
import ipaddress
import logging
import os
import socket
import struct
from collections.abc import Iterable, Sequence
from typing import Any

from nodemesh.cgroups import cgroup_id, on_cgroup2
from nodemesh.errors import NodemeshError, PreflightError

log = logging.getLogger(__name__)

# Order = the NM_CNT_* indexes in bpf/include/maps.h.
COUNTER_NAMES: tuple[str, ...] = ("connect_redirected", "connect_exempt", "established_moved")

MESHED_CAPACITY = 16384  # max_entries of meshed_dsts in maps.h

_SETUP_HINT = "run `make setup`"


class BpfUnavailable(PreflightError):
    """The redirect programs cannot be loaded here; the message says what is missing and the fix.

    A PreflightError (itself a NodemeshError) so the CLI reports it with the preflight exit code.
    """


def _ip_net_u32(ip: str) -> int:
    """An IPv4 address as the u32 whose in-memory bytes are network order (like user_ip4)."""
    return struct.unpack("=I", socket.inet_aton(str(ipaddress.IPv4Address(ip))))[0]


def _ip_from_net_u32(value: int) -> str:
    return socket.inet_ntoa(struct.pack("=I", value))


def _check_port(port: int, *, allow_zero: bool) -> int:
    if not isinstance(port, int) or not (0 if allow_zero else 1) <= port <= 65535:
        raise ValueError(f"invalid TCP port {port!r}")
    return port


def _bpf_source_dir() -> str:
    src = importlib.resources.files("nodemesh.bpf")
    if not isinstance(src, os.PathLike) or not os.path.isfile(os.path.join(src, "connect.c")):
        raise BpfUnavailable(
            f"the nodemesh BPF sources are not on the filesystem ({src}): "
            "reinstall nodemesh from a source tree or wheel, not a zip"
        )
    return os.fspath(src)


def _module_text(src_dir: str) -> str:
    """connect.c + sockops.c as one translation unit.

    Concatenated, not #included: bcc only turns functions of the main file into programs (an
    #included connect.c yields "Unknown program"). Their shared `#include "include/maps.h"`
    is resolved through -I<src_dir> and its include guard makes the maps exist once.
    """
    parts = []
    for name in ("connect.c", "sockops.c"):
        with open(os.path.join(src_dir, name), encoding="utf-8") as f:
            parts.append(f'#line 1 "{name}"\n{f.read()}')
    return "\n".join(parts)


def _kernel_headers_present() -> bool:
    release = os.uname().release
    return os.path.isdir(f"/lib/modules/{release}/build") or os.path.exists("/sys/kernel/kheaders.tar.xz")


def _prog_id(fd: int) -> int:
    """Kernel id of a loaded program (struct bpf_prog_info starts with __u32 type, __u32 id)."""
    from bcc.libbcc import lib

    info = (ctypes.c_uint8 * 512)()  # larger than bpf_prog_info; the kernel accepts zeroed tail
    size = ctypes.c_uint32(ctypes.sizeof(info))
    if lib.bpf_obj_get_info_by_fd(ctypes.c_int(fd), info, ctypes.byref(size)) != 0:
        raise OSError(ctypes.get_errno(), f"cannot read BPF program info of fd {fd}")
    return int(struct.unpack_from("=II", bytes(info))[1])


def _attached_ids(cgroup_fd: int, attach_type: int) -> list[int]:
    """Ids of the programs attached to a cgroup (itself, not inherited) at one attach point."""
    from bcc.libbcc import lib

    ids = (ctypes.c_uint32 * 64)()
    count = ctypes.c_uint32(64)
    flags = ctypes.c_uint32(0)
    rc = lib.bpf_prog_query(
        ctypes.c_int(cgroup_fd), ctypes.c_int(attach_type), ctypes.c_uint32(0),
        ctypes.byref(flags), ids, ctypes.byref(count),
    )
    if rc != 0:
        raise OSError(-rc if rc < 0 else ctypes.get_errno(), "BPF_PROG_QUERY failed")
    return list(ids[: count.value])


def _is_eperm(exc: BaseException) -> bool:
    text = str(exc)
    return os.strerror(errno.EPERM) in text or os.strerror(errno.EACCES) in text


class RedirectPrograms:
    """connect4 + sock_ops on one node cgroup, plus the maps they share.

    Use ``load()`` once, then ``set_meshed`` / ``lookup_original_dst`` / ``counters``, and always
    ``close()`` (or use it as a context manager): cgroup attachments made by bcc outlive the
    process, and a leftover connect4 would keep redirecting pods to a proxy that is gone.
    """

    def __init__(
        self,
        cgroup_path: str,
        proxy_ip: str,
        proxy_port: int,
        exempt_cgroup_paths: Sequence[str] = (),
    ) -> None:
        self.cgroup_path = cgroup_path
        self.proxy_ip = str(ipaddress.IPv4Address(proxy_ip))
        self.proxy_port = _check_port(proxy_port, allow_zero=False)
        self.exempt_cgroup_paths = tuple(exempt_cgroup_paths)
        self._bpf: Any = None  # bcc.BPF once loaded
        self._cgroup_fd: int | None = None
        self._attached: list[tuple[Any, int]] = []  # (BPF.Function, attach type), in attach order

    # -- lifecycle -------------------------------------------------------------------------

    def load(self) -> None:
        """Compile, load, configure and attach both programs; BpfUnavailable says why not."""
        if self._bpf is not None:
            raise RuntimeError("RedirectPrograms.load() called twice")
        self._preflight()
        try:
            from bcc import BPF, BPFAttachType  # lazy: the agent package imports without bcc
        except ImportError as exc:
            raise BpfUnavailable(
                f"the bcc Python module is not importable ({exc}): install python3-bpfcc and use a "
                "venv with --system-site-packages, or run `make setup`"
            ) from exc

        src_dir = _bpf_source_dir()
        text = _module_text(src_dir)
        try:
            b = BPF(text=text.encode(), cflags=[f"-I{src_dir}"])
        except Exception as exc:
            if not _kernel_headers_present():
                raise BpfUnavailable(
                    f"cannot compile the BPF programs: kernel headers for {os.uname().release} are "
                    f"missing; {_SETUP_HINT}"
                ) from exc
            raise BpfUnavailable(
                f"cannot compile the BPF programs in {src_dir} ({str(exc).splitlines()[0]}); "
                f"check the kernel headers and bcc install, or {_SETUP_HINT}"
            ) from exc

        self._bpf = b
        try:
            self._cgroup_fd = os.open(self.cgroup_path, os.O_RDONLY | os.O_DIRECTORY)
            connect4 = b.load_func(
                b"nm_connect4", BPF.CGROUP_SOCK_ADDR, attach_type=BPFAttachType.CGROUP_INET4_CONNECT
            )
            sockops = b.load_func(b"nm_sockops", BPF.SOCK_OPS)
            # Configure before attaching, so the very first connect already sees the proxy
            # address and the proxy's exemption (otherwise the proxy could redirect to itself).
            self._fill_config()
            # sock_ops first: a connect4 redirect without the re-keying would be unrecoverable.
            for fn, attach_type in (
                (sockops, BPFAttachType.CGROUP_SOCK_OPS),
                (connect4, BPFAttachType.CGROUP_INET4_CONNECT),
            ):
                # flags=0 (single program, replaced by the next attach): a restarted agent
                # replaces a crashed one's leftover program instead of running behind it (with
                # BPF_F_ALLOW_MULTI both would run and the stale one would redirect first).
                BPF.attach_func(fn, self._cgroup_fd, attach_type)
                self._attached.append((fn, attach_type))
        except Exception as exc:
            self._teardown(raise_errors=False)
            if _is_eperm(exc):
                raise BpfUnavailable(
                    f"the kernel refused to load or attach BPF programs on {self.cgroup_path} ({exc}): "
                    "run the agent as root with CAP_BPF/CAP_SYS_ADMIN and without kernel lockdown"
                ) from exc
            if isinstance(exc, NodemeshError):
                raise
            raise BpfUnavailable(
                f"cannot load or attach the redirect programs on {self.cgroup_path}: {exc}"
            ) from exc
        log.info(
            "redirect programs attached to %s, proxy %s:%d, %d exempt cgroup(s)",
            self.cgroup_path, self.proxy_ip, self.proxy_port, len(self.exempt_cgroup_paths),
        )

    def close(self) -> None:
        """Detach from the cgroup and free the module. Idempotent."""
        self._teardown(raise_errors=True)

    def __enter__(self) -> RedirectPrograms:
        self.load()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- configuration ---------------------------------------------------------------------

    def set_meshed(self, dsts: Iterable[tuple[str, int]]) -> None:
        """Make the meshed destinations exactly ``dsts``; port 0 = every port of that IP.

        New entries are added before stale ones are removed, so a destination present in both
        the old and the new set is never briefly un-meshed.
        """
        table = self._table("meshed_dsts")
        wanted: set[tuple[int, int]] = set()
        for ip, port in dsts:
            wanted.add((_ip_net_u32(ip), socket.htons(_check_port(port, allow_zero=True))))
        if len(wanted) > MESHED_CAPACITY:
            raise ValueError(f"{len(wanted)} meshed destinations exceed the map size {MESHED_CAPACITY}")

        present = {(k.ip4, k.port) for k in table.keys()}
        stale = present - wanted
        if len(present | wanted) > MESHED_CAPACITY:
            # Adding first would overflow the map: drop stale entries first instead.
            self._delete_meshed(table, stale)
            stale = set()
        one = table.Leaf(1)
        for ip4, port in wanted - present:
            table[self._addr_key(table, ip4, port)] = one
        self._delete_meshed(table, stale)

    def _delete_meshed(self, table: Any, entries: Iterable[tuple[int, int]]) -> None:
        for ip4, port in entries:
            try:
                del table[self._addr_key(table, ip4, port)]
            except KeyError:
                pass

    # -- queries ---------------------------------------------------------------------------

    def lookup_original_dst(self, peer_ip: str, peer_port: int) -> tuple[str, int] | None:
        """The original destination of a redirected connection, from the accepted socket's
        getpeername(); None if it was not redirected. The entry is consumed (deleted)."""
        table = self._table("orig_dst_by_tuple")
        key = table.Key()
        key.ip4 = _ip_net_u32(peer_ip)
        key.port = _check_port(peer_port, allow_zero=False)  # host order, as sock_ops stored it
        key._pad = 0
        leaf = table.get(key)
        if leaf is None:
            return None
        try:
            del table[key]
        except KeyError:
            pass  # already evicted by the LRU; the value we read is still right
        return _ip_from_net_u32(leaf.ip4), socket.ntohs(leaf.port)

    def counters(self) -> dict[str, int]:
        """Totals over all CPUs of the per-program counters (COUNTER_NAMES)."""
        table = self._table("nm_counters")
        return {name: int(sum(table[table.Key(i)])) for i, name in enumerate(COUNTER_NAMES)}

    # -- internals -------------------------------------------------------------------------

    def _preflight(self) -> None:
        if os.geteuid() != 0:
            raise BpfUnavailable(
                "loading BPF programs needs root (CAP_BPF and CAP_SYS_ADMIN): run the agent as root"
            )
        for path in (self.cgroup_path, *self.exempt_cgroup_paths):
            if not os.path.isdir(path):
                raise BpfUnavailable(f"cgroup directory {path} does not exist: create it or fix the path")
            if not on_cgroup2(path):
                raise BpfUnavailable(
                    f"{path} is not on a cgroup v2 filesystem: use a directory under the cgroup2 "
                    "mount listed in /proc/mounts (nodemesh.cgroups.cgroup2_mount())"
                )

    def _fill_config(self) -> None:
        proxy = self._table("proxy_addr")
        leaf = proxy.Leaf()
        leaf.ip4 = _ip_net_u32(self.proxy_ip)
        leaf.port = socket.htons(self.proxy_port)
        leaf._pad = 0
        proxy[proxy.Key(0)] = leaf

        exempt = self._table("exempt_cgroups")
        for path in self.exempt_cgroup_paths:
            exempt[exempt.Key(cgroup_id(path))] = exempt.Leaf(1)

    @staticmethod
    def _addr_key(table: Any, ip4: int, port: int) -> Any:
        key = table.Key()
        key.ip4, key.port, key._pad = ip4, port, 0
        return key

    def _table(self, name: str) -> Any:
        if self._bpf is None:
            raise RuntimeError("RedirectPrograms is not loaded: call load() first")
        return self._bpf[name.encode()]  # bcc wants bytes names

    def _teardown(self, *, raise_errors: bool) -> None:
        errors: list[str] = []
        b, self._bpf = self._bpf, None
        # Reverse attach order: connect4 goes first, so no connection is redirected without
        # sock_ops re-keying its original destination.
        while self._attached:
            fn, attach_type = self._attached.pop()
            name = fn.name.decode()
            try:
                # Legacy single attachments detach "whatever is attached", whatever fd we pass:
                # if a newer loader replaced our program, detaching would unmesh ITS pods.
                if _prog_id(fn.fd) not in _attached_ids(self._cgroup_fd, attach_type):
                    log.warning("%s on %s was replaced by another loader; leaving it", name, self.cgroup_path)
                    continue
                b.detach_func(fn, self._cgroup_fd, attach_type)
            except Exception as exc:
                if os.strerror(errno.ENOENT) not in str(exc):  # ENOENT: already gone (cgroup removed)
                    errors.append(f"{name}: {exc}")
        if self._cgroup_fd is not None:
            os.close(self._cgroup_fd)
            self._cgroup_fd = None
        if b is not None:
            b.cleanup()
        if errors and raise_errors:
            raise NodemeshError(
                f"could not detach the redirect programs from {self.cgroup_path} ({'; '.join(errors)}): "
                f"detach them by hand with `bpftool cgroup detach {self.cgroup_path} ...`"
            )
