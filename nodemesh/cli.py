"""The `nodemesh` command line."""

from __future__ import annotations

import click

from nodemesh import __version__


@click.group()
@click.version_option(__version__, prog_name="nodemesh")
def cli() -> None:
    """nodemesh: a sidecar-less service mesh, one eBPF-fed proxy per node."""


def main() -> None:
    cli()
