"""bench/: measures nodemesh against direct traffic, a sidecar-pair mesh model and single-proxy peers.

`nodemesh bench` (or `make bench`) brings up the bench lab, runs every scenario x workload in one
run (so ratios are comparable on a noisy machine) and writes results.json, results.md and plots.
"""
