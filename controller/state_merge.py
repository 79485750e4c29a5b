"""One cluster state from several sources' objects, shared by the file and Kubernetes sources:
a malformed or conflicting object rejects itself only (ztunnel's rule), and each rejection is
logged and counted once while it lasts."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from nodemesh.errors import ConfigError
from nodemesh.model import ClusterState, Object, ObjectKey, describe

log = logging.getLogger(__name__)

Signature = tuple[int, int, int]  # (mtime_ns, size, inode): inode catches write-and-rename saves


@dataclass
class SourceObjects:
    """What one source (a file, a Kubernetes resource kind) contributes: objects and rejections."""

    signature: Signature = (0, 0, 0)
    objects: dict[ObjectKey, Object] = field(default_factory=dict)
    errors: list[ConfigError] = field(default_factory=list)


def _message(exc: ConfigError) -> str:
    """The bare message of a ConfigError (without its "source, object, field: " prefix)."""
    prefix = str(ConfigError("", source=exc.source, obj=exc.obj, field=exc.field))
    return str(exc)[len(prefix):] if str(exc).startswith(prefix) else str(exc)


def merge_sources(files: Mapping[str, SourceObjects], trust_domain: str) -> tuple[ClusterState, list[ConfigError]]:
    """Merges per-source objects into one valid state, dropping each object that fails validation
    (the first source, by name, to define an object wins)."""
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


class StateSource:
    """The shared half of the file and Kubernetes sources: their parts merged into one valid state,
    each new state handed to `on_state`, and each distinct rejection logged and counted once, while
    it lasts (`errors` is what the current state leaves out)."""

    def __init__(self, on_state: Callable[[ClusterState], Any], trust_domain: str) -> None:
        self._on_state = on_state
        self.trust_domain = trust_domain
        self.state: ClusterState | None = None
        self._known_errors: set[str] = set()
        self.errors_total = 0  # rejected files/objects, each counted once per distinct problem
        self.errors: list[ConfigError] = []  # the problems in the current contents

    def _publish(self, sources: Mapping[str, SourceObjects]) -> bool:
        """Merges `sources`, reports what was rejected, and hands on the state if it changed
        (returns True then)."""
        state, errors = merge_sources(sources, self.trust_domain)
        self._report(errors)
        if state == self.state:
            return False
        self.state = state
        self._on_state(state)
        return True

    def _report(self, errors: list[ConfigError]) -> None:
        self.errors = errors
        current = {str(e) for e in errors}
        for e in errors:
            if str(e) not in self._known_errors:
                log.error("rejected: %s", e)
                self.errors_total += 1
        self._known_errors = current
