"""`nodemesh agent uninstall` and `nodemesh bpf status`: a node's pinned BPF state, via bpftool.

Registered by nodemesh/cli.py (at its end, so `friendly_errors` exists when this imports it).
"""

from __future__ import annotations

import json
from dataclasses import asdict

import click

from nodemesh.cli import friendly_errors


@click.command("uninstall")
@click.option("--node", required=True, help="Node whose redirection to remove.")
@click.option("--cgroup", "cgroup_path", required=True, help="The node cgroup v2 path the agent attached to.")
@click.option("--bpf-pin-dir", default=None, help="The agent's pin directory [default: /sys/fs/bpf/nodemesh/NODE].")
@friendly_errors
def agent_uninstall(node: str, cgroup_path: str, bpf_pin_dir: str | None) -> None:
    """Detach the node's redirect programs, remove its pinned maps and programs, and remove the
    NAT table (inbound capture / iptables fallback) of the network namespace this runs in.

    Pods connect directly afterwards. Stop the agent first: a running agent re-pins nothing, but
    keeps proxying connections it already accepted.
    """
    from nodemesh.agent import nat_rules
    from nodemesh.agent.bpf_pins import default_pin_dir, uninstall

    removed = uninstall(cgroup_path, bpf_pin_dir or default_pin_dir(node))
    if nat_rules.present():
        nat_rules.remove()
        removed.append(f"nftables table ip {nat_rules.TABLE}")
    for what in removed:
        click.echo(f"removed {what}")
    if not removed:
        click.echo(f"nothing of node {node} was installed")


@click.group()
def bpf() -> None:
    """The eBPF redirect programs of each node: what is attached where, maps, counters."""


@bpf.command("status")
@click.option("--pin-root", default=None, help="Directory holding one pin directory per node "
              "[default: the lab's (NODEMESH_LAB_INSTANCE), /sys/fs/bpf/nodemesh for instance 0].")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@friendly_errors
def bpf_status(pin_root: str | None, as_json: bool) -> None:
    """Per node: programs and where they are attached, map sizes and fill, shortcut counters."""
    from nodemesh.agent.bpf_loader import COUNTER_NAMES
    from nodemesh.agent.bpf_pins import status
    from nodemesh.lab.topology import BPF_PIN_ROOT
    from nodemesh.table import render

    root = pin_root or BPF_PIN_ROOT
    nodes = status(root, COUNTER_NAMES)
    if as_json:
        click.echo(json.dumps([asdict(n) for n in nodes], indent=2))
        return
    if not nodes:
        click.echo(f"no node has BPF programs pinned under {root}")
        return
    for n in nodes:
        click.echo(f"node {n.node} ({n.pin_dir})")
        click.echo(render(["PROGRAM", "ID", "TYPE", "ATTACHED"],
                          [[p.name, p.id, p.type, ", ".join(p.attached) or "not attached"] for p in n.programs]))
        click.echo("")
        click.echo(render(["MAP", "TYPE", "ENTRIES", "MAX", "FILL"],
                          [[m.name, m.type, "-" if m.entries is None else m.entries, m.max_entries,
                            "-" if m.entries is None else f"{100 * m.entries / max(m.max_entries, 1):.1f}%"] for m in n.maps]))
        click.echo("")
        click.echo(render(["COUNTER", "VALUE"], sorted(n.counters.items())))
        click.echo("")
