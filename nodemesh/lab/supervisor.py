"""The lab's DaemonSet controller: one small process per lab that restarts a dead agent.

`lab up` starts it once every agent is ready (`start`); `lab down` stops it before anything else
(`stop`). Every POLL seconds it checks each node's agent pid from the lab state; a dead one is
started again with the same command line (the lab's `_start_agent`), under the lab lock, so it
never races `lab down`/`apply`. The restarted agent adopts its node's pinned BPF maps, and the
redirection stayed attached meanwhile, so pods need no restart: while no proxy listens, their
redirected connects are refused at once.

An agent that keeps dying is restarted with a growing delay (crash-loop backoff, as the kubelet
does), capped at MAX_BACKOFF seconds. Its log is the agent's lab log; restarts are counted in the
lab state (`processes["agent/<node>"]["restarts"]`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time

from nodemesh.lab import cgroup_tree, processes
from nodemesh.lab.state import LabState, lab_dir, locked, pid_alive

POLL = 0.25
QUICK_EXIT = 10.0  # an agent that dies sooner than this after a (re)start is crash-looping
MAX_BACKOFF = 10.0
PID_KEY = "supervisor"


def start(state: LabState) -> None:
    """Start the supervisor (caller holds the lab lock) and record it in the state."""
    cg = os.path.join(state.cgroup_root, "supervisor")
    cgroup_tree.make(cg)
    logdir = os.path.join(lab_dir(), "logs")
    os.makedirs(logdir, exist_ok=True)
    log_path = os.path.join(logdir, "supervisor.log")
    with open(log_path, "ab") as log:
        proc = processes.spawn([sys.executable, "-m", "nodemesh.lab.supervisor"], netns=None, cgroup=cg, log=log)
    state.processes[PID_KEY] = {"pid": proc.pid, "role": "supervisor", "log": log_path}
    state.save()


def stop(state: LabState, timeout: float = 2.0) -> None:
    """Stop the supervisor if it runs. SIGTERM ends it at once, even while it waits for the lock."""
    entry = state.processes.get(PID_KEY)
    if not entry:
        return
    pid = int(entry["pid"])
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def _reap() -> None:
    """Collect exited agents this process restarted (its children), so they do not linger as zombies."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _dead_agents(state: LabState) -> list[str]:
    dead = []
    for node in state.nodes:
        entry = state.processes.get(f"agent/{node}")
        if entry is None or not pid_alive(int(entry["pid"])):
            dead.append(node)
    return dead


def run() -> None:
    from nodemesh.lab import lab  # lazy: lab imports this module

    started: dict[str, float] = {}  # node -> when we last started its agent
    backoff: dict[str, float] = {}
    while True:
        time.sleep(POLL)
        _reap()
        state = LabState.load()
        if state is None:
            return  # the lab is gone
        if state.status != "up" or not _dead_agents(state):
            continue
        now = time.monotonic()
        with locked():
            state = LabState.load()
            if state is None:
                return
            if state.status != "up":
                continue
            for node in _dead_agents(state):
                if now < started.get(node, 0.0) + backoff.get(node, 0.0):
                    continue
                quick = now - started.get(node, -QUICK_EXIT) < QUICK_EXIT
                backoff[node] = min(MAX_BACKOFF, max(0.5, 2 * backoff.get(node, 0.25))) if quick else 0.0
                entry = state.processes.get(f"agent/{node}", {})
                restarts = int(entry.get("restarts", 0)) + 1
                print(f"[supervisor] agent of {node} (pid {entry.get('pid')}) is gone: restart #{restarts}", flush=True)
                lab._start_agent(state, node)
                state.processes[f"agent/{node}"]["restarts"] = restarts
                state.save()
                started[node] = now


if __name__ == "__main__":
    run()
