"""Errors a user can hit. Each message says what is wrong and, where it can, what to do next."""

from __future__ import annotations


class NodemeshError(Exception):
    """Base for errors shown to users as one clear sentence (the CLI prints them without a trace)."""

    exit_code = 1


class ConfigError(NodemeshError):
    """Invalid cluster-state YAML: names the file, the object and the field."""

    exit_code = 2

    def __init__(self, message: str, *, source: str = "", obj: str = "", field: str = "") -> None:
        self.source, self.obj, self.field = source, obj, field
        where = ", ".join(p for p in (source, obj, f"field {field}" if field else "") if p)
        super().__init__(f"{where}: {message}" if where else message)


class PreflightError(NodemeshError):
    """The machine lacks something nodemesh needs (root, cgroup v2, BPF, bcc)."""

    exit_code = 3


class LabError(NodemeshError):
    """The standalone lab cannot do what was asked (already up, not up, pod unknown...)."""

    exit_code = 4


class ProtocolError(NodemeshError):
    """A peer sent bytes that break a nodemesh protocol (stream framing, tunnel handshake)."""
