"""Typed access to BPF maps through the bpf(2) syscall (ctypes over libc), no bcc.

The node proxy reads and writes its maps with this module only, so it never imports bcc (which
maps libbcc, libLLVM and libclang: measured in the lab, an agent's RSS 165 MiB with them, 49 MiB
without; see agent/bpf_child.py): a map is opened from a pinned path
(``BpfMap.pinned``) or from a file descriptor another loader holds (``BpfMap.from_fd``, which dups
it). Keys and values are ``struct`` formats; a one-field format reads and writes plain ints, a
longer one tuples. Per-CPU maps read one value per possible CPU (each rounded up to 8 bytes, as
the kernel lays them out). Opening checks the map's key and value sizes against the formats, so a
layout mismatch is an error at open, not garbage at run time.

x86_64 only (``__NR_bpf`` = 321), like the rest of the node agent. Each call holds a per-map lock:
the key/value/attr buffers are reused and the syscall releases the GIL.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
import threading
from functools import lru_cache
from typing import Any, NamedTuple

from nodemesh.errors import NodemeshError

NR_BPF = 321  # x86_64

# enum bpf_cmd (include/uapi/linux/bpf.h)
BPF_MAP_CREATE = 0
BPF_MAP_LOOKUP_ELEM = 1
BPF_MAP_UPDATE_ELEM = 2
BPF_MAP_DELETE_ELEM = 3
BPF_MAP_GET_NEXT_KEY = 4
BPF_OBJ_PIN = 6
BPF_OBJ_GET = 7
BPF_OBJ_GET_INFO_BY_FD = 15
BPF_MAP_LOOKUP_AND_DELETE_ELEM = 21  # hash maps: kernel 5.14+

_CMD_NAMES = {BPF_MAP_CREATE: "BPF_MAP_CREATE", BPF_MAP_LOOKUP_ELEM: "BPF_MAP_LOOKUP_ELEM",
              BPF_MAP_UPDATE_ELEM: "BPF_MAP_UPDATE_ELEM", BPF_MAP_DELETE_ELEM: "BPF_MAP_DELETE_ELEM",
              BPF_MAP_GET_NEXT_KEY: "BPF_MAP_GET_NEXT_KEY", BPF_OBJ_PIN: "BPF_OBJ_PIN", BPF_OBJ_GET: "BPF_OBJ_GET",
              BPF_OBJ_GET_INFO_BY_FD: "BPF_OBJ_GET_INFO_BY_FD", BPF_MAP_LOOKUP_AND_DELETE_ELEM: "BPF_MAP_LOOKUP_AND_DELETE_ELEM"}
_ENOTSUPP = 524  # kernel-internal "not supported", what an old kernel answers LOOKUP_AND_DELETE on a hash

# enum bpf_map_type, the ones nodemesh uses
MAP_TYPE_HASH = 1
MAP_TYPE_ARRAY = 2
MAP_TYPE_PERCPU_HASH = 5
MAP_TYPE_PERCPU_ARRAY = 6
MAP_TYPE_LRU_HASH = 9
MAP_TYPE_LRU_PERCPU_HASH = 10
MAP_TYPE_SOCKHASH = 18
_PERCPU = {MAP_TYPE_PERCPU_HASH, MAP_TYPE_PERCPU_ARRAY, MAP_TYPE_LRU_PERCPU_HASH}

BPF_ANY = 0
BPF_NOEXIST = 1
BPF_EXIST = 2

_FLAGS = struct.Struct("=Q")
_FLAGS_OFFSET = 24  # of the flags field in the map element commands' bpf_attr
_ATTR_SIZE = 128  # larger than every command's part of union bpf_attr; the kernel wants zeros past its size
_INFO_SIZE = 88  # struct bpf_map_info up to and including map_extra (kernel 5.16+); older kernels read less


class MapInfo(NamedTuple):
    """The head of struct bpf_map_info."""

    type: int
    id: int
    key_size: int
    value_size: int
    max_entries: int
    flags: int
    name: str


class BpfMapError(NodemeshError):
    """A map cannot be opened or does not have the layout its user expects."""


@lru_cache(maxsize=1)
def _libc() -> Any:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    return libc


def _errno_text(err: int) -> str:
    return f"{errno.errorcode.get(err, str(err))} ({os.strerror(err)})"


def bpf(cmd: int, attr: ctypes.Array[ctypes.c_char], what: str = "") -> int:
    """One bpf(2) call with ``attr`` (a zeroed _ATTR_SIZE buffer); OSError names the command and errno."""
    rc = _libc().syscall(NR_BPF, cmd, attr, _ATTR_SIZE)
    if rc < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"bpf({_CMD_NAMES.get(cmd, cmd)}){' on ' + what if what else ''}: {_errno_text(err)}")
    return int(rc)


def _attr() -> ctypes.Array[ctypes.c_char]:
    return ctypes.create_string_buffer(_ATTR_SIZE)


def _path_attr(path: str, fd: int) -> tuple[ctypes.Array[ctypes.c_char], ctypes.Array[ctypes.c_char]]:
    raw = os.fsencode(path) + b"\0"
    buf = ctypes.create_string_buffer(raw, len(raw))
    attr = _attr()
    struct.pack_into("=QII", attr, 0, ctypes.addressof(buf), fd, 0)  # pathname, bpf_fd, file_flags
    return attr, buf  # keep buf alive for the call


def obj_get(path: str) -> int:
    """A new fd for the object pinned at ``path`` (BPF_OBJ_GET)."""
    attr, _buf = _path_attr(path, 0)
    return bpf(BPF_OBJ_GET, attr, path)


def obj_pin(fd: int, path: str) -> None:
    """Pin the map or program behind ``fd`` at ``path`` in bpffs (BPF_OBJ_PIN)."""
    attr, _buf = _path_attr(path, fd)
    bpf(BPF_OBJ_PIN, attr, path)


def map_info(fd: int) -> MapInfo:
    """type, id, key/value sizes, max_entries, flags and name of the map behind ``fd``."""
    info = ctypes.create_string_buffer(_INFO_SIZE)
    attr = _attr()
    struct.pack_into("=IIQ", attr, 0, fd, _INFO_SIZE, ctypes.addressof(info))  # bpf_fd, info_len, info
    bpf(BPF_OBJ_GET_INFO_BY_FD, attr, f"fd {fd}")
    t, i, ks, vs, me, fl, name = struct.unpack_from("=IIIIII16s", info)
    return MapInfo(t, i, ks, vs, me, fl, name.split(b"\0", 1)[0].decode(errors="replace"))


def create_map(map_type: int, key_size: int, value_size: int, max_entries: int, name: str = "") -> int:
    """BPF_MAP_CREATE: a new map's fd (tests, and bpf syscall probes)."""
    attr = _attr()
    struct.pack_into("=IIIIIII16s", attr, 0, map_type, key_size, value_size, max_entries, 0, 0, 0, name.encode()[:15])
    return bpf(BPF_MAP_CREATE, attr, name or "a new map")


@lru_cache(maxsize=1)
def possible_cpus() -> int:
    """How many values a per-CPU map holds per key: /sys/devices/system/cpu/possible ("0-3,5")."""
    with open("/sys/devices/system/cpu/possible", encoding="ascii") as f:
        text = f.read().strip()
    last = 0
    for part in text.split(","):
        last = max(last, int(part.split("-")[-1]))
    return last + 1


class BpfMap:
    """One open BPF map with typed keys and values; owns its fd (``close()``)."""

    def __init__(self, fd: int, key_format: str, value_format: str, *, name: str = "") -> None:
        self._fd: int | None = fd
        try:
            self.info = map_info(fd)
        except OSError:
            os.close(fd)
            raise
        self.name = name or self.info.name
        self._key = struct.Struct(key_format)
        self._value = struct.Struct(value_format)
        self.percpu = self.info.type in _PERCPU
        self._ncpu = possible_cpus() if self.percpu else 1
        self._stride = (self._value.size + 7) & ~7 if self.percpu else self._value.size
        if (self._key.size, self._value.size) != (self.info.key_size, self.info.value_size):
            os.close(fd)
            self._fd = None
            raise BpfMapError(
                f"BPF map {self.name} has {self.info.key_size}-byte keys and {self.info.value_size}-byte values, "
                f"this code expects {self._key.size} and {self._value.size}: agent and BPF programs are from different versions"
            )
        self._scalar_key = len(self._key.unpack(bytes(self._key.size))) == 1
        self._scalar_value = len(self._value.unpack(bytes(self._value.size))) == 1
        # Reused buffers and one prebuilt bpf_attr per operation: a lookup is one pack_into, one
        # syscall, one unpack_from (the per-connection lookup_original_dst is on the accept path).
        self._kbuf = ctypes.create_string_buffer(self._key.size)
        self._kbuf2 = ctypes.create_string_buffer(self._key.size)  # next key (iteration)
        self._vbuf = ctypes.create_string_buffer(self._stride * self._ncpu)
        self._a_kv = self._op_attr(self._kbuf, self._vbuf)  # lookup, update (flags set per call), lookup+delete
        self._a_k = self._op_attr(self._kbuf, None)  # delete
        self._a_first = self._op_attr(None, self._kbuf2)  # first key
        self._a_next = self._op_attr(self._kbuf, self._kbuf2)  # key after _kbuf
        self._pop_in_kernel = not self.percpu  # BPF_MAP_LOOKUP_AND_DELETE_ELEM, until the kernel says no
        self._syscall = _libc().syscall
        self._lock = threading.Lock()

    @classmethod
    def pinned(cls, path: str, key_format: str, value_format: str) -> BpfMap:
        """Open the map pinned at ``path`` (BPF_OBJ_GET)."""
        return cls(obj_get(path), key_format, value_format, name=os.path.basename(path))

    @classmethod
    def from_fd(cls, fd: int, key_format: str, value_format: str, *, name: str = "") -> BpfMap:
        """Open a map another owner holds by fd; this object gets its own duplicate."""
        return cls(os.dup(fd), key_format, value_format, name=name)

    @property
    def fd(self) -> int:
        if self._fd is None:
            raise ValueError(f"BPF map {self.name} is closed")
        return self._fd

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def __enter__(self) -> BpfMap:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- typed operations --------------------------------------------------------------------

    def get(self, key: Any) -> Any:
        """The value at ``key`` or None; per-CPU maps: a list with one value per possible CPU."""
        with self._lock:
            self._pack_key(self._kbuf, key)
            if not self._call(BPF_MAP_LOOKUP_ELEM, self._a_kv, missing_ok=True):
                return None
            if self.percpu:
                return [self._unpack_value(self._vbuf, i * self._stride) for i in range(self._ncpu)]
            return self._unpack_value(self._vbuf, 0)

    def put(self, key: Any, value: Any, flags: int = BPF_ANY) -> None:
        """Create or replace (``flags``: BPF_ANY, BPF_NOEXIST, BPF_EXIST). Per-CPU maps want a
        sequence of possible_cpus() values."""
        with self._lock:
            self._pack_key(self._kbuf, key)
            if self.percpu:
                values = list(value)
                if len(values) != self._ncpu:
                    raise ValueError(f"per-CPU map {self.name} needs {self._ncpu} values, got {len(values)}")
                for i, v in enumerate(values):
                    self._pack_value(self._vbuf, i * self._stride, v)
            else:
                self._pack_value(self._vbuf, 0, value)
            _FLAGS.pack_into(self._a_kv, _FLAGS_OFFSET, flags)
            try:
                self._call(BPF_MAP_UPDATE_ELEM, self._a_kv)
            finally:
                _FLAGS.pack_into(self._a_kv, _FLAGS_OFFSET, 0)  # lookups share this attr

    def delete(self, key: Any) -> bool:
        """Remove ``key``; False if it was not there."""
        with self._lock:
            self._pack_key(self._kbuf, key)
            return self._call(BPF_MAP_DELETE_ELEM, self._a_k, missing_ok=True)

    def pop(self, key: Any) -> Any:
        """Remove ``key`` and return its value, or None: one atomic syscall on kernels that have
        BPF_MAP_LOOKUP_AND_DELETE_ELEM for this map type, else get() then delete()."""
        if self._pop_in_kernel:
            with self._lock:
                self._pack_key(self._kbuf, key)
                try:
                    if not self._call(BPF_MAP_LOOKUP_AND_DELETE_ELEM, self._a_kv, missing_ok=True):
                        return None
                    return self._unpack_value(self._vbuf, 0)
                except OSError as exc:
                    if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP, _ENOTSUPP):
                        raise
                    self._pop_in_kernel = False  # this kernel / map type: two calls from now on
        value = self.get(key)
        if value is not None:
            self.delete(key)  # an LRU may have evicted it meanwhile: the value read stands
        return value

    def keys(self) -> list[Any]:
        """Every key, at one moment's best (a map changing meanwhile may skip or repeat one)."""
        out: list[Any] = []
        with self._lock:
            found = self._call(BPF_MAP_GET_NEXT_KEY, self._a_first, missing_ok=True)
            while found:
                raw = self._kbuf2.raw
                out.append(self._unpack(self._key, raw, 0, self._scalar_key))
                ctypes.memmove(self._kbuf, raw, len(raw))
                found = self._call(BPF_MAP_GET_NEXT_KEY, self._a_next, missing_ok=True)
        return out

    def clear(self) -> None:
        """Delete every key (hash maps; array slots cannot be deleted)."""
        for key in self.keys():
            self.delete(key)

    # -- internals ---------------------------------------------------------------------------

    def _op_attr(self, key: Any, value: Any) -> ctypes.Array[ctypes.c_char]:
        """bpf_attr for the map element commands: map_fd, pad, key, value/next_key, flags."""
        attr = _attr()
        struct.pack_into("=IIQQQ", attr, 0, self._fd, 0, ctypes.addressof(key) if key is not None else 0,
                         ctypes.addressof(value) if value is not None else 0, 0)
        return attr

    def _call(self, cmd: int, attr: Any, *, missing_ok: bool = False) -> bool:
        if self._fd is None:  # the attrs hold the fd number, which may be reused after close()
            raise ValueError(f"BPF map {self.name} is closed")
        if self._syscall(NR_BPF, cmd, attr, _ATTR_SIZE) == 0:
            return True
        err = ctypes.get_errno()
        if missing_ok and err == errno.ENOENT:
            return False
        raise OSError(err, f"bpf({_CMD_NAMES[cmd]}) on map {self.name}: {_errno_text(err)}")

    def _pack_key(self, buf: Any, key: Any) -> None:
        if self._scalar_key:
            self._key.pack_into(buf, 0, key)
        else:
            self._key.pack_into(buf, 0, *key)

    def _pack_value(self, buf: Any, offset: int, value: Any) -> None:
        if self._scalar_value:
            self._value.pack_into(buf, offset, value)
        else:
            self._value.pack_into(buf, offset, *value)

    def _unpack_value(self, buf: Any, offset: int) -> Any:
        return self._unpack(self._value, buf, offset, self._scalar_value)

    @staticmethod
    def _unpack(fmt: struct.Struct, buf: Any, offset: int, scalar: bool) -> Any:
        fields = fmt.unpack_from(buf, offset)
        return fields[0] if scalar else fields
