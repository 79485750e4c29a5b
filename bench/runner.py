"""Runs a bench: bench lab up, servers and proxies started and pinned, every scenario x workload
interleaved over repetitions, the pods-per-node memory comparison, then results written.

Everything runs inside the lab's pod network namespaces; the lab (and every process started
here, which lives in a pod cgroup) is torn down at the end, also on failure.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib.resources import files
from typing import IO, Any

from nodemesh.bench import configs, procstat, report, results
from nodemesh.bench.parse import LoadResult, ParseError
from nodemesh.bench.parse import wrk as parse_wrk
from nodemesh.bench.results import Sample
from nodemesh.bench.scenarios import Scenario, Target, select
from nodemesh.bench.tls import make_mesh_pki
from nodemesh.bench.workloads import PROXY_CPU, Workload, standard
from nodemesh.errors import NodemeshError
from nodemesh.lab import lab
from nodemesh.lab.topology import BPF_PIN_ROOT, INSTANCE

SIDECAR_USER = "haproxy"  # the Debian haproxy package's user; the client pod's iptables exempts it

NOTES = [
    "Sidecar-pair model: haproxy 2.6 stands in for Envoy / linkerd2-proxy, which are not installable here "
    "(neither is in Debian, PyPI or npm). The client sidecar is L7 for HTTP/1.1 with pooled TLS 1.3 mTLS "
    "upstream connections (as Linkerd/Envoy do), L4 over mTLS for h2c and bulk.",
    "The nodemesh rows measure the node proxy as built from the tree at meta.git (its protocol handling, L4 or L7, "
    "plaintext or mTLS between nodes, is whatever that revision does).",
    "Load generator pinned to CPU 0; every proxy and server to CPU 1. The machine is a shared 2-core VM "
    "where other work may run at the same time: only ratios within one run mean anything.",
    "h2load reports no percentiles: h2 rows have mean_us only. Open-loop latency counts from the scheduled send time.",
]


class BenchError(NodemeshError):
    """The bench cannot run or a load generator failed (the message names scenario and tool)."""


@dataclass(frozen=True)
class Plan:
    reps: int
    seconds: int
    warmup_seconds: int
    open_loop_rates: tuple[int, ...]
    pod_counts: tuple[int, ...]

    @staticmethod
    def quick() -> "Plan":
        return Plan(reps=1, seconds=1, warmup_seconds=1, open_loop_rates=(1000,), pod_counts=(10,))

    @staticmethod
    def full() -> "Plan":
        return Plan(reps=3, seconds=3, warmup_seconds=1, open_loop_rates=(200, 1000, 5000), pod_counts=(10, 50, 100))


def bench_lab_file() -> str:
    return str(files("nodemesh.bench") / "labs" / "bench.yaml")


def publish(out: str) -> str | None:
    """Copies a full run's results.json/.md and plots to bench/latest/ of the source checkout (what
    the README shows; bench/results/ itself is not tracked). Returns the directory, or None when
    not running from a checkout."""
    here = os.path.dirname(os.path.abspath(__file__))
    if not os.path.exists(os.path.join(here, "..", "pyproject.toml")):
        return None
    latest = os.path.join(here, "latest")
    os.makedirs(latest, exist_ok=True)
    for name in ("results.json", "results.md", "latency.png", "throughput.png", "memory.png"):
        if os.path.exists(os.path.join(out, name)):
            shutil.copyfile(os.path.join(out, name), os.path.join(latest, name))
    return latest


def default_output_dir() -> str:
    """bench/results/<timestamp> of the source checkout (or of the working directory when installed)."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    here = os.path.dirname(os.path.abspath(__file__))
    base = here if os.path.exists(os.path.join(here, "..", "pyproject.toml")) else os.path.join(os.getcwd(), "bench")
    return os.path.join(base, "results", stamp)


def _log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


@dataclass
class Env:
    """What the runner started: process groups (for CPU/RSS) by name, and where files go."""

    workdir: str
    groups: dict[str, list[int]] = field(default_factory=dict)
    logs: list[IO[Any]] = field(default_factory=list)
    client_tls: configs.TlsFiles | None = None  # the sidecar model's client cert, reused for new pods

    def pod_ip(self, ref: str) -> str:
        return lab.resolve_pod(ref)[1].ip

    def resolve(self, target: Target) -> tuple[str, int]:
        host = self.pod_ip(target.host[4:]) if target.host.startswith("pod:") else target.host
        return host, target.port

    def start(self, group: str, pod: str, argv: Sequence[str]) -> int:
        """Starts argv in the pod, pinned to the proxy CPU; the pid joins the named group."""
        log = open(os.path.join(self.workdir, f"{group.replace('/', '_')}-{len(self.logs)}.log"), "ab")
        self.logs.append(log)
        proc = lab.spawn_in(pod, ["taskset", "-c", str(PROXY_CPU), *argv], log=log)
        self.groups.setdefault(group, []).append(proc.pid)
        return proc.pid

    def write(self, name: str, text: str) -> str:
        path = os.path.join(self.workdir, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        return path

    def pids(self, groups: Sequence[str]) -> set[int]:
        return procstat.descendants(p for g in groups for p in self.groups.get(g, []))


def _in_pod(pod: str, argv: Sequence[str], timeout: float) -> str:
    try:
        proc = lab.exec_in(pod, list(argv), capture=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise BenchError(f"{argv[3] if len(argv) > 3 else argv[0]} in pod {pod} did not finish within {timeout:.0f} s") from None
    if proc.returncode != 0:
        raise BenchError(f"{' '.join(argv)} in pod {pod} exited {proc.returncode}: "
                         f"{(proc.stderr or proc.stdout).decode(errors='replace')[-400:]}")
    return proc.stdout.decode(errors="replace")


def _nginx_server(env: Env, pod: str) -> None:
    prefix = os.path.join(env.workdir, "nginx", pod.replace("/", "_"))
    os.makedirs(os.path.join(prefix, "tmp"), exist_ok=True)
    conf = env.write(os.path.join("nginx", pod.replace("/", "_"), "nginx.conf"), configs.nginx_server(prefix))
    env.start(f"server/{pod}", pod, ["nginx", "-c", conf, "-p", prefix])
    env.start(f"server/{pod}", pod, ["iperf3", "-s", "-p", str(configs.BULK_PORT)])


def _haproxy(env: Env, group: str, pod: str, text: str) -> None:
    prefix = os.path.join(env.workdir, "haproxy", group.replace("/", "_"))
    os.makedirs(prefix, exist_ok=True)
    conf = env.write(os.path.join("haproxy", group.replace("/", "_"), "haproxy.cfg"), text.replace("{prefix}", prefix))
    env.start(group, pod, ["haproxy", "-db", "-f", conf])


def _sidecar_client(env: Env, pod: str, server_pod: str, tls: configs.TlsFiles) -> None:
    server_ip = env.pod_ip(server_pod)
    prefix = os.path.join(env.workdir, "haproxy", f"sidecar_{pod.replace('/', '_')}")
    os.makedirs(prefix, exist_ok=True)
    _haproxy(env, f"sidecar/{pod.split('/')[1]}", pod, configs.haproxy_sidecar_client(prefix, server_ip, tls, SIDECAR_USER))
    for rule in configs.sidecar_client_iptables(server_ip, SIDECAR_USER):
        _in_pod(pod, rule, 10)


def start_servers(env: Env) -> None:
    """Every server and proxy of labs/bench.yaml (cheap, and the scenarios share them)."""
    for pod in ("bench/srv-1", "bench/srv-2", "plain/psrv-1", "plain/psrv-2", "plain/ssrv-1", "plain/ssrv-2"):
        _nginx_server(env, pod)
    upstream = env.pod_ip("plain/psrv-1")
    _haproxy(env, "hop/haproxy", "plain/hop", configs.haproxy_hop(os.path.join(env.workdir, "haproxy", "hop_haproxy"), upstream))
    prefix = os.path.join(env.workdir, "nginx", "hop")
    os.makedirs(os.path.join(prefix, "tmp"), exist_ok=True)
    conf = env.write("nginx/hop/nginx.conf", configs.nginx_hop(prefix, upstream))
    env.start("hop/nginx", "plain/hop", ["nginx", "-c", conf, "-p", prefix])
    client_tls, server_tls = make_mesh_pki(os.path.join(env.workdir, "pki"))
    for srv in ("plain/ssrv-1", "plain/ssrv-2"):
        prefix = os.path.join(env.workdir, "haproxy", f"sidecar_{srv.replace('/', '_')}")
        os.makedirs(prefix, exist_ok=True)
        _haproxy(env, f"sidecar/{srv.split('/')[1]}", srv, configs.haproxy_sidecar_server(prefix, server_tls, SIDECAR_USER))
        for rule in configs.sidecar_server_iptables():
            _in_pod(srv, rule, 10)
    _sidecar_client(env, "plain/scli-1", "plain/ssrv-1", client_tls)
    _sidecar_client(env, "plain/scli-2", "plain/ssrv-2", client_tls)
    env.client_tls = client_tls
    # The node proxies are the lab's agents: pin them beside the other proxies.
    state = lab.require_up()
    for key, proc in state.processes.items():
        if proc.get("role") == "agent":
            env.groups[key] = [int(proc["pid"])]
            procstat.pin(procstat.descendants([int(proc["pid"])]), PROXY_CPU)


def wait_reachable(env: Env, scenarios: Sequence[Scenario], timeout: float = 20.0) -> None:
    """Each scenario's HTTP target answers 200 through its whole path (or the bench stops, naming it)."""
    for sc in scenarios:
        host, port = env.resolve(sc.http)
        deadline = time.monotonic() + timeout
        last = ""
        while True:
            proc = lab.exec_in(sc.client, ["curl", "-s", "-o", "/dev/null", "-m", "2", "-w", "%{http_code}", f"http://{host}:{port}/"],
                               capture=True, timeout=10)
            last = proc.stdout.decode().strip() or proc.stderr.decode().strip()
            if last == "200":
                break
            if time.monotonic() > deadline:
                raise BenchError(f"scenario {sc.name}: http://{host}:{port}/ from pod {sc.client} does not answer 200 "
                                 f"(last: {last or 'no answer'}); logs in {env.workdir}")
            time.sleep(0.3)


def set_sockmap(on: bool) -> None:
    """Switches the sockmap shortcut on every lab node through its pinned nm_settings map (key 0;
    applies to new connections, and every workload run opens new ones)."""
    state = lab.require_up()
    for node in state.nodes:
        path = os.path.join(BPF_PIN_ROOT, node, "maps", "nm_settings")
        if not os.path.exists(path):
            raise BenchError(f"cannot switch the sockmap shortcut: {path} is missing (is the agent's BPF loaded?)")
        proc = subprocess.run(["bpftool", "map", "update", "pinned", path, "key", "0", "0", "0", "0",
                               "value", "1" if on else "0", "0", "0", "0"], capture_output=True, text=True)
        if proc.returncode != 0:
            raise BenchError(f"bpftool could not update {path}: {proc.stderr.strip()}")


def measure(env: Env, sc: Scenario, wl: Workload, seconds: int) -> Sample | None:
    target = getattr(sc, wl.protocol)
    if target is None:
        return None
    host, port = env.resolve(target)
    pids = env.pids(sc.proxies)
    cpu0 = procstat.cpu_ns(pids)
    t0 = time.monotonic()
    out = _in_pod(sc.client, wl.argv(host, port, seconds), timeout=seconds + 30)
    wall = time.monotonic() - t0
    cpu1 = procstat.cpu_ns(pids)
    try:
        load = wl.parse(out)
    except ParseError as exc:
        raise BenchError(f"scenario {sc.name}, workload {wl.name}: {exc}") from None
    return Sample(load=load, wall_s=wall, proxy_cpu_ns=(cpu1 - cpu0) if sc.proxies else None,
                  proxy_rss_kb=procstat.rss_kb(pids) if sc.proxies else None,
                  proxy_pss_kb=procstat.pss_kb(pids) if sc.proxies else None)


def _pods_yaml(ns: str, prefix: str, first: int, last: int) -> str:
    docs = [f"""apiVersion: v1
kind: Pod
metadata:
  name: {prefix}-{i}
  namespace: {ns}
spec:
  nodeName: node1
  containers:
    - name: main
      command: ["sleep", "infinity"]""" for i in range(first, last + 1)]
    return "\n---\n".join(docs) + "\n"


def pods_per_node(env: Env, counts: Sequence[int], seconds: int, progress: Callable[[str], None]) -> list[dict[str, Any]]:
    """Node-proxy cost vs summed sidecars as pods per node grow: every pod runs one wrk connection
    to a same-node server at once; CPU per request and resident memory of the proxies are compared."""
    rows = []
    have = 0
    for n in sorted(counts):
        progress(f"pods per node: {n} meshed pods and {n} sidecar pods on node1")
        env.write(f"pods/mesh-{n}.yaml", _pods_yaml("bench", "m", have + 1, n))
        env.write(f"pods/side-{n}.yaml", _pods_yaml("plain", "s", have + 1, n))
        lab.apply(os.path.join(env.workdir, f"pods/mesh-{n}.yaml"))
        lab.apply(os.path.join(env.workdir, f"pods/side-{n}.yaml"))
        for i in range(have + 1, n + 1):
            assert env.client_tls is not None
            _sidecar_client(env, f"plain/s-{i}", "plain/ssrv-1", env.client_tls)
        have = n
        ssrv_ip = env.pod_ip("plain/ssrv-1")
        for label, ns, prefix, url, groups in (
            ("nodemesh-same-node", "bench", "m", "http://10.96.1.1/", ["agent/node1"]),
            ("sidecar-pair", "plain", "s", f"http://{ssrv_ip}:{configs.HTTP_PORT}/",
             [f"sidecar/s-{i}" for i in range(1, n + 1)] + ["sidecar/ssrv-1"]),
        ):
            pids = env.pids(groups)
            cpu0 = procstat.cpu_ns(pids)
            t0 = time.monotonic()
            procs = []
            for i in range(1, n + 1):
                procs.append(lab.spawn_in(f"{ns}/{prefix}-{i}", ["taskset", "-c", "0", "wrk", "-t1", "-c1", f"-d{seconds}s", "--latency", url],
                                          log=subprocess.PIPE))
            time.sleep(seconds / 2)
            live = env.pids(groups)  # mid-run: every connection is open
            rss, pss = procstat.rss_kb(live), procstat.pss_kb(live)
            try:
                outputs = [p.communicate(timeout=seconds + 60)[0].decode(errors="replace") for p in procs]
            except subprocess.TimeoutExpired:
                for p in procs:
                    p.kill()
                raise BenchError(f"pods per node ({label}, {n} pods): a wrk did not finish within {seconds + 60} s") from None
            wall = time.monotonic() - t0
            cpu = procstat.cpu_ns(pids) - cpu0
            loads = []
            for out in outputs:
                try:
                    loads.append(parse_wrk(out))
                except ParseError as exc:
                    raise BenchError(f"pods per node ({label}, {n} pods): {exc}") from None
            total = LoadResult(requests=sum(l.requests for l in loads), duration_s=seconds, rps=sum(l.rps for l in loads),
                               errors=sum(l.errors for l in loads),
                               p50_us=sorted(l.p50_us or 0 for l in loads)[len(loads) // 2],
                               p99_us=max(l.p99_us or 0 for l in loads))
            row = results.summarize(label, f"pods-{n}", [Sample(load=total, wall_s=wall, proxy_cpu_ns=cpu, proxy_rss_kb=rss, proxy_pss_kb=pss)])
            rows.append(row)
    return rows


def _git_revision() -> str:
    """The measured code: `git describe --always --dirty` of the source tree, or 'unknown'."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        proc = subprocess.run(["git", "-C", here, "describe", "--always", "--dirty"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return proc.stdout.strip() or "unknown"


def run(names: Sequence[str] = (), quick: bool = False, output: str | None = None, pods: bool = True) -> str:
    """Runs the bench and returns the directory holding results.json, results.md and the plots."""
    scenarios = select(list(names))
    plan = Plan.quick() if quick else Plan.full()
    out = os.path.abspath(output or default_output_dir())
    workdir = os.path.join(out, "run")
    os.makedirs(workdir, exist_ok=True)
    workloads = standard(plan.open_loop_rates)
    started = time.monotonic()
    _log(f"{len(scenarios)} scenarios x {len(workloads)} workloads x {plan.reps} reps; lab instance {INSTANCE}; output {out}")
    lab.down()
    os.environ.setdefault("NODEMESH_LAB_SOCKMAP", "1")  # scenarios switch the shortcut at run time: attach it
    lab.up(bench_lab_file())
    env = Env(workdir=workdir)
    samples: dict[tuple[str, str], list[Sample]] = {}
    pod_rows: list[dict[str, Any]] = []
    failures: list[str] = []
    try:
        start_servers(env)
        wait_reachable(env, scenarios)
        for sc in scenarios:  # warm-up: connection pools, TLS session caches, allocator
            host, port = env.resolve(sc.http)
            _in_pod(sc.client, ["wrk", "-t1", "-c10", f"-d{plan.warmup_seconds}s", f"http://{host}:{port}/"], timeout=30)
        for rep in range(plan.reps):  # repetitions interleaved, so slow drifts hit every scenario alike
            for sc in scenarios:
                _log(f"rep {rep + 1}/{plan.reps}: {sc.name}")
                try:
                    set_sockmap(sc.sockmap)
                except BenchError as exc:
                    _log(f"FAILED: {exc}")
                    failures.append(f"{sc.name}: {exc}")
                    continue
                for wl in workloads:
                    try:
                        sample = measure(env, sc, wl, plan.seconds)
                    except BenchError as exc:  # one broken path must not cost the whole run
                        _log(f"FAILED: {exc}")
                        failures.append(str(exc))
                        continue
                    if sample is not None:
                        samples.setdefault((sc.name, wl.name), []).append(sample)
        if pods and plan.pod_counts:
            set_sockmap(True)  # nodemesh as deployed
            try:
                pod_rows = pods_per_node(env, plan.pod_counts, max(plan.seconds, 2), _log)
            except BenchError as exc:
                _log(f"FAILED: {exc}")
                failures.append(f"pods per node: {exc}")
    finally:
        for log in env.logs:
            log.close()
        lab.down()
    rows = [results.summarize(name, wl, s) for (name, wl), s in samples.items()] + pod_rows
    baselines = {sc.name: (sc.direct, sc.sidecar) for sc in scenarios}
    for name in ("nodemesh-same-node", "sidecar-pair"):  # the pods-per-node rows compare to the sidecars
        baselines.setdefault(name, ("direct", "sidecar-pair"))
    results.add_ratios(rows, baselines)
    doc = {
        "meta": {
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "quick": quick, "reps": plan.reps, "seconds_per_run": plan.seconds,
            "open_loop_rates": list(plan.open_loop_rates), "pod_counts": list(plan.pod_counts if pods else ()),
            "elapsed_s": round(time.monotonic() - started, 1), "host": platform.node(), "cpus": os.cpu_count(),
            "kernel": platform.release(), "git": _git_revision(),
            "scenarios": {sc.name: sc.description for sc in scenarios},
            "workloads": {wl.name: wl.description for wl in workloads},
            "notes": NOTES,
            "failures": failures,
        },
        "rows": rows,
    }
    with open(os.path.join(out, "results.json"), "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=1)
    report.write(doc, out)
    if not quick and output is None and not names:  # a complete default run becomes "the latest"
        latest = publish(out)
        if latest:
            _log(f"copied to {latest} (what the README shows)")
    _log(f"done in {doc['meta']['elapsed_s']} s: {out}/results.md")
    return out
