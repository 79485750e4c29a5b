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
@click.option("--trust-anchor", type=click.Path(dir_okay=False), help="PEM trust anchor (root) to use instead of a generated one.")
@click.option("--issuer-cert", type=click.Path(dir_okay=False), help="PEM issuer certificate signed by --trust-anchor.")
@click.option("--issuer-key", type=click.Path(dir_okay=False), help="PEM (unencrypted, ECDSA P-256) key of --issuer-cert.")
@click.option("--leaf-lifetime", type=float, help="Workload certificate lifetime in seconds [default: 86400].")
@friendly_errors
def lab_up(lab_file: str | None, trust_anchor: str | None, issuer_cert: str | None, issuer_key: str | None, leaf_lifetime: float | None) -> None:
    """Create nodes and pods, start the controller and one agent per node; wait until ready."""
    from nodemesh.lab import lab as lab_mod

    state = lab_mod.up(lab_file, (trust_anchor, issuer_cert, issuer_key), leaf_lifetime)
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
@click.option("--state-dir", help="Directory of Kubernetes-shaped YAML (the standalone source; required with --source files).")
@click.option("--source", "source_kind", type=click.Choice(["files", "kubernetes"]), default="files", show_default=True,
              help="Where cluster state comes from: --state-dir, or list+watch of the Kubernetes API (in-cluster or --kubeconfig).")
@click.option("--kubeconfig", type=click.Path(dir_okay=False), help="Kubeconfig for --source kubernetes outside a cluster.")
@click.option("--listen", type=HostPort(), default="0.0.0.0:8086", show_default=True)
@click.option("--admin", type=HostPort(), default="0.0.0.0:9990", show_default=True)
@click.option("--agent-auth", type=click.Choice(["tokens", "tokenreview"]), default="tokens", show_default=True,
              help="How agents prove their node: the static --tokens-file (lab), or their projected service-account "
              "token checked with the Kubernetes TokenReview API.")
@click.option("--tokens-file", help="JSON object: node name -> bootstrap token (required with --agent-auth tokens).")
@click.option("--token-audience", default="nodemesh-controller", show_default=True,
              help="With --agent-auth tokenreview: the audience agents' tokens must be bound to.")
@click.option("--agent-service-account", default="nodemesh/nodemesh-agent", show_default=True,
              help="With --agent-auth tokenreview: NAMESPACE/NAME of the agents' service account.")
@click.option("--trust-domain", default="cluster.local", show_default=True)
@click.option("--log-level", default="INFO", show_default=True, envvar="NODEMESH_LOG_LEVEL",
              type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"]), help="Also read from $NODEMESH_LOG_LEVEL.")
@click.option("--default-inbound-policy", "default_policy", default="all-unauthenticated", show_default=True,
              type=click.Choice(["all-unauthenticated", "all-authenticated", "cluster-unauthenticated", "cluster-authenticated", "deny"]),
              help="Cluster-wide default authorization for pod ports (namespace/pod annotations override it).")
@click.option("--ca-dir", help="Be the mesh CA: directory with trust-anchor.pem, issuer.pem, issuer-key.pem (SIGHUP re-reads it). "
              "The config stream then runs over mTLS.")
@click.option("--leaf-lifetime", type=float, help="Certificate lifetime in seconds [default: 86400].")
@click.option("--ca-reload-interval", type=click.FloatRange(min=0), default=10.0, show_default=True,
              help="Seconds between checks of --ca-dir for new files (a renewed issuer Secret); 0 = only on SIGHUP.")
@friendly_errors
def controller_run(state_dir: str | None, source_kind: str, kubeconfig: str | None, listen: tuple[str, int], admin: tuple[str, int],
                   agent_auth: str, tokens_file: str | None, token_audience: str, agent_service_account: str, trust_domain: str,
                   log_level: str, default_policy: str, ca_dir: str | None, leaf_lifetime: float | None,
                   ca_reload_interval: float) -> None:
    """Serve config to agents from the standalone source or the Kubernetes API."""
    from nodemesh.controller.main import ControllerOptions, run

    check_controller_options(source_kind, state_dir, agent_auth, tokens_file, agent_service_account)
    run(ControllerOptions(state_dir=state_dir or "", listen=listen, admin=admin, tokens_file=tokens_file, trust_domain=trust_domain,
                          default_policy=default_policy, ca_dir=ca_dir, leaf_lifetime=leaf_lifetime, source_kind=source_kind,
                          kubeconfig=kubeconfig, agent_auth=agent_auth, token_audience=token_audience,
                          agent_service_account=agent_service_account, ca_reload_interval=ca_reload_interval), log_level=log_level)


def check_controller_options(source_kind: str, state_dir: str | None, agent_auth: str, tokens_file: str | None,
                             agent_service_account: str) -> None:
    """The rules between `controller run` options click cannot express; raises click.UsageError."""
    if source_kind == "files" and not state_dir:
        raise click.UsageError("--state-dir is required with --source files")
    if agent_auth == "tokens" and not tokens_file:
        raise click.UsageError("--tokens-file is required with --agent-auth tokens (the lab's per-node tokens)")
    if agent_auth == "tokenreview" and tokens_file:
        raise click.UsageError("--tokens-file is for --agent-auth tokens; with tokenreview agents present service-account tokens")
    ns, _, name = agent_service_account.partition("/")
    if not ns or not name or "/" in name:
        raise click.UsageError(f"--agent-service-account {agent_service_account!r} must be NAMESPACE/NAME, e.g. nodemesh/nodemesh-agent")


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
@click.option("--bpf-pin-dir", default=None, help="bpffs directory for the node's pinned maps/programs "
              "[default: /sys/fs/bpf/nodemesh/NODE]; '' = do not pin (detach on exit).")
@click.option("--sockmap/--no-sockmap", default=False, show_default=True,
              help="The sockmap short-circuit (sk_msg). Off by default: it has no backpressure (bulk senders get ENOMEM).")
@click.option("--redirect", type=click.Choice(["auto", "bpf", "iptables"]), default="auto", show_default=True,
              help="How pods' connects reach the proxy: eBPF connect4, nftables DNAT in the node netns, or BPF with iptables fallback.")
@click.option("--splice/--no-splice", default=False, show_default=True,
              help="Same-node opaque TCP spliced in the kernel (sk_skb). Off by default: no backpressure.")
@click.option("--no-capture", is_flag=True, help="Do not capture connections that dial local meshed pods around the mesh.")
@click.option("--trust-anchor", default="", help="PEM trust bundle of the mesh CA: enables the mTLS stream, certificates and tunnels.")
@click.option("--trust-domain", default="cluster.local", show_default=True)
@click.option("--identity-dir", default="", help="Keeps the node key/certificate across restarts (the token is single use).")
@click.option("--outbound-spread", type=click.IntRange(0, 15), default=15, show_default=True,
              help="BPF mode: extra outbound listener ports (4150 up); connect4 sends each original destination to one "
              "of them, so a pod's connections through the proxy do not all share one remote address and port.")
@friendly_errors
def agent_run(node: str, controller_addr: tuple[str, int], token_file: str, cgroup_path: str, agent_cgroup_path: str,
              proxy_ip: str, inbound_ip: str, admin: tuple[str, int], no_bpf: bool, bpf_pin_dir: str | None, sockmap: bool,
              trust_anchor: str, trust_domain: str, identity_dir: str, redirect: str = "auto", no_capture: bool = False, splice: bool = False,
              outbound_spread: int = 15) -> None:
    """Run the node agent: BPF redirect, node proxy, config stream, admin."""
    from nodemesh.agent.bpf_pins import default_pin_dir
    from nodemesh.agent.config import AgentConfig
    from nodemesh.agent.main import run
    from nodemesh.nodeconfig import OUTBOUND_SPREAD_PORTS

    pin_dir = default_pin_dir(node) if bpf_pin_dir is None else bpf_pin_dir
    run(AgentConfig(node=node, controller=controller_addr, token_file=token_file, cgroup_path=cgroup_path,
                    agent_cgroup_path=agent_cgroup_path, proxy_ip=proxy_ip, inbound_ip=inbound_ip, admin=admin, bpf=not no_bpf,
                    bpf_pin_dir=pin_dir, sockmap=sockmap, trust_anchor_file=trust_anchor, trust_domain=trust_domain,
                    identity_dir=identity_dir, redirect=redirect, capture=not no_capture, splice=splice,
                    outbound_spread_ports=OUTBOUND_SPREAD_PORTS[:outbound_spread]))


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


@cli.command()
@click.argument("scenarios", nargs=-1)
@click.option("--quick", is_flag=True, help="One short repetition, one open-loop rate, 10 pods per node (< 3 min).")
@click.option("--output", type=click.Path(file_okay=False), help="Results directory (default: bench/results/<timestamp>).")
@click.option("--no-pods", is_flag=True, help="Skip the pods-per-node proxy memory/CPU comparison.")
@friendly_errors
def bench(scenarios: tuple[str, ...], quick: bool, output: str | None, no_pods: bool) -> None:
    """Measure nodemesh against direct traffic, a sidecar-pair model and one-proxy peers (on the lab)."""
    from nodemesh.bench.scenarios import BY_NAME

    unknown = [s for s in scenarios if s not in BY_NAME]
    if unknown:
        raise click.BadParameter(f"unknown scenario(s) {', '.join(unknown)}; known: {', '.join(BY_NAME)}", param_hint="SCENARIOS")
    from nodemesh.bench import runner

    click.echo(runner.run(scenarios, quick=quick, output=output, pods=not no_pods))


def _add_samples() -> None:
    from nodemesh import sample_client, sample_h2, sample_server

    cli.add_command(sample_server.command)
    cli.add_command(sample_client.command)
    cli.add_command(sample_h2.server_command)
    cli.add_command(sample_h2.client_command)


_add_samples()


def _add_kube() -> None:
    from nodemesh import cli_kube

    cli.add_command(cli_kube.install)
    if "check" not in cli.commands:  # another issue may grow `check` into the full mesh check
        cli.add_command(cli_kube.check)


_add_kube()


def _add_bpf() -> None:
    from nodemesh import cli_bpf

    agent.add_command(cli_bpf.agent_uninstall)
    cli.add_command(cli_bpf.bpf)


_add_bpf()


def _add_authz() -> None:
    from nodemesh import authz_cli

    cli.add_command(authz_cli.command)

    @lab.command("delete")
    @click.option("-f", "--file", "path", required=True, help="YAML file naming the objects to delete ('-' for stdin).")
    @friendly_errors
    def lab_delete(path: str) -> None:
        """Delete cluster objects other than pods and nodes (policies, services...); agents follow."""
        from nodemesh.lab.delete_objects import delete

        for line in delete(path):
            click.echo(line)


_add_authz()


def _add_identity() -> None:
    from nodemesh import identity_cli

    cli.add_command(identity_cli.identity)


_add_identity()


def main() -> None:
    cli()

