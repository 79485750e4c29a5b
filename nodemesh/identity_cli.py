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
@click.option("--under-new-root", is_flag=True, help="Root rotation step 2: sign the new issuer with the root `add-root` added.")
@friendly_errors
def rotate_issuer(issuer_cert: str | None, issuer_key: str | None, under_new_root: bool) -> None:
    """Lab: a new issuer for the controller, adopted live (existing certificates stay valid)."""
    from nodemesh.lab import lab as lab_mod
    from nodemesh.lab import lab_ca

    subject = lab_ca.rotate_issuer(lab_mod.require_up(), (issuer_cert, issuer_key), under_new_root)
    click.echo(f"issuer rotated: {subject}")


DEFAULT_WAIT = 60.0


def _wait_bundle(timeout: float) -> None:
    from nodemesh.lab import lab_ca, root_rotation
    from nodemesh.errors import LabError

    want = lab_ca.bundle_fingerprints()
    missing = root_rotation.wait_for(lambda: root_rotation.lagging_bundles(node_identities(), want), timeout)
    if missing:
        raise LabError(f"after {timeout:g}s these agents do not hold the new trust bundle yet: {'; '.join(missing)}")
    click.echo(f"every agent holds the trust bundle ({len(want)} root(s))")


def _wait_reissued(timeout: float) -> None:
    from nodemesh.controller.ca import load_ca_dir
    from nodemesh.errors import LabError
    from nodemesh.lab import lab_ca, root_rotation

    subject = load_ca_dir(lab_ca.ca_dir())[1].cert.subject.rfc4514_string()
    missing = root_rotation.wait_for(lambda: root_rotation.stale_certificates(node_identities(), subject), timeout)
    if missing:
        raise LabError(f"after {timeout:g}s these certificates are not re-issued by {subject} yet (they are as they renew; "
                       f"run `nodemesh identity drop-root` once `nodemesh identity` shows none): {'; '.join(missing[:10])}")
    click.echo(f"every certificate in use is issued by {subject}")


def _lifetime_wait() -> float:
    """Long enough for every leaf to renew once (they renew at 70% of their lifetime)."""
    from nodemesh.lab import lab_ca

    lifetime = lab_ca.leaf_lifetime()
    return DEFAULT_WAIT + (float(lifetime) if lifetime else 24 * 3600.0)


@identity.command("add-root")
@click.option("--trust-anchor", "anchor_file", type=click.Path(dir_okay=False), help="The new root certificate (PEM) instead of a generated one.")
@click.option("--timeout", type=float, default=DEFAULT_WAIT, show_default=True, help="Seconds to wait for every agent to hold the new bundle.")
@friendly_errors
def add_root(anchor_file: str | None, timeout: float) -> None:
    """Lab, root rotation step 1: the bundle becomes old + new root, pushed to every agent."""
    from nodemesh.lab import lab as lab_mod
    from nodemesh.lab import lab_ca

    fp = lab_ca.add_root(lab_mod.require_up(), anchor_file)
    click.echo(f"new root {fp[:16]} added to the trust bundle")
    _wait_bundle(timeout)


@identity.command("drop-root")
@click.option("--force", is_flag=True, help="Drop the old root even if agents still hold certificates from the old issuer.")
@click.option("--timeout", type=float, default=DEFAULT_WAIT, show_default=True, help="Seconds to wait for every agent to hold the new bundle.")
@friendly_errors
def drop_root(force: bool, timeout: float) -> None:
    """Lab, root rotation step 3: the bundle becomes the new root alone (refused while any
    certificate in use still hangs from the old root)."""
    from nodemesh.lab import lab as lab_mod
    from nodemesh.lab import lab_ca

    state = lab_mod.require_up()
    if not force:
        _wait_reissued(0)
    fp = lab_ca.drop_root(state)
    click.echo(f"old root dropped: the trust bundle is root {fp[:16]} alone")
    _wait_bundle(timeout)


@identity.command("rotate-root")
@click.option("--timeout", type=float, help="Seconds to wait for leaves to be re-issued (default: one leaf lifetime + 60).")
@friendly_errors
def rotate_root(timeout: float | None) -> None:
    """Lab: the whole root rotation with waits: add-root, rotate-issuer --under-new-root, wait until
    every certificate is re-issued, drop-root. Traffic keeps flowing throughout."""
    from nodemesh.lab import lab as lab_mod
    from nodemesh.lab import lab_ca

    state = lab_mod.require_up()
    fp = lab_ca.add_root(state)
    click.echo(f"1/3 new root {fp[:16]} added to the trust bundle")
    _wait_bundle(DEFAULT_WAIT)
    click.echo(f"2/3 issuer rotated under the new root: {lab_ca.rotate_issuer(state, under_new_root=True)}")
    _wait_reissued(timeout if timeout is not None else _lifetime_wait())
    fp = lab_ca.drop_root(state)
    click.echo(f"3/3 old root dropped: the trust bundle is root {fp[:16]} alone")
    _wait_bundle(DEFAULT_WAIT)
