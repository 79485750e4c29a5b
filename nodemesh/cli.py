"""The `nodemesh` command line. Errors a user can hit print one sentence and exit non-zero:
2 bad config, 3 machine not ready (preflight), 4 lab state, 1 anything else."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click

from nodemesh import __version__
from nodemesh.errors import NodemeshError

F = TypeVar("F", bound=Callable[..., Any])


def friendly_errors(fn: F) -> F:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except NodemeshError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)

    return wrapper  # type: ignore[return-value]


def host_port(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise click.BadParameter(f"{value!r} is not HOST:PORT")
    return host or "0.0.0.0", int(port)


class HostPort(click.ParamType):
    name = "HOST:PORT"

    def convert(self, value: Any, param: Any, ctx: Any) -> tuple[str, int]:
        if isinstance(value, tuple):
            return value
        try:
            return host_port(value)
        except click.BadParameter as exc:
            self.fail(str(exc), param, ctx)


@click.group()
@click.version_option(__version__, prog_name="nodemesh")
def cli() -> None:
    """nodemesh: a sidecar-less service mesh, one eBPF-fed proxy per node."""


# ---------------------------------------------------------------------------------------------
# lab


@cli.group()
def lab() -> None:
    """The standalone lab: simulated nodes and pods on this host (root)."""


@lab.command("up")
@click.option("-f", "--file", "lab_file", type=click.Path(dir_okay=False), help="Lab YAML (default: the bundled 2-node lab).")
@friendly_errors
def lab_up(lab_file: str | None) -> None:
    """Create nodes and pods, start the controller and one agent per node; wait until ready."""
    from nodemesh.lab import lab as lab_mod

    state = lab_mod.up(lab_file)
    click.echo(f"lab up: {len(state.nodes)} nodes, {len(state.pods)} pods (from {state.lab_file})")


@lab.command("down")
@friendly_errors
def lab_down() -> None:
    """Remove every process, netns, veth, bridge, cgroup and pinned BPF object of the lab."""
    from nodemesh.lab import lab as lab_mod

    removed = lab_mod.down()
    click.echo("lab down: " + (f"removed {len(removed)} groups of objects" if removed else "nothing to remove"))


@lab.command("status")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@friendly_errors
def lab_status(as_json: bool) -> None:
    """List nodes, pods and services of the running lab."""
    from nodemesh.lab import lab as lab_mod
    from nodemesh.table import render

    st = lab_mod.status()
    if as_json:
        click.echo(json.dumps(st, indent=2))
        return
    click.echo(render(["NODE", "NETNS", "INTERNAL-IP", "POD-CIDR", "AGENT", "READY"],
                      [[n["name"], n["netns"], n["internal_ip"], n["pod_cidr"], n["agent_admin"], "yes" if n["ready"] else f"no ({n['reason']})"] for n in st["nodes"]]))
    click.echo()
    click.echo(render(["NAMESPACE", "POD", "NODE", "IP", "LABELS"],
                      [[p["namespace"], p["name"], p["node"], p["ip"], ",".join(f"{k}={v}" for k, v in p["labels"].items())] for p in st["pods"]]))
    click.echo()
    click.echo(render(["NAMESPACE", "SERVICE", "CLUSTER-IP", "PORTS"],
                      [[s["namespace"], s["name"], s["cluster_ip"] or "None", " ".join(s["ports"])] for s in st["services"]]))
    if not all(n["ready"] for n in st["nodes"]):
        sys.exit(1)


@lab.command("exec", context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.argument("pod")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@friendly_errors
def lab_exec(pod: str, command: tuple[str, ...]) -> None:
    """Run COMMAND inside POD (its netns and cgroup): nodemesh lab exec client -- curl ..."""
    from nodemesh.lab import lab as lab_mod

    sys.exit(lab_mod.exec_in(pod, list(command)).returncode)


@lab.command("apply")
@click.option("-f", "--file", "path", required=True, help="YAML file of objects to create or update ('-' for stdin).")
@friendly_errors
def lab_apply(path: str) -> None:
    """Create or update cluster objects; agents get the change without restarts."""
    from nodemesh.lab import lab as lab_mod

    for line in lab_mod.apply(path):
        click.echo(line)


# ---------------------------------------------------------------------------------------------
# components


@cli.group()
def controller() -> None:
    """The central controller."""


@controller.command("run")
@click.option("--state-dir", required=True, help="Directory of Kubernetes-shaped YAML (standalone source).")
@click.option("--listen", type=HostPort(), default="0.0.0.0:8086", show_default=True)
@click.option("--admin", type=HostPort(), default="0.0.0.0:9990", show_default=True)
@click.option("--tokens-file", required=True, help="JSON object: node name -> bootstrap token.")
@click.option("--trust-domain", default="cluster.local", show_default=True)
@friendly_errors
def controller_run(state_dir: str, listen: tuple[str, int], admin: tuple[str, int], tokens_file: str, trust_domain: str) -> None:
    """Serve config to agents from the standalone source."""
    from nodemesh.controller.main import run

    run(state_dir=state_dir, listen=listen, admin=admin, tokens_file=tokens_file, trust_domain=trust_domain)


@cli.group()
def agent() -> None:
    """The per-node agent and node proxy."""


@agent.command("run")
@click.option("--node", required=True)
@click.option("--controller", "controller_addr", type=HostPort(), required=True)
@click.option("--token-file", required=True)
@click.option("--cgroup", "cgroup_path", required=True, help="Node cgroup v2 path to attach the redirect to.")
@click.option("--agent-cgroup", "agent_cgroup_path", required=True, help="The agent's own cgroup (never redirected).")
@click.option("--proxy-ip", required=True, help="Address pods are redirected to (the node proxy).")
@click.option("--inbound-ip", default="0.0.0.0", show_default=True, help="Address of the inbound listener (other nodes dial the node's internal IP).")
@click.option("--admin", type=HostPort(), default="0.0.0.0:4191", show_default=True)
@click.option("--no-bpf", is_flag=True, help="Run the proxy without the eBPF redirect (debugging only).")
@friendly_errors
def agent_run(node: str, controller_addr: tuple[str, int], token_file: str, cgroup_path: str, agent_cgroup_path: str,
              proxy_ip: str, inbound_ip: str, admin: tuple[str, int], no_bpf: bool) -> None:
    """Run the node agent: BPF redirect, node proxy, config stream, admin."""
    from nodemesh.agent.config import AgentConfig
    from nodemesh.agent.main import run

    run(AgentConfig(node=node, controller=controller_addr, token_file=token_file, cgroup_path=cgroup_path,
                    agent_cgroup_path=agent_cgroup_path, proxy_ip=proxy_ip, inbound_ip=inbound_ip, admin=admin, bpf=not no_bpf))


# ---------------------------------------------------------------------------------------------
# demo and samples


@cli.command()
@click.option("--keep", is_flag=True, help="Leave the lab running afterwards.")
@click.option("--requests", "count", default=40, show_default=True, help="Requests to send from client to hello.")
@friendly_errors
def demo(keep: bool, count: int) -> None:
    """Lab up, traffic from client to the hello service, a table of who answered, lab down."""
    from nodemesh.demo import run_demo

    sys.exit(run_demo(keep=keep, count=count))


def _add_samples() -> None:
    from nodemesh import sample_client, sample_server

    cli.add_command(sample_server.command)
    cli.add_command(sample_client.command)


_add_samples()


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
