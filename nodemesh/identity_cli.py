"""`nodemesh identity`: the certificates each node's agent holds, and issuer rotation in the lab."""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from nodemesh.cli import friendly_errors


def node_identities() -> list[dict[str, Any]]:
    """GET /identity from every lab agent (what it holds: never keys)."""
    from nodemesh.lab import lab as lab_mod
    from nodemesh.lab.topology import NodeAddressing
    from nodemesh.nodeconfig import ADMIN_PORT

    state = lab_mod.require_up()
    out = []
    for name in sorted(state.nodes):
        addr = NodeAddressing(name=name, index=int(state.nodes[name]["index"]))
        try:
            status, body = lab_mod.http_get(addr.underlay_ip, ADMIN_PORT, "/identity")
            entry = json.loads(body) if status == 200 else {"node": name, "error": f"HTTP {status}: {body[:200].decode(errors='replace')}"}
        except (OSError, ValueError) as exc:
            entry = {"node": name, "error": str(exc)}
        out.append(entry)
    return out


@click.group(invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
@friendly_errors
def identity(ctx: click.Context, as_json: bool) -> None:
    """Workload certificates per node: SPIFFE ID, serial, not-after, issuer."""
    if ctx.invoked_subcommand is not None:
        return
    from nodemesh.table import render

    nodes = node_identities()
    if as_json:
        click.echo(json.dumps(nodes, indent=2))
        return
    rows = []
    for n in nodes:
        if "error" in n:
            rows.append([n["node"], f"(unavailable: {n['error']})", "", "", ""])
            continue
        for c in n["certificates"]:
            rows.append([n["node"], c["identity"], c["serial"], c["not_after"], c["issuer"]])
        for ident, reason in n.get("refused", {}).items():
            rows.append([n["node"], ident, "-", f"REFUSED ({reason})", ""])
    click.echo(render(["NODE", "IDENTITY", "SERIAL", "NOT-AFTER", "ISSUER"], rows))
    if any("error" in n for n in nodes):
        sys.exit(1)


@identity.command("rotate-issuer")
@click.option("--issuer-cert", type=click.Path(dir_okay=False), help="Use this issuer (signed by the lab's trust anchor) instead of a generated one.")
@click.option("--issuer-key", type=click.Path(dir_okay=False))
@friendly_errors
def rotate_issuer(issuer_cert: str | None, issuer_key: str | None) -> None:
    """Lab: a new issuer for the controller, adopted live (existing certificates stay valid)."""
    from nodemesh.lab import lab as lab_mod
    from nodemesh.lab import lab_ca

    subject = lab_ca.rotate_issuer(lab_mod.require_up(), (issuer_cert, issuer_key))
    click.echo(f"issuer rotated: {subject}")
