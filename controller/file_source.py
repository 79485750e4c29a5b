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
from dataclasses import dataclass, field
from typing import Any

import yaml

from nodemesh.errors import ConfigError
from nodemesh.model import DEFAULT_TRUST_DOMAIN, ClusterState, Object, ObjectKey, describe, key_of, parse_object

log = logging.getLogger(__name__)

POLL_INTERVAL = 0.3
_SUFFIXES = (".yaml", ".yml")

Signature = tuple[int, int, int]  # (mtime_ns, size, inode): inode catches write-and-rename saves


def _raw_key(doc: Any) -> ObjectKey | None:
    """The key a raw document claims, if readable, so a rejected update can keep the old object."""
    if not isinstance(doc, Mapping) or not isinstance(doc.get("metadata"), Mapping):
        return None
    kind, meta = doc.get("kind"), doc["metadata"]
    if not isinstance(kind, str) or not isinstance(meta.get("name"), str):
        return None
    ns = "" if kind in ("Node", "Namespace") else (meta.get("namespace") or "default")
    return (kind, str(ns), meta["name"])


@dataclass
class _FileResult:
    signature: Signature
    objects: dict[ObjectKey, Object] = field(default_factory=dict)
    errors: list[ConfigError] = field(default_factory=list)


def _parse_file(path: str, sig: Signature, previous: _FileResult | None) -> _FileResult:
    old = previous.objects if previous else {}
    result = _FileResult(sig)
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


def _message(exc: ConfigError) -> str:
    """The bare message of a ConfigError (without its "source, object, field: " prefix)."""
    prefix = str(ConfigError("", source=exc.source, obj=exc.obj, field=exc.field))
    return str(exc)[len(prefix):] if str(exc).startswith(prefix) else str(exc)


def _assemble(files: Mapping[str, _FileResult], trust_domain: str) -> tuple[ClusterState, list[ConfigError]]:
    """Merges per-file objects into one valid state, dropping each object that fails validation."""
    errors: list[ConfigError] = []
    objects: dict[ObjectKey, Object] = {}
    origin: dict[ObjectKey, str] = {}
    for path in sorted(files):
        errors.extend(files[path].errors)
        for key, obj in files[path].objects.items():
            if key in objects:
                errors.append(ConfigError(f"is also defined in {origin[key]}; the first definition wins", source=path, obj=describe(key)))
                continue
            objects[key], origin[key] = obj, path
    empty = ClusterState(trust_domain=trust_domain)
    while True:
        try:
            return empty.apply(objects.values()), errors
        except ConfigError as exc:
            # Cross-object checks name the offender: reject just that object and try the rest.
            bad = next((k for k in objects if describe(k) == exc.obj), None)
            if bad is None:
                raise
            errors.append(ConfigError(_message(exc), source=origin[bad], obj=exc.obj, field=exc.field))
            del objects[bad]


def _scan(path: str) -> dict[str, Signature]:
    out = {}
    with os.scandir(path) as it:
        for e in it:
            if e.name.endswith(_SUFFIXES) and not e.name.startswith(".") and e.is_file():
                st = e.stat()
                out[e.path] = (st.st_mtime_ns, st.st_size, st.st_ino)
    return out


class RejectionLog:
    """The rejected objects of a source (file or Kubernetes): each distinct problem is logged and
    counted once, while it lasts; `errors` is what the current state leaves out."""

    def __init__(self) -> None:
        self._known_errors: set[str] = set()
        self.errors_total = 0  # rejected files/objects, each counted once per distinct problem
        self.errors: list[ConfigError] = []  # the problems in the current contents

    def _report(self, errors: list[ConfigError]) -> None:
        self.errors = errors
        current = {str(e) for e in errors}
        for e in errors:
            if str(e) not in self._known_errors:
                log.error("rejected: %s", e)
                self.errors_total += 1
        self._known_errors = current


class DirSource(RejectionLog):
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
        self.path, self.trust_domain, self.interval = path, trust_domain, interval
        self._on_state = on_state
        super().__init__()
        self._files: dict[str, _FileResult] = {}
        self.state: ClusterState | None = None

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
        state, errors = _assemble(self._files, self.trust_domain)
        self._report(errors)
        if state == self.state:
            return False
        self.state = state
        self._on_state(state)
        return True

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
    return _assemble(files, trust_domain)


def load_dir(path: str, trust_domain: str = DEFAULT_TRUST_DOMAIN) -> ClusterState:
    """Like read_dir, logging each rejected file or object instead of returning them."""
    state, errors = read_dir(path, trust_domain)
    for e in errors:
        log.error("rejected: %s", e)
    return state
