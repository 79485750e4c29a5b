"""Sockmap shortcut on vs off, same run, on the running lab (issue 7's bench note).

    NODEMESH_LAB_INSTANCE=k nodemesh lab up
    NODEMESH_LAB_INSTANCE=k python -m bench.bpf_shortcut [--rounds 6] [--count 2000]

The client pod sends `count` keep-alive GETs to the hello service through node1's proxy; the
shortcut is switched between rounds through the pinned nm_settings map (new connections only, which
is every round: each round is a new client process), alternating on/off so drift hits both sides.
Prints the median p50 latency and request rate of each side and their ratios as JSON. Ratios only:
this VM's run-to-run noise is large (EBPF-NOTES.md); never assert them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time

from bench.stats import median, ratio
from nodemesh.lab import lab
from nodemesh.lab.topology import BPF_PIN_ROOT

URL = "http://10.96.0.10/"


def set_shortcut(node: str, on: bool) -> None:
    path = os.path.join(BPF_PIN_ROOT, node, "maps", "nm_settings")
    subprocess.run(["bpftool", "map", "update", "pinned", path, "key", "0", "0", "0", "0",
                    "value", "1" if on else "0", "0", "0", "0"], check=True, capture_output=True)


def one_round(count: int) -> tuple[float, float]:
    t = time.monotonic()
    proc = lab.exec_in("client", ["nodemesh", "sample-client", URL, "--count", str(count)], capture=True, timeout=300)
    elapsed = time.monotonic() - t
    if proc.returncode != 0:
        raise SystemExit(f"sample-client failed: {proc.stderr.decode()[-500:]}")
    summary = json.loads(proc.stdout)
    return float(summary["latency_ms"]["p50"]), count / elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--count", type=int, default=2000)
    args = ap.parse_args()
    results: dict[bool, list[tuple[float, float]]] = {True: [], False: []}
    try:
        for i in range(args.rounds * 2):
            on = i % 2 == 0
            set_shortcut("node1", on)
            results[on].append(one_round(args.count))
    finally:
        set_shortcut("node1", True)
    out = {}
    for on, name in ((True, "shortcut_on"), (False, "shortcut_off")):
        out[name] = {"p50_ms": median([r[0] for r in results[on]]), "req_per_s": median([r[1] for r in results[on]])}
    out["ratio_p50_on_over_off"] = ratio(out["shortcut_on"]["p50_ms"], out["shortcut_off"]["p50_ms"])
    out["ratio_rate_on_over_off"] = ratio(out["shortcut_on"]["req_per_s"], out["shortcut_off"]["req_per_s"])
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
