from collections.abc import Mapping, Sequence
from typing import Any

class RouteMatcher:
    """HTTPRoute rules per (namespace, service, port) in precedence order; port 0 = every port.
    Rules are the caller's objects (agent/routes.Rule): `match` returns one of them."""

    def __init__(self, rules_by_parent: Mapping[tuple[str, str, int], Sequence[Any]]) -> None: ...
    def match(self, namespace: str, service: str, port: int, method: bytes, path: str, headers: dict[bytes, bytes]) -> Any | None: ...
