"""Adopt a CA directory's new contents without a SIGHUP. In Kubernetes the issuer Secret is a
mounted volume the kubelet updates in place (an atomic swap of its `..data` symlink) when
cert-manager or an operator renews it; nobody is there to signal the controller."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable

from nodemesh.controller.ca import ANCHOR_FILE, ISSUER_FILE, ISSUER_KEY_FILE

CA_FILES = (ANCHOR_FILE, ISSUER_FILE, ISSUER_KEY_FILE)
DEFAULT_INTERVAL = 10.0  # seconds; the kubelet itself takes up to a minute to project a Secret update

Signature = tuple[tuple[int, int, int] | None, ...]


def ca_dir_signature(ca_dir: str) -> Signature:
    """(mtime_ns, size, inode) of each CA file, following symlinks (a Secret volume's files are
    symlinks into the current `..data`); None for a missing file."""
    out: list[tuple[int, int, int] | None] = []
    for name in CA_FILES:
        try:
            st = os.stat(os.path.join(ca_dir, name))
        except OSError:
            out.append(None)
            continue
        out.append((st.st_mtime_ns, st.st_size, st.st_ino))
    return tuple(out)


class SettledChange:
    """Says when a polled signature changed and then stayed the same for one more poll, so a writer
    that replaces the issuer's certificate and key one after the other is never read halfway."""

    def __init__(self, initial: Signature) -> None:
        self.last = initial
        self.pending: Signature | None = None

    def observe(self, sig: Signature) -> bool:
        if sig == self.last:
            self.pending = None
            return False
        if sig != self.pending:
            self.pending = sig  # changed: let it settle first
            return False
        self.last, self.pending = sig, None
        return True


async def watch_ca_dir(ca_dir: str, reload: Callable[[], None], interval: float = DEFAULT_INTERVAL) -> None:
    """Calls `reload` after each settled change of the CA files (until cancelled)."""
    change = SettledChange(ca_dir_signature(ca_dir))
    while True:
        await asyncio.sleep(interval)
        if change.observe(ca_dir_signature(ca_dir)):
            reload()
