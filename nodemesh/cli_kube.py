"""`nodemesh install` and `nodemesh check --pre`: the Kubernetes-facing commands."""

from __future__ import annotations

import sys

import click

from nodemesh.cli import friendly_errors
from nodemesh.errors import ConfigError


def _read(path: str | None, what: str) -> str | None:
    if path is None:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"the {what} file cannot be read: {getattr(exc, 'strerror', None) or exc}", source=path) from None


@click.command()
@click.option("--crds", "crds_only", is_flag=True, help="Render only the CustomResourceDefinitions.")
@click.option("--namespace", default="nodemesh", show_default=True, help="Namespace of the control plane and agents.")
@click.option("--trust-domain", default="cluster.local", show_default=True, help="SPIFFE trust domain of workload identities.")
@click.option("--image", default=None, help="Container image for both components (default: ghcr.io/nodemesh/nodemesh:<version>).")
@click.option("--image-pull-policy", default="IfNotPresent", show_default=True, type=click.Choice(["Always", "IfNotPresent", "Never"]))
@click.option("--ha", is_flag=True, help="Two controller replicas, anti-affinity, a PodDisruptionBudget (needs the identity files).")
@click.option("--log-level", default="INFO", show_default=True, type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"]))
@click.option("--pods-cgroup", default="kubepods.slice", show_default=True,
              help="The nodes' pod cgroup under the cgroup2 root: kubepods.slice (systemd driver) or kubepods (cgroupfs).")
@click.option("--identity-trust-anchor-file", type=click.Path(dir_okay=False), help="PEM trust anchor (root CA) certificate.")
@click.option("--identity-issuer-certificate-file", type=click.Path(dir_okay=False), help="PEM issuer (intermediate CA) certificate.")
@click.option("--identity-issuer-key-file", type=click.Path(dir_okay=False), help="PEM issuer private key.")
@friendly_errors
def install(crds_only: bool, namespace: str, trust_domain: str, image: str | None, image_pull_policy: str, ha: bool,
            log_level: str, pods_cgroup: str, identity_trust_anchor_file: str | None, identity_issuer_certificate_file: str | None,
            identity_issuer_key_file: str | None) -> None:
    """Print nodemesh's Kubernetes manifests, for `nodemesh install | kubectl apply -f -`."""
    from nodemesh.install import DEFAULT_IMAGE, Identity, InstallOptions, render, render_crds, to_yaml

    if crds_only:
        click.echo(to_yaml(render_crds()), nl=False)
        return
    files = (identity_trust_anchor_file, identity_issuer_certificate_file, identity_issuer_key_file)
    identity = None
    if any(files):
        if not all(files):
            raise ConfigError("pass all three of --identity-trust-anchor-file, --identity-issuer-certificate-file "
                              "and --identity-issuer-key-file, or none")
        anchor, cert, key = (_read(p, w) for p, w in zip(files, ("trust anchor", "issuer certificate", "issuer key")))
        identity = Identity(trust_anchor_pem=anchor or "", issuer_cert_pem=cert or "", issuer_key_pem=key or "")
    opts = InstallOptions(namespace=namespace, trust_domain=trust_domain, image=image or DEFAULT_IMAGE,
                          image_pull_policy=image_pull_policy, ha=ha, log_level=log_level, identity=identity,
                          pods_cgroup=pods_cgroup)
    click.echo(to_yaml(render(opts)), nl=False)


@click.command()
@click.option("--pre", is_flag=True, help="Check this node can run the agent (kernel, BPF features, cgroup v2, bpffs).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--ca-dir", type=click.Path(file_okay=False), help="A CA directory (trust-anchor.pem, issuer.pem, issuer-key.pem) instead of the lab's.")
@click.option("--trust-anchor", "anchor_file", type=click.Path(dir_okay=False), help="PEM trust bundle file (one or more roots).")
@click.option("--issuer-cert", "issuer_file", type=click.Path(dir_okay=False), help="PEM issuer certificate file (with --trust-anchor).")
def check(pre: bool, as_json: bool, ca_dir: str | None, anchor_file: str | None, issuer_file: str | None) -> None:
    """Check the identity material (trust anchors, issuer, the lab agents' certificates): exit 0 ok,
    1 warnings (anchor < 30 days, issuer < 7 days, late renewal), 2 errors. With --pre: check this
    node before installing; exit 0 when every check passes, 3 otherwise."""
    import json

    from nodemesh.node_check import run_checks
    from nodemesh.table import render as render_table

    if not pre:
        _check_identity(as_json, ca_dir, anchor_file, issuer_file)
        return
    results = run_checks()
    if as_json:
        click.echo(json.dumps({"ok": all(r.ok for r in results),
                               "checks": [{"name": r.name, "ok": r.ok, "detail": r.detail} for r in results]}, indent=2))
    else:
        click.echo(render_table(["CHECK", "STATUS", "DETAIL"], [[r.name, "ok" if r.ok else "FAIL", r.detail] for r in results]))
        failed = [r.name for r in results if not r.ok]
        click.echo(f"\n{len(results) - len(failed)}/{len(results)} checks passed" + (f"; failing: {', '.join(failed)}" if failed else ""))
    sys.exit(0 if all(r.ok for r in results) else 3)


def _check_identity(as_json: bool, ca_dir: str | None, anchor_file: str | None, issuer_file: str | None) -> None:
    import json
    import time

    from nodemesh import ca_check
    from nodemesh.table import render as render_table

    now = time.time()
    if issuer_file and not anchor_file:
        raise click.UsageError("--issuer-cert needs --trust-anchor (the issuer is judged against the bundle)")
    if ca_dir and anchor_file:
        raise click.UsageError("pass --ca-dir or --trust-anchor/--issuer-cert, not both")
    if anchor_file:
        findings, _ = ca_check.check_files(anchor_file, issuer_file, now)
    elif ca_dir:
        findings, _ = ca_check.check_ca_dir(ca_dir, now)
    else:  # the lab: its CA directory and what every agent holds
        from nodemesh.errors import NodemeshError
        from nodemesh.identity_cli import node_identities
        from nodemesh.lab import lab_ca

        try:
            nodes = node_identities()
        except NodemeshError as exc:
            findings = [ca_check.Finding("error", "source", "lab", "", f"{exc}; pass --ca-dir or --trust-anchor/--issuer-cert for a cluster")]
        else:
            findings, issuer = ca_check.check_ca_dir(lab_ca.ca_dir(), now)
            findings += ca_check.check_leaves(nodes, issuer, now)
    if as_json:
        click.echo(json.dumps(ca_check.to_json(findings), indent=2))
    else:
        rows = [[f.level.upper() if f.level != "ok" else "ok", f.kind, f.subject, f.not_after[:19], f.where, f.detail] for f in findings]
        click.echo(render_table(["STATUS", "KIND", "SUBJECT", "NOT-AFTER", "WHERE", "DETAIL"], rows))
        counts = {lvl: sum(f.level == lvl for f in findings) for lvl in ca_check.LEVELS}
        click.echo(f"\n{counts['ok']} ok, {counts['warn']} warning(s), {counts['error']} error(s)"
                   f" (warn: trust anchor < {ca_check.ANCHOR_WARN / 86400:.0f} days, issuer < {ca_check.ISSUER_WARN / 86400:.0f} days)")
    sys.exit(ca_check.exit_code(findings))
