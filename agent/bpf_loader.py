"""Load, attach, configure and detach the node's redirect programs.

This module and agent/bpf_maps.py (the bpf(2) syscall, no bcc) are the only Python that touches
BPF map file descriptors (STYLE.md). It compiles bpf/connect.c, sockops.c, getpeername.c,
redirect.c and splice.c as ONE bcc module so all programs share the maps declared in
bpf/include/maps.h, attaches the cgroup programs (sock_ops, getpeername4, connect4) to a node's
cgroup v2 directory and the sk_msg / sk_skb verdicts to their sockhash maps, and answers the node
proxy's "where was this accepted connection really going?" question. Every map access at run
time goes through agent/bpf_maps.BpfMap, whoever compiled the programs.

Two lifetimes:
- ``pin_dir`` unset (tests of the bare loader): bcc compiles and attaches in this process,
  BpfMaps wrap bcc's map fds, and ``close()`` detaches everything.
- ``pin_dir`` set (the agent): compiling, loading, attaching and pinning run in a short-lived
  child process (agent/bpf_child.py, which does the unpinned-style load with pins, then exits);
  this process then opens the pinned maps by path and never imports bcc, so libbcc/libLLVM/libclang
  (~80 MiB of PSS) never enter the node proxy. Maps live pinned in ``<pin_dir>/maps``, programs in
  ``<pin_dir>/progs``; the cgroup attachments are legacy attachments held by the cgroup and the
  sk_msg/sk_skb attachments are held by their (pinned) sockhash, so both outlive the child and
  any agent; ``close()`` only lets go. A dead proxy means connects are refused at once. The next
  ``load()`` adopts the pinned maps and replaces the programs. ``agent.bpf_pins.uninstall``
  removes attachments and pins.

Byte orders (checked by tests/e2e/test_bpf_redirect.py): map addresses are network order;
ports are network order except the client port in ``orig_dst_by_tuple``'s key (host order,
as ``bpf_sock_ops.local_port`` gives it).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import importlib.resources
import ipaddress
import logging
import os
import shutil
import socket
import struct
import subprocess
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

from nodemesh.agent.bpf_maps import BpfMap, obj_pin
from nodemesh.agent.bpf_pins import detach_all
from nodemesh.cgroups import cgroup_id, on_cgroup2
from nodemesh.errors import NodemeshError, PreflightError

log = logging.getLogger(__name__)

# Order = the NM_CNT_* indexes in bpf/include/maps.h.
COUNTER_NAMES: tuple[str, ...] = (
    "connect_redirected", "connect_exempt", "established_moved",
    "sockmap_added", "sockmap_full", "shortcut_msgs", "shortcut_bytes", "shortcut_miss",
    "peername_restored", "splice_skbs", "splice_bytes", "splice_pass",
)

# The module's source files, concatenated in this order.
SOURCES: tuple[str, ...] = ("connect.c", "sockops.c", "getpeername.c", "redirect.c", "splice.c")

# (function, bcc program type name, BPFAttachType name) of the cgroup programs, in attach order:
# sock_ops first (a connect4 redirect without its re-keying would be unrecoverable), connect4 last.
CGROUP_PROGRAMS: tuple[tuple[str, str, str], ...] = (
    ("nm_sockops", "SOCK_OPS", "CGROUP_SOCK_OPS"),
    ("nm_getpeername4", "CGROUP_SOCK_ADDR", "CGROUP_INET4_GETPEERNAME"),
    ("nm_connect4", "CGROUP_SOCK_ADDR", "CGROUP_INET4_CONNECT"),
)
SHORTCUT_PROGRAM = "nm_redirect"  # sk_msg, attached to the sock_hash map
SOCKHASH = "sock_hash"
SPLICE_PROGRAM = "nm_splice"  # sk_skb stream verdict, attached to the splice_hash map
SPLICE_HASH = "splice_hash"

MESHED_CAPACITY = 16384  # max_entries of meshed_dsts in maps.h
PROXY_PORTS_MAX = 16  # NM_PROXY_PORTS_MAX: proxy_addr entries
SET_PROXY_PORTS = 2  # NM_SET_PROXY_PORTS: the nm_settings index of how many are in use

# The maps user space reads or writes, as bpf_maps struct formats (key, value) of bpf/include/maps.h.
# nm_addr4 / nm_tuple_key = "=IHH" (ip4, port, _pad); nm_sock_key = "=IIII"; sockhash values = a socket fd.
MAP_FORMATS: dict[str, tuple[str, str]] = {
    "meshed_dsts": ("=IHH", "=I"),
    "exempt_cgroups": ("=Q", "=I"),
    "proxy_addr": ("=i", "=IHH"),
    "nm_settings": ("=i", "=I"),
    "orig_dst_by_tuple": ("=IHH", "=IHH"),
    "splice_hash": ("=IIII", "=I"),
    "splice_peer": ("=IIII", "=IIII"),
    "splice_bytes": ("=IIII", "=Q"),
    "nm_counters": ("=i", "=Q"),
}

_SETUP_HINT = "run `make setup`"


class SockKey(NamedTuple):
    """struct nm_sock_key: addresses network order (as u32), ports host order."""

    sip: int
    dip: int
    sport: int
    dport: int


class BpfUnavailable(PreflightError):
    """The redirect programs cannot be loaded here; the message says what is missing and the fix.

    A PreflightError (itself a NodemeshError) so the CLI reports it with the preflight exit code.
    """


_U32 = struct.Struct("=I")


def _ip_net_u32(ip: str) -> int:
    """An IPv4 address as the u32 whose in-memory bytes are network order (like user_ip4).
    inet_pton: strict dotted quad, and ~10x cheaper than ipaddress on the per-connection path."""
    try:
        return int(_U32.unpack(socket.inet_pton(socket.AF_INET, ip))[0])
    except (OSError, TypeError):
        raise ValueError(f"{ip!r} is not an IPv4 address") from None


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
    """SOURCES as one translation unit.

    Concatenated, not #included: bcc only turns functions of the main file into programs (an
    #included connect.c yields "Unknown program"). Their shared `#include "include/maps.h"`
    is resolved through -I<src_dir> and its include guard makes the maps exist once.
    """
    parts = []
    for name in SOURCES:
        try:
            with open(os.path.join(src_dir, name), encoding="utf-8") as f:
                parts.append(f'#line 1 "{name}"\n{f.read()}')
        except OSError as exc:
            raise BpfUnavailable(f"cannot read the BPF source {name} in {src_dir} ({exc.strerror}): reinstall nodemesh") from exc
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


def _load_func(b: Any, name: str, prog_type: int, **kwargs: Any) -> Any:
    """b.load_func, but a program the kernel rejects is named with the verifier's last words.

    bcc prints the verifier log on fd 2 and raises a bare "Failed to load BPF program"; capture
    fd 2 around the call so the error says which program and why.
    """
    import tempfile

    with tempfile.TemporaryFile() as log_file:
        saved = os.dup(2)
        os.dup2(log_file.fileno(), 2)
        try:
            return b.load_func(name.encode(), prog_type, **kwargs)
        except Exception as exc:
            os.dup2(saved, 2)
            log_file.seek(0)
            lines = [l for l in log_file.read().decode(errors="replace").splitlines() if l.strip()]
            verifier = " | ".join(lines[-6:]) or str(exc)
            raise ProgramRejected(name, verifier) from exc
        finally:
            os.dup2(saved, 2)
            os.close(saved)


class ProgramRejected(BpfUnavailable):
    """The kernel refused to load one program (verifier or permissions)."""

    def __init__(self, program: str, verifier: str) -> None:
        super().__init__(f"the kernel rejected BPF program {program}: {verifier}")
        self.program = program
        self.verifier = verifier


def _detach_pinned_shortcut(pin_dir: str) -> None:
    """Detach a previous agent's sk_msg program from the pinned sock_hash (shortcut now off)."""
    prog = os.path.join(pin_dir, "progs", SHORTCUT_PROGRAM)
    sockhash = os.path.join(pin_dir, "maps", SOCKHASH)
    if os.path.exists(prog) and os.path.exists(sockhash):
        subprocess.run(["bpftool", "prog", "detach", "pinned", prog, "msg_verdict", "pinned", sockhash],
                       capture_output=True, check=False)  # ENOENT (not attached) is fine
        with contextlib.suppress(FileNotFoundError):
            os.unlink(prog)


def _is_eperm(exc: BaseException) -> bool:
    text = str(exc)
    return os.strerror(errno.EPERM) in text or os.strerror(errno.EACCES) in text


class RedirectPrograms:
    """The redirect programs on one node cgroup, plus the maps they share.

    Use ``load()`` once, then ``set_meshed`` / ``lookup_original_dst`` / ``counters``, and always
    ``close()`` (or use it as a context manager). Without ``pin_dir``, close() detaches: cgroup
    attachments made by bcc outlive the process, and a leftover connect4 would keep redirecting
    pods to a proxy that is gone. With ``pin_dir``, that is the point: see the module docstring.
    ``shortcut`` switches the sockmap short-circuit (sock_hash + sk_msg) on or off.
    """

    def __init__(
        self,
        cgroup_path: str,
        proxy_ip: str,
        proxy_port: int,
        exempt_cgroup_paths: Sequence[str] = (),
        *,
        pin_dir: str | None = None,
        shortcut: bool = True,
        splice: bool = True,
        spread_ports: Sequence[int] = (),
    ) -> None:
        self.cgroup_path = cgroup_path
        self.proxy_ip = str(ipaddress.IPv4Address(proxy_ip))
        self.proxy_port = _check_port(proxy_port, allow_zero=False)
        # More outbound listener ports: connect4 spreads original destinations over all of them
        # (bpf/connect.c says why). The proxy must listen on each before load().
        self.spread_ports = tuple(_check_port(p, allow_zero=False) for p in spread_ports)
        if len(self.spread_ports) + 1 > PROXY_PORTS_MAX or self.proxy_port in self.spread_ports:
            raise ValueError(f"spread ports {self.spread_ports}: at most {PROXY_PORTS_MAX - 1}, none equal to {self.proxy_port}")
        self.exempt_cgroup_paths = tuple(exempt_cgroup_paths)
        self.pin_dir = pin_dir or None
        self.shortcut = shortcut
        self.splice_allowed = splice  # same-node kernel splice on (nm_settings[1]; see set_splice)
        self._bpf: Any = None  # bcc.BPF while this process holds the compiled module (load_here)
        self._maps: dict[str, BpfMap] = {}  # MAP_FORMATS names, open once loaded
        self._cgroup_fd: int | None = None
        self._attached: list[tuple[Any, int]] = []  # (BPF.Function, attach type), in attach order
        self.adopted_maps: list[str] = []  # pinned maps a previous agent left and this one reuses
        self.meshed_dropped = 0  # destinations of the last set_meshed that did not fit meshed_dsts
        self.splice_ready = False  # the splice verdict is attached (see splice())

    # -- lifecycle -------------------------------------------------------------------------

    def load(self) -> None:
        """Load, configure and attach the programs; BpfUnavailable says why not.

        Pinned: in a child process (agent/bpf_child.py), then the pinned maps are opened here, so
        this process never imports bcc. Unpinned: in this process (``load_here``)."""
        if self._maps or self._bpf is not None:
            raise RuntimeError("RedirectPrograms.load() called twice")
        self._preflight()
        if not self.pin_dir:
            self.load_here()
            return
        from nodemesh.agent import bpf_child  # lazy: it imports this module

        loaded = bpf_child.load_pinned(self)
        self.adopted_maps, self.splice_ready = loaded.adopted_maps, loaded.splice_ready
        maps_dir = os.path.join(self.pin_dir, "maps")
        try:
            for name, (key, value) in MAP_FORMATS.items():
                self._maps[name] = BpfMap.pinned(os.path.join(maps_dir, name), key, value)
        except (OSError, NodemeshError) as exc:
            self._teardown(raise_errors=False)
            with contextlib.suppress(NodemeshError):
                detach_all(self.cgroup_path)  # the child attached them: nothing may redirect to a proxy without maps
            raise BpfUnavailable(f"cannot open the pinned BPF maps in {maps_dir} the loader left: {exc}") from exc
        # (the child's "redirect programs attached" line was logged by load_pinned)

    def load_here(self) -> None:
        """Compile, load, configure and attach (and pin, with ``pin_dir``) in THIS process, with
        bcc. The agent does this only in its short-lived loader child."""
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
        b = self._compile(BPF, text, src_dir)

        self._bpf = b
        try:
            for name, (key, value) in MAP_FORMATS.items():
                self._maps[name] = BpfMap.from_fd(self._table_fd(name), key, value, name=name)
            self._cgroup_fd = os.open(self.cgroup_path, os.O_RDONLY | os.O_DIRECTORY)
            progs = []
            for name, prog_type, attach_name in CGROUP_PROGRAMS:
                attach_type = getattr(BPFAttachType, attach_name)
                kwargs = {"attach_type": attach_type} if prog_type == "CGROUP_SOCK_ADDR" else {}
                fn = _load_func(b, name, getattr(BPF, prog_type), **kwargs)
                progs.append((fn, attach_type))
            redirect = _load_func(b, SHORTCUT_PROGRAM, BPF.SK_MSG) if self.shortcut else None
            # Configure before attaching, so the very first connect already sees the proxy
            # address and the proxy's exemption (otherwise the proxy could redirect to itself).
            self._fill_config()
            if redirect is not None:
                BPF.attach_func(redirect, self._table_fd(SOCKHASH), BPFAttachType.SK_MSG_VERDICT)
            elif self.pin_dir:
                _detach_pinned_shortcut(self.pin_dir)  # a previous agent's, with the shortcut on
            for fn, attach_type in progs:
                # flags=0 (single program, replaced by the next attach): a restarted agent
                # replaces a crashed one's leftover program instead of running behind it (with
                # BPF_F_ALLOW_MULTI both would run and the stale one would redirect first).
                BPF.attach_func(fn, self._cgroup_fd, attach_type)
                self._attached.append((fn, attach_type))
            splice = self._load_splice(BPF, BPFAttachType)
            if self.pin_dir:
                self._pin_programs([fn for fn, _ in progs] + [f for f in (redirect, splice) if f is not None])
        except Exception as exc:
            self._teardown(raise_errors=False)
            if isinstance(exc, ProgramRejected):
                raise  # names the program and the verifier's message
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
        self._log_loaded()

    def _log_loaded(self) -> None:
        log.info(
            "redirect programs attached to %s, proxy %s:%d, %d exempt cgroup(s), shortcut %s, %s",
            self.cgroup_path, self.proxy_ip, self.proxy_port, len(self.exempt_cgroup_paths),
            "on" if self.shortcut else "off",
            f"pinned in {self.pin_dir} (adopted maps: {', '.join(self.adopted_maps) or 'none'})"
            if self.pin_dir else "not pinned",
        )

    def _compile(self, bpf_cls: Any, text: str, src_dir: str) -> Any:
        cflags = [f"-I{src_dir}"]
        maps_dir = None
        if self.pin_dir:
            maps_dir = os.path.join(self.pin_dir, "maps")
            os.makedirs(maps_dir, exist_ok=True)
            os.makedirs(os.path.join(self.pin_dir, "progs"), exist_ok=True)
            self.adopted_maps = sorted(os.listdir(maps_dir))
            cflags.append(f'-DNM_PIN_DIR="{maps_dir}"')
        try:
            return bpf_cls(text=text.encode(), cflags=cflags)
        except Exception as exc:
            if maps_dir and self.adopted_maps:
                # Pins of an older layout (a map's size or types changed) cannot be reused: start
                # over with fresh maps rather than refusing to run. Live redirected connections
                # keep working; only not-yet-looked-up original destinations are lost.
                log.warning("pinned maps in %s do not fit this agent's programs (%s); recreating them",
                            maps_dir, str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
                shutil.rmtree(maps_dir, ignore_errors=True)
                os.makedirs(maps_dir, exist_ok=True)
                self.adopted_maps = []
                try:
                    return bpf_cls(text=text.encode(), cflags=cflags)
                except Exception as exc2:
                    exc = exc2
            if not _kernel_headers_present():
                raise BpfUnavailable(
                    f"cannot compile the BPF programs: kernel headers for {os.uname().release} are "
                    f"missing; {_SETUP_HINT}"
                ) from exc
            raise BpfUnavailable(
                f"cannot compile the BPF programs in {src_dir} ({str(exc).splitlines()[0] if str(exc) else exc!r}); "
                f"check the kernel headers and bcc install, or {_SETUP_HINT}"
            ) from exc

    def _table_fd(self, name: str) -> int:
        """bcc's fd of a map of the compiled module (b["sock_hash"] fails: type 18 is unknown to bcc)."""
        from bcc.libbcc import lib

        fd = int(lib.bpf_table_fd(self._bpf.module, name.encode()))
        if fd < 0:
            raise BpfUnavailable(f"the {name} map is missing from the compiled module")
        return fd

    def _load_splice(self, bpf_cls: Any, attach_types: Any) -> Any:
        """The same-node splice verdict, optional: if this kernel refuses it, connections are
        relayed in user space as before (logged once), never a reason to leave BPF mode."""
        try:
            fn = _load_func(self._bpf, SPLICE_PROGRAM, bpf_cls.SK_SKB)
            bpf_cls.attach_func(fn, self._table_fd(SPLICE_HASH), attach_types.SK_SKB_STREAM_VERDICT)
        except Exception as exc:
            log.warning("same-node kernel splice unavailable (%s); relaying those connections in user space", exc)
            return None
        self.splice_ready = True
        return fn

    def _pin_programs(self, fns: Sequence[Any]) -> None:
        """Pin each program as <pin_dir>/progs/<name>, replacing a previous agent's pin."""
        assert self.pin_dir
        for fn in fns:
            path = os.path.join(self.pin_dir, "progs", fn.name.decode())
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            obj_pin(fn.fd, path)  # OSError names the path and the errno

    def close(self) -> None:
        """Let go of the programs. Unpinned: detach from the cgroup first. Idempotent."""
        if self.pin_dir:
            self._attached.clear()  # pinned: the attachments stay for the next agent
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
        table = self._map("meshed_dsts")
        wanted: set[tuple[int, int]] = set()
        for ip, port in dsts:
            wanted.add((_ip_net_u32(ip), socket.htons(_check_port(port, allow_zero=True))))
        self.meshed_dropped = max(0, len(wanted) - MESHED_CAPACITY)
        if self.meshed_dropped:
            # Map full: keep service VIP:ports first (port != 0), then pod IPs, in a stable order;
            # the rest are not redirected (inbound capture still catches pod IPs on their node).
            keep = sorted(wanted, key=lambda d: (d[1] == 0, d))[:MESHED_CAPACITY]
            log.error("%d meshed destinations exceed the meshed_dsts map (%d entries): %d are not redirected "
                      "(counted as nodemesh_bpf_meshed_dsts_dropped_total)", len(wanted), MESHED_CAPACITY, self.meshed_dropped)
            wanted = set(keep)

        present = {(ip4, port) for ip4, port, _pad in table.keys()}
        stale = present - wanted
        if len(present | wanted) > MESHED_CAPACITY:
            # Adding first would overflow the map: drop stale entries first instead.
            self._delete_meshed(table, stale)
            stale = set()
        for ip4, port in wanted - present:
            table.put((ip4, port, 0), 1)
        self._delete_meshed(table, stale)

    @staticmethod
    def _delete_meshed(table: BpfMap, entries: Iterable[tuple[int, int]]) -> None:
        for ip4, port in entries:
            table.delete((ip4, port, 0))

    # -- queries ---------------------------------------------------------------------------

    def lookup_original_dst(self, peer_ip: str, peer_port: int) -> tuple[str, int] | None:
        """The original destination of a redirected connection, from the accepted socket's
        getpeername(); None if it was not redirected. The entry is consumed (deleted)."""
        # port: host order, as sock_ops stored it
        leaf = self._map("orig_dst_by_tuple").pop((_ip_net_u32(peer_ip), _check_port(peer_port, allow_zero=False), 0))
        if leaf is None:
            return None
        return _ip_from_net_u32(leaf[0]), socket.ntohs(leaf[1])

    # -- same-node kernel splice ------------------------------------------------------------

    @staticmethod
    def sock_key(sock: socket.socket) -> SockKey:
        """A connected IPv4 TCP socket's key in splice_hash (its own address first)."""
        lip, lport = sock.getsockname()[:2]
        rip, rport = sock.getpeername()[:2]
        return SockKey(_ip_net_u32(lip), _ip_net_u32(rip), lport, rport)

    def splice(self, a: socket.socket, b: socket.socket) -> tuple[SockKey, SockKey]:
        """Hand two connected proxy sockets to the kernel: from now on bytes either receives go out
        of the other (bpf/splice.c). The caller must have relayed everything it read; data still
        queued on a socket is forwarded at once. agent/splice.py drains between the two steps."""
        keys = self.splice_partners(a, b)
        try:
            self.splice_commit(a, b)
        except OSError:
            self.unsplice(keys)
            raise
        return keys

    def splice_partners(self, a: socket.socket, b: socket.socket) -> tuple[SockKey, SockKey]:
        """Step 1: name each socket's partner (the sk_msg shortcut stops feeding their user-space
        queues, so every new byte arrives through TCP, where the verdict will see it)."""
        if not self.splice_ready:
            raise RuntimeError("the splice verdict is not attached")
        ka, kb = self.sock_key(a), self.sock_key(b)
        peers = self._map("splice_peer")
        peers.put(ka, kb)
        peers.put(kb, ka)
        return ka, kb

    def splice_commit(self, a: socket.socket, b: socket.socket) -> None:
        """Step 2: put both sockets into splice_hash; SO_RCVLOWAT wakes the verdict for data that
        arrived before (tcp_set_rcvlowat calls sk_data_ready), so nothing waits for a next packet."""
        hash_map = self._map(SPLICE_HASH)
        for sock in (a, b):
            hash_map.put(self.sock_key(sock), sock.fileno())  # OSError names the map and the errno
        for sock in (a, b):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)

    def shortcut_enabled(self) -> bool:
        """nm_settings[0]: whether sock_ops puts new pod<->proxy sockets into sock_hash."""
        return bool(self._map("nm_settings").get(0))

    def splice_bytes(self, key: SockKey) -> int:
        """Bytes the verdict forwarded from the socket `key` to its partner so far."""
        return int(self._map("splice_bytes").get(key) or 0)

    def unsplice(self, keys: Iterable[SockKey]) -> None:
        """Forget a spliced pair (its sockets leave splice_hash when they close)."""
        keys = list(keys)
        for name in ("splice_peer", "splice_bytes"):
            table = self._map(name)
            for key in keys:
                table.delete(key)

    def counters(self) -> dict[str, int]:
        """Totals over all CPUs of the per-program counters (COUNTER_NAMES)."""
        table = self._map("nm_counters")
        counts = {name: sum(table.get(i) or ()) for i, name in enumerate(COUNTER_NAMES)}
        counts["meshed_dsts_dropped"] = self.meshed_dropped  # user space: destinations the map could not hold
        return counts

    def set_splice(self, enabled: bool) -> None:
        """Whether the agent splices new same-node L4 connections (pinned nm_settings[1], so a
        bench can switch it at run time with bpftool; read by agent/splice.py per connection)."""
        self._map("nm_settings").put(1, 1 if enabled else 0)

    def splice_enabled(self) -> bool:
        return self.splice_ready and bool(self._map("nm_settings").get(1))

    def set_shortcut(self, enabled: bool) -> None:
        """Whether sock_ops adds new pod<->proxy sockets to sock_hash (connections already in it
        keep their shortcut until they close). Without the sk_msg program attached (loaded with
        shortcut=False) sockets in sock_hash just take the TCP path."""
        self._map("nm_settings").put(0, 1 if enabled else 0)

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
        proxy = self._map("proxy_addr")
        ports = (self.proxy_port, *self.spread_ports)
        for slot in range(PROXY_PORTS_MAX):  # unused slots zeroed: adopted pins may hold more ports
            port = ports[slot] if slot < len(ports) else 0
            proxy.put(slot, (_ip_net_u32(self.proxy_ip) if port else 0, socket.htons(port), 0))
        self._map("nm_settings").put(SET_PROXY_PORTS, len(ports))
        exempt = self._map("exempt_cgroups")
        exempt.clear()  # adopted pins may hold a previous agent's cgroup ids
        for path in self.exempt_cgroup_paths:
            exempt.put(cgroup_id(path), 1)
        self.set_shortcut(self.shortcut)
        self.set_splice(self.splice_allowed)

    def _map(self, name: str) -> BpfMap:
        try:
            return self._maps[name]
        except KeyError:
            raise RuntimeError("RedirectPrograms is not loaded: call load() first") from None

    def _teardown(self, *, raise_errors: bool) -> None:
        errors: list[str] = []
        b, self._bpf = self._bpf, None
        maps, self._maps = self._maps, {}
        for m in maps.values():
            m.close()
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
