"""The standalone cluster-state source: a directory of Kubernetes-shaped YAML files.

Each re-read is a full snapshot (a removed file removes its objects). A malformed resource only
rejects itself (ztunnel's rule): the rest of the batch still applies, an invalid update of an
object keeps its previous version (as the API server would), and an unreadable or unparsable file
keeps the objects it last contributed (static stability: a half-saved editor write drops nothing).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Mapping
from typing import Any

import yaml

from nodemesh.errors import ConfigError
from nodemesh.model import DEFAULT_TRUST_DOMAIN, ClusterState, ObjectKey, key_of, parse_object

from nodemesh.controller.state_merge import Signature, SourceObjects, StateSource, merge_sources

log = logging.getLogger(__name__)

POLL_INTERVAL = 0.3
_SUFFIXES = (".yaml", ".yml")



def _raw_key(doc: Any) -> ObjectKey | None:
    """The key a raw document claims, if readable, so a rejected update can keep the old object."""
    if not isinstance(doc, Mapping) or not isinstance(doc.get("metadata"), Mapping):
        return None
    kind, meta = doc.get("kind"), doc["metadata"]
    if not isinstance(kind, str) or not isinstance(meta.get("name"), str):
        return None
    ns = "" if kind in ("Node", "Namespace") else (meta.get("namespace") or "default")
    return (kind, str(ns), meta["name"])


def _parse_file(path: str, sig: Signature, previous: SourceObjects | None) -> SourceObjects:
    old = previous.objects if previous else {}
    result = SourceObjects(signature=sig)
    try:
        with open(path, encoding="utf-8") as f:
            docs = [d for d in yaml.safe_load_all(f) if d is not None]
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else f"is not valid YAML: {exc}"
        result.errors.append(ConfigError(f"{reason}; what it defined before (if anything) stays in force", source=path))
        result.objects = dict(old)
        return result
    items: list[Any] = []
    for doc in docs:  # a `kind: List` expands in place, as in parse_documents
        is_list = isinstance(doc, Mapping) and doc.get("kind") == "List"
        items.extend((doc.get("items") or []) if is_list else [doc])
    for i, doc in enumerate(items):
        try:
            obj = parse_object(doc, path, i)
        except ConfigError as exc:
            result.errors.append(exc)
            key = _raw_key(doc)
            if key is not None and key in old:
                result.objects[key] = old[key]
            continue
        result.objects[key_of(obj)] = obj
    return result


def _scan(path: str) -> dict[str, Signature]:
    out = {}
    with os.scandir(path) as it:
        for e in it:
            if e.name.endswith(_SUFFIXES) and not e.name.startswith(".") and e.is_file():
                st = e.stat()
                out[e.path] = (st.st_mtime_ns, st.st_size, st.st_ino)
    return out


class DirSource(StateSource):
    """Re-reads a directory on change and reports each new valid state.

    Change detection polls (name, mtime_ns, size, inode) every `interval` seconds: dependency-free
    and portable (inotify is Linux-only and misses some editors' rename dances), and a few stat()
    calls per 0.3 s cost nothing next to the rest of the controller.
    """

    def __init__(
        self,
        path: str,
        on_state: Callable[[ClusterState], Any],
        trust_domain: str = DEFAULT_TRUST_DOMAIN,
        interval: float = POLL_INTERVAL,
    ) -> None:
        super().__init__(on_state, trust_domain)
        self.path, self.interval = path, interval
        self._files: dict[str, SourceObjects] = {}

    def refresh(self) -> bool:
        """Checks the directory once; returns True if a new state was delivered."""
        try:
            sigs = _scan(self.path)
        except OSError as exc:
            self._report([ConfigError(f"cannot be listed: {exc.strerror}; keeping the last good state", source=self.path)])
            return False
        if self.state is not None and sigs == {p: r.signature for p, r in self._files.items()}:
            return False
        self._files = {p: self._files[p] if p in self._files and self._files[p].signature == s
                       else _parse_file(p, s, self._files.get(p))
                       for p, s in sigs.items()}
        return self._publish(self._files)

    async def run(self) -> None:
        """Polls until cancelled. Reading is synchronous: a lab directory is a few small files."""
        while True:
            try:
                self.refresh()
            except Exception:  # never let one bad read stop the watch (static stability)
                log.exception("reading %s failed; keeping the last good state", self.path)
            await asyncio.sleep(self.interval)


def read_dir(path: str, trust_domain: str = DEFAULT_TRUST_DOMAIN) -> tuple[ClusterState, list[ConfigError]]:
    """The state a directory describes, and every file or object that was rejected."""
    files = {p: _parse_file(p, s, None) for p, s in _scan(path).items()}
    return merge_sources(files, trust_domain)


def load_dir(path: str, trust_domain: str = DEFAULT_TRUST_DOMAIN) -> ClusterState:
    """Like read_dir, logging each rejected file or object instead of returning them."""
    state, errors = read_dir(path, trust_domain)
    for e in errors:
        log.error("rejected: %s", e)
    return state
