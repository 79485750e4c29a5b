"""From raw samples to result rows: medians over repetitions, spread, proxy cost, ratios (pure)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from nodemesh.bench.parse import LoadResult
from nodemesh.bench.stats import median, ratio, spread

ROW_KEYS = (
    "name", "workload", "reps", "p50_us", "p99_us", "mean_us", "rps", "throughput_gbps", "errors",
    "proxy_cpu_us_per_req", "proxy_cpu_cores", "proxy_rss_kb", "proxy_pss_kb", "rps_per_proxy_core",
    "added_p50_us", "added_p99_us", "spread", "vs_direct", "vs_sidecar",
)
RATIO_KEYS = ("p50_us", "p99_us", "rps", "throughput_gbps", "proxy_cpu_us_per_req", "proxy_rss_kb", "proxy_pss_kb")


@dataclass(frozen=True)
class Sample:
    """One repetition of one (scenario, workload)."""

    load: LoadResult
    wall_s: float
    proxy_cpu_ns: int | None  # None: the scenario has no proxy
    proxy_rss_kb: int | None
    proxy_pss_kb: int | None = None


def _med(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return round(median(present), 3) if present else None


def _spread(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return round(spread(present), 3) if present else None


def summarize(name: str, workload: str, samples: Sequence[Sample]) -> dict[str, Any]:
    """One row without ratios (those need the other rows: see add_ratios)."""
    if not samples:
        raise ValueError(f"{name}/{workload}: no samples")
    loads = [s.load for s in samples]
    cpu_per_req, cpu_cores = [], []
    for s in samples:
        if s.proxy_cpu_ns is None:
            continue
        cpu_cores.append(s.proxy_cpu_ns / 1e9 / s.wall_s if s.wall_s > 0 else None)
        cpu_per_req.append(s.proxy_cpu_ns / 1e3 / s.load.requests if s.load.requests else None)
    rps = _med([l.rps for l in loads])
    cores = _med(cpu_cores)
    return {
        "name": name, "workload": workload, "reps": len(samples),
        "p50_us": _med([l.p50_us for l in loads]), "p99_us": _med([l.p99_us for l in loads]),
        "mean_us": _med([l.mean_us for l in loads]), "rps": rps,
        "throughput_gbps": _med([l.throughput_gbps for l in loads]),
        "errors": sum(l.errors for l in loads),
        "proxy_cpu_us_per_req": _med(cpu_per_req), "proxy_cpu_cores": cores,
        "proxy_rss_kb": _med([s.proxy_rss_kb for s in samples]),
        "proxy_pss_kb": _med([s.proxy_pss_kb for s in samples]),
        "rps_per_proxy_core": round(rps / cores, 1) if rps and cores else None,
        "added_p50_us": None, "added_p99_us": None,
        "spread": {"p50_us": _spread([l.p50_us for l in loads]), "rps": _spread([l.rps for l in loads]),
                   "throughput_gbps": _spread([l.throughput_gbps for l in loads])},
        "vs_direct": {}, "vs_sidecar": {},
    }


def add_ratios(rows: list[dict[str, Any]], baselines: Mapping[str, tuple[str, str]]) -> list[dict[str, Any]]:
    """Fills vs_direct / vs_sidecar (value / baseline value) and added latency over the direct floor.

    baselines: scenario name -> (its direct floor, its sidecar-pair model); a baseline that did
    not run leaves the ratios empty rather than comparing against another placement."""
    index = {(r["name"], r["workload"]): r for r in rows}
    for row in rows:
        direct_name, sidecar_name = baselines.get(row["name"], ("", ""))
        for key, base_name in (("vs_direct", direct_name), ("vs_sidecar", sidecar_name)):
            base = index.get((base_name, row["workload"]))
            row[key] = {k: ratio(row[k], base[k]) for k in RATIO_KEYS if base and ratio(row[k], base[k]) is not None}
        direct = index.get((direct_name, row["workload"]))
        if direct:
            for k in ("p50_us", "p99_us"):
                if row[k] is not None and direct[k] is not None:
                    row[f"added_{k}"] = round(row[k] - direct[k], 1)
    return rows


def check_shape(doc: Mapping[str, Any]) -> list[str]:
    """What is wrong with a results.json document (empty when its shape is right)."""
    problems = []
    if not isinstance(doc.get("meta"), dict):
        problems.append("no 'meta' object")
    rows = doc.get("rows")
    if not isinstance(rows, list) or not rows:
        return problems + ["no 'rows' list (or it is empty)"]
    for i, row in enumerate(rows):
        missing = [k for k in ROW_KEYS if k not in row]
        if missing:
            problems.append(f"row {i} ({row.get('name')}/{row.get('workload')}) lacks {', '.join(missing)}")
    return problems
