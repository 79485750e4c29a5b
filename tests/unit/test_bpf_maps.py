"""agent/bpf_maps.py against real kernel maps (BPF_MAP_CREATE here; root only)."""

from __future__ import annotations

import errno
import os
import uuid
from collections.abc import Iterator

import pytest

from nodemesh.agent import bpf_maps
from nodemesh.agent.bpf_maps import BPF_NOEXIST, BpfMap, BpfMapError
from tests.e2e.labtools import requires_root

pytestmark = requires_root

ADDR = "=IHH"  # struct nm_addr4: ip4, port, _pad


@pytest.fixture
def hash_map() -> Iterator[BpfMap]:
    fd = bpf_maps.create_map(bpf_maps.MAP_TYPE_HASH, 8, 8, 16, "nmt_hash")
    with BpfMap(fd, ADDR, "=IHH") as m:
        yield m


def test_put_get_delete_keys_round_trip(hash_map: BpfMap) -> None:
    assert hash_map.get((1, 2, 0)) is None
    hash_map.put((0x0100000A, 80, 0), (0x0200000A, 8080, 0))
    hash_map.put((0x0100000A, 81, 0), (0x0300000A, 9090, 0))
    assert hash_map.get((0x0100000A, 80, 0)) == (0x0200000A, 8080, 0)
    assert sorted(hash_map.keys()) == [(0x0100000A, 80, 0), (0x0100000A, 81, 0)]
    assert hash_map.pop((0x0100000A, 80, 0)) == (0x0200000A, 8080, 0)
    assert hash_map.pop((0x0100000A, 80, 0)) is None  # consumed
    assert hash_map.delete((0x0100000A, 81, 0)) is True
    assert hash_map.delete((0x0100000A, 81, 0)) is False
    assert hash_map.keys() == []
    assert hash_map.info.type == bpf_maps.MAP_TYPE_HASH and hash_map.info.max_entries == 16
    assert hash_map.name == "nmt_hash"


def test_errors_name_the_command_the_map_and_the_errno(hash_map: BpfMap) -> None:
    hash_map.put((1, 1, 0), (1, 1, 0))
    with pytest.raises(OSError) as info:
        hash_map.put((1, 1, 0), (2, 2, 0), BPF_NOEXIST)
    assert info.value.errno == errno.EEXIST
    assert "BPF_MAP_UPDATE_ELEM" in str(info.value) and "nmt_hash" in str(info.value) and "EEXIST" in str(info.value)
    for i in range(2, 17):
        hash_map.put((i, 1, 0), (0, 0, 0))
    with pytest.raises(OSError) as info:  # 16 entries: full
        hash_map.put((99, 1, 0), (0, 0, 0))
    assert info.value.errno == errno.E2BIG and "E2BIG" in str(info.value)
    hash_map.clear()
    assert hash_map.keys() == []
    with pytest.raises(OSError) as info:
        bpf_maps.obj_get("/sys/fs/bpf/nmt-no-such-pin")
    assert info.value.errno == errno.ENOENT and "BPF_OBJ_GET" in str(info.value) and "nmt-no-such-pin" in str(info.value)


def test_wrong_layout_is_refused_at_open_and_the_fd_closed() -> None:
    fd = bpf_maps.create_map(bpf_maps.MAP_TYPE_HASH, 8, 8, 4, "nmt_layout")
    with pytest.raises(BpfMapError) as info:
        BpfMap(fd, "=IIII", "=Q")
    assert "8-byte keys" in str(info.value) and "expects 16" in str(info.value)
    with pytest.raises(OSError):
        os.fstat(fd)  # closed: no fd leak per failed open


def test_per_cpu_array_has_one_value_per_possible_cpu() -> None:
    ncpu = bpf_maps.possible_cpus()
    assert ncpu == os.cpu_count() or ncpu >= (os.cpu_count() or 1)
    fd = bpf_maps.create_map(bpf_maps.MAP_TYPE_PERCPU_ARRAY, 4, 4, 2, "nmt_percpu")  # 4-byte values: 8-byte stride
    with BpfMap(fd, "=i", "=I") as m:
        assert m.percpu and m.get(0) == [0] * ncpu
        m.put(1, list(range(7, 7 + ncpu)))
        assert m.get(1) == list(range(7, 7 + ncpu))
        assert m.get(0) == [0] * ncpu  # the neighbouring slot is untouched (stride right)
        with pytest.raises(ValueError):
            m.put(1, [1])
        assert sorted(m.keys()) == [0, 1]


def test_pinned_map_reopens_with_its_state_and_from_fd_owns_a_duplicate() -> None:
    path = f"/sys/fs/bpf/nmt-bpf-maps-{uuid.uuid4().hex[:8]}"
    fd = bpf_maps.create_map(bpf_maps.MAP_TYPE_ARRAY, 4, 8, 4, "nmt_pinned")
    try:
        with BpfMap.from_fd(fd, "=i", "=Q") as first:
            first.put(3, 2**40 + 5)
            bpf_maps.obj_pin(first.fd, path)
        os.fstat(fd)  # from_fd duplicated: closing the BpfMap left the original open
        with BpfMap.pinned(path, "=i", "=Q") as again:
            assert again.get(3) == 2**40 + 5 and again.name == os.path.basename(path)
            assert again.info.id == bpf_maps.map_info(fd).id  # the same kernel map
    finally:
        os.close(fd)
        if os.path.exists(path):
            os.unlink(path)


def test_pop_is_one_kernel_call_or_falls_back_and_a_closed_map_refuses() -> None:
    fd = bpf_maps.create_map(bpf_maps.MAP_TYPE_LRU_HASH, 8, 8, 64, "nmt_lru")
    m = BpfMap(fd, ADDR, ADDR)
    m.put((1, 2, 0), (3, 4, 0))
    assert m.pop((1, 2, 0)) == (3, 4, 0) and m.get((1, 2, 0)) is None
    m._pop_in_kernel = False  # what an older kernel (no LOOKUP_AND_DELETE on hashes) leaves
    m.put((1, 2, 0), (5, 6, 0))
    assert m.pop((1, 2, 0)) == (5, 6, 0) and m.pop((1, 2, 0)) is None
    m.close()
    m.close()  # idempotent
    with pytest.raises(ValueError, match="closed"):
        m.get((1, 2, 0))
