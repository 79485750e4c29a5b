"""results.md (Markdown tables) and PNG plots from a results document."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

HEADLINE_WORKLOADS = ("http-keepalive", "open-loop-1000", "http-new-conn")


def _fmt(v: Any, digits: int = 0) -> str:
    if v is None:
        return "—"
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return f"{v:,.{digits}f}"
    return str(v)


def _mib(r: Mapping[str, Any]) -> str:
    if r.get("proxy_rss_kb") is None:
        return "—"
    return f"{r['proxy_rss_kb'] / 1024:.1f}/{_fmt((r.get('proxy_pss_kb') or 0) / 1024, 1)}"


def _x(v: float | None) -> str:
    return "—" if v is None else f"{v:.2f}×"


def table(rows: Sequence[Mapping[str, Any]], workload: str) -> str:
    """One Markdown table: every scenario for one workload."""
    picked = [r for r in rows if r["workload"] == workload]
    if not picked:
        return ""
    bulk = workload.startswith("bulk")
    head = ["scenario", "Gbit/s" if bulk else "req/s", "p50 µs", "p99 µs", "mean µs", "+p50 vs direct µs",
            "proxy CPU µs/req", "req/s per proxy core", "proxy RSS/PSS MiB", "p50 vs sidecar", "p99 vs sidecar",
            "rate vs sidecar", "spread p50/rate"]
    if bulk:
        head[6:8] = ["proxy CPU cores", "—"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in picked:
        vs = r.get("vs_sidecar") or {}
        sp = r.get("spread") or {}
        cells = [
            r["name"], _fmt(r["throughput_gbps"], 2) if bulk else _fmt(r["rps"]),
            _fmt(r["p50_us"]), _fmt(r["p99_us"]), _fmt(r["mean_us"]), _fmt(r["added_p50_us"]),
            _fmt(r["proxy_cpu_cores"], 2) if bulk else _fmt(r["proxy_cpu_us_per_req"], 1),
            "—" if bulk else _fmt(r["rps_per_proxy_core"]),
            _mib(r),
            _x(vs.get("p50_us")), _x(vs.get("p99_us")), _x(vs.get("throughput_gbps" if bulk else "rps")),
            f"{_fmt(sp.get('p50_us'), 2)}/{_fmt(sp.get('throughput_gbps' if bulk else 'rps'), 2)}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def headline(rows: Sequence[Mapping[str, Any]]) -> str:
    """One line per scenario across workloads: the numbers the README shows."""
    by = {(r["name"], r["workload"]): r for r in rows}
    names = list(dict.fromkeys(r["name"] for r in rows if not r["workload"].startswith("pods-")))
    if not names:
        return ""

    def get(name: str, wl: str, key: str, digits: int = 0) -> str:
        r = by.get((name, wl))
        return _fmt(r.get(key), digits) if r else "—"

    lines = ["| scenario | keep-alive req/s | proxy CPU µs/req | req/s per proxy core | p50 / p99 µs at 1000 req/s (open loop) "
             "| p50 vs sidecar | new conn/s | h2 req/s | bulk Gbit/s | proxy PSS MiB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for n in names:
        ol = by.get((n, "open-loop-1000")) or {}
        pss = by.get((n, "http-keepalive"), {}).get("proxy_pss_kb")
        lines.append(f"| {n} | {get(n, 'http-keepalive', 'rps')} | {get(n, 'http-keepalive', 'proxy_cpu_us_per_req', 1)} | "
                     f"{get(n, 'http-keepalive', 'rps_per_proxy_core')} | {_fmt(ol.get('p50_us'))} / {_fmt(ol.get('p99_us'))} | "
                     f"{_x((ol.get('vs_sidecar') or {}).get('p50_us'))} | {get(n, 'http-new-conn', 'rps')} | {get(n, 'h2', 'rps')} | "
                     f"{get(n, 'bulk-tcp', 'throughput_gbps', 2)} | {_fmt(pss / 1024, 1) if pss else '—'} |")
    return "\n".join(lines)


def pods_table(rows: Sequence[Mapping[str, Any]]) -> str:
    picked = sorted((r for r in rows if r["workload"].startswith("pods-")), key=lambda r: (int(r["workload"][5:]), r["name"]))
    if not picked:
        return ""
    lines = ["| pods on node1 | proxies | req/s (all pods) | proxy RSS MiB | proxy PSS MiB | proxy CPU µs/req | RSS vs sidecars | PSS vs sidecars | CPU/req vs sidecars |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in picked:
        vs = r.get("vs_sidecar") or {}
        who = "one node proxy" if r["name"].startswith("nodemesh") else "a sidecar per pod + server sidecar (summed)"
        lines.append(f"| {r['workload'][5:]} | {who} | {_fmt(r['rps'])} | {_fmt((r['proxy_rss_kb'] or 0) / 1024, 1)} | "
                     f"{_fmt((r.get('proxy_pss_kb') or 0) / 1024, 1)} | {_fmt(r['proxy_cpu_us_per_req'], 1)} | {_x(vs.get('proxy_rss_kb'))} | "
                     f"{_x(vs.get('proxy_pss_kb'))} | {_x(vs.get('proxy_cpu_us_per_req'))} |")
    return "\n".join(lines)


def markdown(doc: Mapping[str, Any]) -> str:
    meta, rows = doc["meta"], doc["rows"]
    parts = [f"# nodemesh bench ({'quick' if meta['quick'] else 'full'} run, {meta['started']})", "",
             f"{meta['reps']} repetition(s) of {meta['seconds_per_run']} s per scenario and workload, medians; "
             f"spread = (max-min)/median over repetitions. Took {meta['elapsed_s']} s on {meta['cpus']} CPUs; "
             f"code at {meta.get('git', 'unknown')}.", ""]
    parts += [f"- {n}" for n in meta["notes"]] + [""]
    if meta.get("failures"):
        parts += ["**Runs that failed (their rows are missing or have fewer repetitions):**", ""]
        parts += [f"- {f}" for f in meta["failures"]] + [""]
    parts += ["## Headline", "", headline(rows), ""]
    workloads = list(dict.fromkeys(r["workload"] for r in rows if not r["workload"].startswith("pods-")))
    for wl in workloads:
        parts += [f"## {wl}: {meta['workloads'].get(wl, '')}", "", table(rows, wl), ""]
    pt = pods_table(rows)
    if pt:
        parts += ["## Proxy cost with N pods on a node (each pod: one wrk connection to a same-node server)", "", pt, ""]
    parts += ["## Scenarios", ""] + [f"- **{k}**: {v}" for k, v in meta["scenarios"].items()] + [""]
    return "\n".join(parts)


def plots(doc: Mapping[str, Any], out: str) -> list[str]:
    """latency.png (p50/p99 per scenario, open loop at 1000 req/s or keep-alive), throughput.png,
    memory.png (proxy RSS vs pods per node). Returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = doc["rows"]
    written = []
    lat_wl = next((w for w in ("open-loop-1000", "http-keepalive") if any(r["workload"] == w for r in rows)), None)
    if lat_wl:
        picked = [r for r in rows if r["workload"] == lat_wl and r["p50_us"] is not None]
        fig, ax = plt.subplots(figsize=(9, 4.5))
        xs = range(len(picked))
        ax.bar([x - 0.2 for x in xs], [r["p50_us"] for r in picked], 0.4, label="p50")
        ax.bar([x + 0.2 for x in xs], [r["p99_us"] for r in picked], 0.4, label="p99")
        ax.set_xticks(list(xs), [r["name"] for r in picked], rotation=30, ha="right")
        ax.set_ylabel("latency (µs)")
        ax.set_yscale("log")
        ax.set_title(f"Latency per scenario ({lat_wl})")
        ax.legend()
        fig.tight_layout()
        written.append(os.path.join(out, "latency.png"))
        fig.savefig(written[-1], dpi=100)
        plt.close(fig)
    picked = [r for r in rows if r["workload"] == "http-keepalive"]
    if picked:
        fig, ax = plt.subplots(figsize=(9, 4.5))
        ax.bar([r["name"] for r in picked], [r["rps"] or 0 for r in picked], color="tab:green")
        ax.set_ylabel("req/s (wrk, 50 keep-alive connections)")
        ax.set_title("Throughput per scenario (HTTP/1.1 keep-alive)")
        plt.setp(ax.get_xticklabels(), rotation=30, ha="right")
        fig.tight_layout()
        written.append(os.path.join(out, "throughput.png"))
        fig.savefig(written[-1], dpi=100)
        plt.close(fig)
    pods = [r for r in rows if r["workload"].startswith("pods-")]
    if pods:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for name, label in (("nodemesh-same-node", "nodemesh: one node proxy"), ("sidecar-pair", "sidecars: summed per-pod haproxy")):
            pts = sorted((int(r["workload"][5:]), (r.get("proxy_pss_kb") or 0) / 1024) for r in pods if r["name"] == name)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        ax.set_xlabel("pods on the node")
        ax.set_ylabel("proxy memory, PSS (MiB)")
        ax.set_title("Proxy memory vs pods per node")
        ax.legend()
        fig.tight_layout()
        written.append(os.path.join(out, "memory.png"))
        fig.savefig(written[-1], dpi=100)
        plt.close(fig)
    return written


def write(doc: Mapping[str, Any], out: str) -> None:
    with open(os.path.join(out, "results.md"), "w", encoding="utf-8") as f:
        f.write(markdown(doc))
    plots(doc, out)


if __name__ == "__main__":  # re-render a results directory: python -m nodemesh.bench.report DIR
    import json
    import sys

    directory = sys.argv[1]
    with open(os.path.join(directory, "results.json"), encoding="utf-8") as f:
        write(json.load(f), directory)
