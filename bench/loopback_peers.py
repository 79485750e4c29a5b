"""The reference servers the loopback bench scripts (bench/l7_http1_keepalive.py, bench/h2_grpc.py)
run side by side: nginx as the backend, one haproxy hop, and node proxy processes, each started in
a temporary directory, pinned to core 1, and stopped however the run ends."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence

from bench.procstat import pin


def wait_port(host: str, port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection((host, port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {host}:{port} after {timeout}s")


@contextlib.contextmanager
def loopback_peers(prefix: str, nginx_conf: Callable[[str], str], haproxy_conf: Callable[[str], str], proxies: Sequence[Sequence[str]],
                   host: str, ports: Sequence[int]) -> Iterator[str]:
    """Runs nginx and haproxy with the configs these build for the run directory, and
    one `python -c` process per `proxies` entry (its arguments), waits until every port in `ports`
    listens on `host`, and yields the run directory."""
    procs: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory(prefix=prefix) as d:
        os.makedirs(f"{d}/tmp")
        try:
            for name, text in (("nginx.conf", nginx_conf), ("haproxy.cfg", haproxy_conf)):
                with open(f"{d}/{name}", "w") as f:
                    f.write(text(d))
            procs.append(subprocess.Popen(["nginx", "-p", d, "-c", f"{d}/nginx.conf"]))
            procs.append(subprocess.Popen(["haproxy", "-db", "-f", f"{d}/haproxy.cfg"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            for args in proxies:
                procs.append(subprocess.Popen([sys.executable, "-c", *args], stdout=subprocess.PIPE))
            for port in ports:
                wait_port(host, port)
            pin([p.pid for p in procs], 1)
            yield d
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                try:
                    p.wait(5)
                except subprocess.TimeoutExpired:
                    p.kill()
