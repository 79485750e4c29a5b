"""Bench arithmetic: percentiles, spread, ratios, rows, the results.json shape, scenario selection,
open-loop scheduling and the Markdown report (pure)."""

from __future__ import annotations

import pytest

from nodemesh.bench import openloop, report, results, scenarios, stats
from nodemesh.bench.parse import LoadResult
from nodemesh.bench.results import Sample


def test_percentile_nearest_rank() -> None:
    values = list(range(1, 101))
    assert stats.percentile(values, 0.5) == 50 and stats.percentile(values, 0.99) == 99
    assert stats.percentile(values, 1.0) == 100 and stats.percentile([7], 0.99) == 7


@pytest.mark.parametrize("values, q, message", [([], 0.5, "no values"), ([1.0], 1.5, "outside")])
def test_percentile_rejects(values: list[float], q: float, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        stats.percentile(values, q)


def test_median_spread_ratio() -> None:
    assert stats.median([3, 1, 2]) == 2 and stats.median([1, 2, 3, 4]) == 2.5
    assert stats.spread([90, 100, 110]) == pytest.approx(0.2) and stats.spread([5]) == 0.0
    assert stats.ratio(150, 100) == 1.5 and stats.ratio(None, 1) is None and stats.ratio(1, 0) is None


def _sample(p50: float, rps: float, cpu_ns: int | None = None) -> Sample:
    load = LoadResult(requests=int(rps * 2), duration_s=2.0, rps=rps, errors=0, p50_us=p50, p99_us=p50 * 3)
    return Sample(load=load, wall_s=2.0, proxy_cpu_ns=cpu_ns, proxy_rss_kb=1000 if cpu_ns else None)


def test_summarize_takes_medians_and_proxy_cost() -> None:
    row = results.summarize("nodemesh-same-node", "http-keepalive",
                            [_sample(100, 1000, 10**9), _sample(120, 1200, 10**9), _sample(300, 800, 10**9)])
    assert row["reps"] == 3 and row["p50_us"] == 120 and row["rps"] == 1000
    assert row["proxy_cpu_cores"] == 0.5  # 1 CPU-second over 2 s
    assert row["rps_per_proxy_core"] == 2000.0
    assert row["spread"]["p50_us"] == pytest.approx(200 / 120, abs=1e-3)
    assert set(results.ROW_KEYS) <= set(row)


def test_summarize_refuses_no_samples() -> None:
    with pytest.raises(ValueError, match="no samples"):
        results.summarize("direct", "h2", [])


def test_ratios_against_the_same_placement() -> None:
    rows = [results.summarize(n, "w", [_sample(p, r, c)]) for n, p, r, c in (
        ("direct", 100, 4000, None), ("nodemesh-same-node", 150, 3000, 10**9), ("sidecar-pair", 300, 1500, 2 * 10**9))]
    results.add_ratios(rows, {"direct": ("direct", "sidecar-pair"), "nodemesh-same-node": ("direct", "sidecar-pair"),
                              "sidecar-pair": ("direct", "sidecar-pair")})
    mesh = rows[1]
    assert mesh["added_p50_us"] == 50 and mesh["vs_direct"]["p50_us"] == 1.5
    assert mesh["vs_sidecar"]["rps"] == 2.0 and mesh["vs_sidecar"]["proxy_cpu_us_per_req"] == 0.25  # 1 s/6000 req vs 2 s/3000 req
    lonely = [results.summarize("nodemesh-cross-node", "w", [_sample(1, 1)])]
    results.add_ratios(lonely, {"nodemesh-cross-node": ("direct-cross-node", "sidecar-pair-cross-node")})
    assert lonely[0]["vs_direct"] == {} and lonely[0]["added_p50_us"] is None  # no baseline ran: no ratio


def test_check_shape_names_what_is_missing() -> None:
    row = results.summarize("direct", "w", [_sample(1, 1)])
    assert results.check_shape({"meta": {}, "rows": [row]}) == []
    assert results.check_shape({"rows": []}) == ["no 'meta' object", "no 'rows' list (or it is empty)"]
    del row["p99_us"]
    assert results.check_shape({"meta": {}, "rows": [row]}) == ["row 0 (direct/w) lacks p99_us"]


def test_scenario_selection() -> None:
    assert [s.name for s in scenarios.select([])] == [s.name for s in scenarios.SCENARIOS]
    assert [s.name for s in scenarios.select(["nginx-hop", "direct"])] == ["direct", "nginx-hop"]  # canonical order
    with pytest.raises(ValueError, match="unknown scenario.*nope.*known: direct"):
        scenarios.select(["nope"])


def test_every_scenario_has_its_baselines() -> None:
    names = {s.name for s in scenarios.SCENARIOS}
    for s in scenarios.SCENARIOS:
        assert s.direct in names and s.sidecar in names, s.name


def test_open_loop_schedule_is_fixed_in_advance() -> None:
    plan = openloop.schedule(rate=4, duration_s=1, connections=2)
    assert plan == [[0.0, 0.5], [0.25, 0.75]]
    with pytest.raises(ValueError, match="must be positive"):
        openloop.schedule(0, 1, 1)


def test_open_loop_summary() -> None:
    r = openloop.summarize(100, 1.0, [float(i) for i in range(1, 101)], [0.0] * 100, errors=2, wall_s=1.0)
    assert (r.requests, r.p50_us, r.p99_us, r.max_us, r.errors, r.rps) == (100, 50.0, 99.0, 100.0, 2, 100.0)


def test_markdown_report() -> None:
    rows = [results.summarize(n, "http-keepalive", [_sample(p, 1000, c)]) for n, p, c in (("direct", 100, None), ("sidecar-pair", 300, 10**9))]
    results.add_ratios(rows, {"direct": ("direct", "sidecar-pair"), "sidecar-pair": ("direct", "sidecar-pair")})
    doc = {"meta": {"quick": True, "started": "now", "reps": 1, "seconds_per_run": 1, "elapsed_s": 1.0, "cpus": 2,
                    "notes": ["Envoy is not installable here"], "workloads": {"http-keepalive": "wrk"}, "scenarios": {"direct": "floor"}},
           "rows": rows}
    md = report.markdown(doc)
    assert "| direct | 1,000 | 100 |" in md and "Envoy is not installable" in md and "0.33×" in md
    assert "| sidecar-pair | 1,000 | 500.0 | 2,000 |" in report.headline(rows)
