"""`nodemesh bench --quick` on one scenario, on the real lab: results.json has the expected shape,
the report and plots are written, the lab is gone afterwards. Never asserts the numbers."""

from __future__ import annotations

import json
import os

import pytest

from nodemesh.bench.results import ROW_KEYS, check_shape

from .labtools import cli, leftovers, requires_root

pytestmark = [pytest.mark.e2e, requires_root]

WORKLOADS = {"http-keepalive", "open-loop-1000", "http-new-conn", "h2", "bulk-tcp"}


def test_quick_bench_on_one_scenario_writes_results(tmp_path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "bench"
    proc = cli("bench", "--quick", "nodemesh-same-node", "--output", str(out), timeout=280)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == str(out)
    doc = json.loads((out / "results.json").read_text())
    assert check_shape(doc) == []
    rows = doc["rows"]
    assert all(set(ROW_KEYS) <= set(r) for r in rows)
    assert {r["workload"] for r in rows if r["name"] == "nodemesh-same-node"} >= WORKLOADS | {"pods-10"}
    assert {r["name"] for r in rows} == {"nodemesh-same-node", "sidecar-pair"}  # sidecars only in the pods rows
    assert all(r["errors"] == 0 for r in rows), [(r["name"], r["workload"], r["errors"]) for r in rows if r["errors"]]
    assert doc["meta"]["quick"] is True and any("Envoy" in n for n in doc["meta"]["notes"])
    for name in ("results.md", "latency.png", "throughput.png", "memory.png"):
        assert os.path.getsize(out / name) > 0, name
    assert leftovers() == []


def test_unknown_scenario_is_refused_before_anything_starts() -> None:
    proc = cli("bench", "--quick", "no-such-scenario")
    assert proc.returncode == 2
    assert "unknown scenario(s) no-such-scenario" in proc.stderr and "known: direct" in proc.stderr
