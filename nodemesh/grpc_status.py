"""gRPC status codes (grpc/doc/statuscodes.md): names, the `retry.linkerd.io/grpc` annotation form,
the value of a `grpc-status` header, and the status a proxy-made HTTP error maps to
(grpc/doc/http-grpc-status-mapping.md). Pure functions, shared by the route model and the proxy."""

from __future__ import annotations

from collections.abc import Iterable

OK, CANCELLED, UNKNOWN, DEADLINE_EXCEEDED, PERMISSION_DENIED, INTERNAL, UNAVAILABLE = 0, 1, 2, 4, 7, 13, 14
NAMES = (
    "ok", "cancelled", "unknown", "invalid-argument", "deadline-exceeded", "not-found", "already-exists",
    "permission-denied", "resource-exhausted", "failed-precondition", "aborted", "out-of-range",
    "unimplemented", "internal", "unavailable", "data-loss", "unauthenticated",
)
MAX_CODE = len(NAMES) - 1  # 16
_BY_NAME = {n: i for i, n in enumerate(NAMES)}


def retry_codes(value: str) -> frozenset[int]:
    """`retry.linkerd.io/grpc` value ("unavailable,internal", names in kebab or SCREAMING_SNAKE case,
    or numbers 1-16) → codes. ValueError names the bad item; OK is never a retry condition."""
    codes: set[int] = set()
    for item in (s.strip() for s in value.split(",")):
        if not item:
            continue
        key = item.lower().replace("_", "-")
        code = int(key) if key.isdigit() else _BY_NAME.get(key)
        if code is None or not 1 <= code <= MAX_CODE:
            raise ValueError(f"gRPC retry condition {item!r} is not a gRPC status name (e.g. unavailable) or code 1-16")
        codes.add(code)
    if not codes:
        raise ValueError("gRPC retry conditions are empty")
    return frozenset(codes)


def status_of(headers: Iterable[tuple[bytes, bytes]]) -> int | None:
    """The `grpc-status` in a header block, None when absent. A value that is not a code 0-16 counts
    as UNKNOWN, as gRPC clients treat it."""
    for name, value in headers:
        if name == b"grpc-status":
            v = value.strip()
            return int(v) if v.isdigit() and int(v) <= MAX_CODE else UNKNOWN
    return None


def for_http_status(status: int) -> int:
    """The gRPC code a client infers from an HTTP status without grpc-status (the mapping doc)."""
    return {400: INTERNAL, 401: 16, 403: PERMISSION_DENIED, 404: 12, 429: UNAVAILABLE, 502: UNAVAILABLE,
            503: UNAVAILABLE, 504: UNAVAILABLE}.get(status, UNKNOWN)


def is_failure(code: int) -> bool:
    """Linkerd's classification of a gRPC response: anything but OK is a failure."""
    return code != OK
