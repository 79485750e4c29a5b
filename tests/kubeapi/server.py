"""An API test server: a real HTTP/1.1 server on 127.0.0.1 speaking the kube-apiserver's list/watch
protocol for the resources nodemesh reads, so the real `kubernetes` client can be driven against it.

It is a TEST DOUBLE, honest about what the controller relies on and nothing more:
- one global, increasing resourceVersion; objects get uid, generation (bumped on spec change),
  creationTimestamp; list responses carry the list's resourceVersion; built-in kinds' list items
  carry no apiVersion/kind (as the real server's), custom resources' do;
- label selectors (=, ==, !=, in, notin, exists, !key) and field selectors (metadata.name,
  metadata.namespace, spec.nodeName, status.phase), also on watches: an object that stops
  matching arrives as DELETED, one that starts matching as ADDED (as the real server does);
- `limit`/`continue` paging of lists;
- `?watch=1` as a chunked stream of JSON lines, ADDED/MODIFIED/DELETED/BOOKMARK/ERROR, replayed from
  a bounded event history: a resourceVersion older than the history gets an ERROR event with a
  410 Gone Status ("too old resource version"), like an etcd compaction; `timeoutSeconds`;
  `allowWatchBookmarks` (a BOOKMARK every `bookmark_interval` and before a timeout ends);
- create (409 AlreadyExists), update (409 Conflict on a stale metadata.resourceVersion), delete
  (404), get; every error is a `Status` body;
- bearer-token authentication (401) and TokenReview (audiences, user, extra);
- fault injection: fail the next N requests with a status (429 with Retry-After, 500, 403...),
  drop every open watch stream mid-chunk, force the next watches to 410, compact the history.

Not implemented (and so untested by it): admission, defaulting, CEL/OpenAPI validation of writes,
RBAC enforcement, server-side apply, protobuf, field managers, finalizers, watch-list streaming.
"""

from __future__ import annotations

import base64
import copy
import json
import re
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit


@dataclass(frozen=True)
class Resource:
    group: str  # "" for core
    version: str
    plural: str
    kind: str
    namespaced: bool
    builtin: bool = True

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version


RESOURCES = [
    Resource("", "v1", "namespaces", "Namespace", False),
    Resource("", "v1", "nodes", "Node", False),
    Resource("", "v1", "pods", "Pod", True),
    Resource("", "v1", "services", "Service", True),
    Resource("", "v1", "serviceaccounts", "ServiceAccount", True),
    Resource("discovery.k8s.io", "v1", "endpointslices", "EndpointSlice", True),
    Resource("gateway.networking.k8s.io", "v1", "httproutes", "HTTPRoute", True, builtin=False),
    Resource("policy.nodemesh.io", "v1alpha1", "servers", "Server", True, builtin=False),
    Resource("policy.nodemesh.io", "v1alpha1", "authorizationpolicies", "AuthorizationPolicy", True, builtin=False),
    Resource("policy.nodemesh.io", "v1alpha1", "meshtlsauthentications", "MeshTLSAuthentication", True, builtin=False),
    Resource("policy.nodemesh.io", "v1alpha1", "networkauthentications", "NetworkAuthentication", True, builtin=False),
]
BY_KIND = {r.kind: r for r in RESOURCES}
_BY_PATH = {(r.group, r.version, r.plural): r for r in RESOURCES}


def status(code: int, reason: str, message: str, **details: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                            "message": message, "reason": reason, "code": code}
    if details:
        body["details"] = details
    return body


class ApiError(Exception):
    def __init__(self, code: int, reason: str, message: str, **details: Any) -> None:
        super().__init__(message)
        self.body = status(code, reason, message, **details)
        self.code = code


# --- selectors (pure) ------------------------------------------------------------------------

_SET_RE = re.compile(r"^\s*([^\s!=]+)\s+(in|notin)\s+\(([^)]*)\)\s*$")


def _split_selector(text: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    if cur.strip():
        parts.append(cur)
    return parts


def label_matcher(selector: str) -> Callable[[dict[str, str]], bool]:
    """A labelSelector as a predicate; raises ApiError(400) for syntax the real server refuses."""
    tests: list[Callable[[dict[str, str]], bool]] = []
    for term in _split_selector(selector or ""):
        t = term.strip()
        if m := _SET_RE.match(t):
            key, op, values = m.group(1), m.group(2), {v.strip() for v in m.group(3).split(",")}
            tests.append((lambda k, vs: lambda lb: lb.get(k) in vs)(key, values) if op == "in"
                         else (lambda k, vs: lambda lb: lb.get(k) not in vs)(key, values))
        elif "!=" in t:
            k, v = (s.strip() for s in t.split("!=", 1))
            tests.append((lambda k, v: lambda lb: lb.get(k) != v)(k, v))
        elif "=" in t:
            k, v = (s.strip() for s in t.replace("==", "=").split("=", 1))
            tests.append((lambda k, v: lambda lb: lb.get(k) == v)(k, v))
        elif t.startswith("!"):
            tests.append((lambda k: lambda lb: k not in lb)(t[1:].strip()))
        elif re.match(r"^[A-Za-z0-9./_-]+$", t):
            tests.append((lambda k: lambda lb: k in lb)(t))
        else:
            raise ApiError(400, "BadRequest", f"unable to parse requirement: {t!r}")
    return lambda labels: all(test(labels) for test in tests)


_FIELDS = {
    "metadata.name": lambda o: o["metadata"].get("name", ""),
    "metadata.namespace": lambda o: o["metadata"].get("namespace", ""),
    "spec.nodeName": lambda o: (o.get("spec") or {}).get("nodeName", ""),
    "status.phase": lambda o: (o.get("status") or {}).get("phase", ""),
}


def field_matcher(selector: str) -> Callable[[dict[str, Any]], bool]:
    tests = []
    for term in _split_selector(selector or ""):
        t = term.strip()
        neg = "!=" in t
        k, v = (s.strip() for s in (t.split("!=", 1) if neg else t.replace("==", "=").split("=", 1)))
        if k not in _FIELDS:
            raise ApiError(400, "BadRequest", f'field label not supported: {k}')
        get = _FIELDS[k]
        tests.append((lambda g, v, neg: lambda o: (g(o) != v) if neg else (g(o) == v))(get, v, neg))
    return lambda obj: all(test(obj) for test in tests)


# --- the store ------------------------------------------------------------------------------


@dataclass
class Event:
    rv: int
    resource: Resource
    type: str
    obj: dict[str, Any]


@dataclass
class _Fault:
    code: int
    remaining: int
    path_contains: str
    retry_after: int | None


@dataclass
class TokenInfo:
    username: str
    audiences: tuple[str, ...]
    uid: str = field(default_factory=lambda: str(uuid.uuid4()))
    extra: dict[str, list[str]] = field(default_factory=dict)


class Store:
    """Objects plus a bounded event history, guarded by one condition variable."""

    def __init__(self, history: int) -> None:
        self.cond = threading.Condition()
        self.rv = 100
        self.objects: dict[Resource, dict[tuple[str, str], dict[str, Any]]] = {r: {} for r in RESOURCES}
        self.history: deque[Event] = deque(maxlen=history)
        self.compacted_rv = self.rv  # events at or before this version are gone

    def _bump(self) -> int:
        self.rv += 1
        return self.rv

    def _record(self, res: Resource, type_: str, obj: dict[str, Any]) -> None:
        if len(self.history) == self.history.maxlen:
            self.compacted_rv = self.history[0].rv
        self.history.append(Event(self.rv, res, type_, copy.deepcopy(obj)))
        self.cond.notify_all()

    def create(self, res: Resource, obj: dict[str, Any]) -> dict[str, Any]:
        meta = obj.setdefault("metadata", {})
        key = (meta.get("namespace", "") if res.namespaced else "", meta.get("name", ""))
        if not key[1]:
            raise ApiError(422, "Invalid", f"{res.kind} is invalid: metadata.name: Required value")
        with self.cond:
            if key in self.objects[res]:
                raise ApiError(409, "AlreadyExists", f'{res.plural} "{key[1]}" already exists',
                               name=key[1], group=res.group, kind=res.plural)
            obj = copy.deepcopy(obj)
            obj.setdefault("apiVersion", res.api_version)
            obj.setdefault("kind", res.kind)
            meta = obj["metadata"]
            meta.update(uid=str(uuid.uuid4()), resourceVersion=str(self._bump()), generation=1,
                        creationTimestamp=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
            if not res.namespaced:
                meta.pop("namespace", None)
            self.objects[res][key] = obj
            self._record(res, "ADDED", obj)
            return copy.deepcopy(obj)

    def update(self, res: Resource, namespace: str, name: str, obj: dict[str, Any]) -> dict[str, Any]:
        with self.cond:
            old = self.objects[res].get((namespace, name))
            if old is None:
                raise ApiError(404, "NotFound", f'{res.plural} "{name}" not found', name=name, group=res.group, kind=res.plural)
            given = (obj.get("metadata") or {}).get("resourceVersion")
            if given and given != old["metadata"]["resourceVersion"]:
                raise ApiError(409, "Conflict", f'Operation cannot be fulfilled on {res.plural} "{name}": the object has been '
                               "modified; please apply your changes to the latest version and try again",
                               name=name, group=res.group, kind=res.plural)
            new = copy.deepcopy(obj)
            new.setdefault("apiVersion", res.api_version)
            new.setdefault("kind", res.kind)
            meta = new.setdefault("metadata", {})
            for k in ("uid", "creationTimestamp", "name"):
                meta[k] = old["metadata"][k]
            if res.namespaced:
                meta["namespace"] = namespace
            gen = old["metadata"]["generation"]
            meta["generation"] = gen + 1 if new.get("spec") != old.get("spec") else gen
            meta["resourceVersion"] = str(self._bump())
            self.objects[res][(namespace, name)] = new
            self._record(res, "MODIFIED", new)
            return copy.deepcopy(new)

    def delete(self, res: Resource, namespace: str, name: str) -> dict[str, Any]:
        with self.cond:
            old = self.objects[res].pop((namespace, name), None)
            if old is None:
                raise ApiError(404, "NotFound", f'{res.plural} "{name}" not found', name=name, group=res.group, kind=res.plural)
            old["metadata"]["resourceVersion"] = str(self._bump())
            self._record(res, "DELETED", old)
            return copy.deepcopy(old)

    def compact(self) -> None:
        """Forgets all history (an etcd compaction): every older resourceVersion now gets 410."""
        with self.cond:
            self.history.clear()
            self.compacted_rv = self.rv


# --- HTTP -----------------------------------------------------------------------------------


def _parse_path(path: str) -> tuple[Resource, str, str]:
    """-> (resource, namespace or "", name or ""); raises ApiError 404 for unknown paths."""
    parts = [p for p in path.split("/") if p]
    if parts[:2] == ["api", "v1"]:
        group, version, rest = "", "v1", parts[2:]
    elif parts[:1] == ["apis"] and len(parts) >= 3:
        group, version, rest = parts[1], parts[2], parts[3:]
    else:
        raise ApiError(404, "NotFound", "the server could not find the requested resource")
    ns = ""
    if len(rest) >= 3 and rest[0] == "namespaces":
        ns, rest = rest[1], rest[2:]
    if not rest or len(rest) > 2:
        raise ApiError(404, "NotFound", "the server could not find the requested resource")
    res = _BY_PATH.get((group, version, rest[0]))
    if res is None:
        raise ApiError(404, "NotFound", "the server could not find the requested resource")
    return res, ns, rest[1] if len(rest) == 2 else ""


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: "_HTTPServer"

    def log_message(self, *args: Any) -> None:  # quiet
        pass

    # Plumbing ------------------------------------------------------------------------------

    def _send_json(self, code: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> dict[str, Any]:
        n = int(self.headers.get("Content-Length") or 0)
        try:
            body = json.loads(self.rfile.read(n) or b"{}")
        except json.JSONDecodeError as exc:
            raise ApiError(400, "BadRequest", f"invalid JSON body: {exc}") from None
        if not isinstance(body, dict):
            raise ApiError(400, "BadRequest", "the body must be a JSON object")
        return body

    def _dispatch(self, method: str) -> None:
        api: KubeApiServer = self.server.api
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
        api.requests.append((method, url.path, query))
        try:
            fault = api._take_fault(url.path)
            if fault is not None:
                headers = {"Retry-After": str(fault.retry_after)} if fault.retry_after is not None else {}
                reason = {401: "Unauthorized", 403: "Forbidden", 429: "TooManyRequests", 500: "InternalError",
                          503: "ServiceUnavailable"}.get(fault.code, "InternalError")
                self._send_json(fault.code, status(fault.code, reason, f"injected fault: {reason}"), headers)
                return
            if api.token is not None and self.headers.get("Authorization") != f"Bearer {api.token}":
                raise ApiError(401, "Unauthorized", "Unauthorized")
            if url.path == "/apis/authentication.k8s.io/v1/tokenreviews" and method == "POST":
                self._send_json(201, api._token_review(self._body()))
                return
            res, ns, name = _parse_path(url.path)
            if method == "GET" and not name and query.get("watch") in ("1", "true"):
                self._watch(res, ns, query)
            elif method == "GET" and not name:
                self._send_json(200, api._list(res, ns, query))
            elif method == "GET":
                self._send_json(200, api._get(res, ns, name))
            elif method == "POST" and not name:
                body = self._body()
                if res.namespaced:
                    body.setdefault("metadata", {})["namespace"] = ns or body.get("metadata", {}).get("namespace", "default")
                self._send_json(201, api.store.create(res, body))
            elif method == "PUT" and name:
                self._send_json(200, api.store.update(res, ns, name, self._body()))
            elif method == "DELETE" and name:
                self._send_json(200, api.store.delete(res, ns, name))
            else:
                raise ApiError(405, "MethodNotAllowed", f"{method} is not supported on {url.path}")
        except ApiError as exc:
            self._send_json(exc.code, exc.body)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    # Watch ---------------------------------------------------------------------------------

    def _chunk(self, event: dict[str, Any]) -> None:
        data = json.dumps(event).encode() + b"\n"
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def _watch(self, res: Resource, ns: str, query: dict[str, str]) -> None:
        api: KubeApiServer = self.server.api
        store = api.store
        labels, fields = label_matcher(query.get("labelSelector", "")), field_matcher(query.get("fieldSelector", ""))
        bookmarks = query.get("allowWatchBookmarks") in ("true", "1")
        timeout = min(float(query.get("timeoutSeconds") or api.max_watch_seconds), api.max_watch_seconds)
        rv_text = query.get("resourceVersion", "")
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

        def visible(obj: dict[str, Any]) -> bool:
            return (not ns or obj["metadata"].get("namespace") == ns) and labels(obj["metadata"].get("labels") or {}) and fields(obj)

        me = threading.current_thread()
        with api._lock:
            api._watchers.add(me)
            my_drop_gen = api._drop_gen
        try:
            with store.cond:
                forced = api._forced_410 > 0
                if forced:
                    api._forced_410 -= 1
                if rv_text in ("", "0"):
                    # "any version": synthetic ADDED for what exists now, then live events.
                    pending = [{"type": "ADDED", "object": copy.deepcopy(o)}
                               for _, o in sorted(store.objects[res].items()) if visible(o)]
                    since = store.rv
                else:
                    try:
                        since = int(rv_text)
                    except ValueError:
                        raise ApiError(400, "BadRequest", f"invalid resourceVersion {rv_text!r}") from None
                    if forced or since < store.compacted_rv:
                        self._chunk({"type": "ERROR", "object": status(
                            410, "Expired", f"too old resource version: {since} ({store.compacted_rv + 1})")})
                        self.wfile.write(b"0\r\n\r\n")
                        return
                    pending = []
            deadline = time.monotonic() + timeout
            last_bookmark = time.monotonic()
            while True:
                for ev in pending:
                    self._chunk(ev)
                pending = []
                if api._drop_gen != my_drop_gen:
                    # Abort mid-stream: no terminating chunk, the socket just closes.
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True
                    return
                now = time.monotonic()
                if now >= deadline:
                    if bookmarks:
                        self._chunk(api._bookmark(res, since))
                    self.wfile.write(b"0\r\n\r\n")
                    self.wfile.flush()
                    return
                if bookmarks and now - last_bookmark >= api.bookmark_interval:
                    self._chunk(api._bookmark(res, since))
                    last_bookmark = now
                with store.cond:
                    if since < store.compacted_rv:  # we fell behind the bounded history
                        raise ApiError(410, "Expired", f"too old resource version: {since} ({store.compacted_rv + 1})")
                    new = [e for e in store.history if e.rv > since]
                    if not new:
                        store.cond.wait(min(0.05, max(0.0, deadline - now)))
                        new = [e for e in store.history if e.rv > since]
                    for e in new:
                        since = e.rv  # one global resourceVersion: other kinds' events advance it too
                        if e.resource is res:
                            pending.extend(api._translate(e, visible))
        except ApiError as exc:
            self._chunk({"type": "ERROR", "object": exc.body})
            self.wfile.write(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError, OSError):
            pass
        finally:
            with api._lock:
                api._watchers.discard(me)


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    api: "KubeApiServer"


class KubeApiServer:
    """Start with `start()` (or as a context manager); `url` is what the client's host is set to."""

    def __init__(self, history: int = 1000, token: str | None = "test-token", bookmark_interval: float = 0.5,
                 max_watch_seconds: float = 30.0) -> None:
        self.store = Store(history)
        self.token = token
        self.bookmark_interval = bookmark_interval
        self.max_watch_seconds = max_watch_seconds
        self.tokens: dict[str, TokenInfo] = {}  # TokenReview's view of service-account tokens
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self._lock = threading.Lock()
        self._faults: list[_Fault] = []
        self._forced_410 = 0
        self._drop_gen = 0
        self._watchers: set[threading.Thread] = set()
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None

    # Lifecycle ------------------------------------------------------------------------------

    def start(self) -> "KubeApiServer":
        self._httpd = _HTTPServer(("127.0.0.1", 0), _Handler)
        self._httpd.api = self
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="kube-api-test-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self.drop_watches()
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> "KubeApiServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    @property
    def url(self) -> str:
        assert self._httpd is not None
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    # Objects --------------------------------------------------------------------------------

    def _res(self, obj: dict[str, Any]) -> Resource:
        res = BY_KIND.get(obj.get("kind", ""))
        if res is None:
            raise KeyError(f"the test server does not serve kind {obj.get('kind')!r}")
        return res

    def create(self, obj: dict[str, Any]) -> dict[str, Any]:
        return self.store.create(self._res(obj), copy.deepcopy(obj))

    def apply(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Create or update (no resourceVersion check), like `kubectl apply` without the patch."""
        res = self._res(obj)
        ns = obj["metadata"].get("namespace", "default") if res.namespaced else ""
        if res.namespaced:
            obj = copy.deepcopy(obj)
            obj["metadata"]["namespace"] = ns
        if (ns, obj["metadata"]["name"]) in self.store.objects[res]:
            body = copy.deepcopy(obj)
            body["metadata"].pop("resourceVersion", None)
            return self.store.update(res, ns, obj["metadata"]["name"], body)
        return self.store.create(res, copy.deepcopy(obj))

    def delete(self, kind: str, namespace: str, name: str) -> dict[str, Any]:
        res = BY_KIND[kind]
        return self.store.delete(res, namespace if res.namespaced else "", name)

    def keys(self, kind: str) -> list[tuple[str, str]]:
        """(namespace, name) of every stored object of `kind`."""
        with self.store.cond:
            return sorted(self.store.objects[BY_KIND[kind]])

    # Faults ---------------------------------------------------------------------------------

    def fail_next(self, code: int, count: int = 1, path_contains: str = "", retry_after: int | None = None) -> None:
        with self._lock:
            self._faults.append(_Fault(code, count, path_contains, retry_after))

    def _take_fault(self, path: str) -> _Fault | None:
        with self._lock:
            for f in self._faults:
                if f.remaining > 0 and f.path_contains in path:
                    f.remaining -= 1
                    return f
        return None

    def force_410(self, watches: int = 1) -> None:
        """The next `watches` watch requests that name a resourceVersion get 410 Gone."""
        with self.store.cond:
            self._forced_410 += watches

    def drop_watches(self) -> None:
        """Every open watch stream is cut mid-stream (no terminating chunk), as by a dying LB."""
        with self._lock:
            self._drop_gen += 1
        with self.store.cond:
            self.store.cond.notify_all()

    def compact(self) -> None:
        self.store.compact()

    def watch_count(self) -> int:
        with self._lock:
            return len(self._watchers)

    # Handlers -------------------------------------------------------------------------------

    def _bookmark(self, res: Resource, rv: int) -> dict[str, Any]:
        return {"type": "BOOKMARK", "object": {"kind": res.kind, "apiVersion": res.api_version,
                                                "metadata": {"resourceVersion": str(rv)}}}

    def _translate(self, e: Event, visible: Callable[[dict[str, Any]], bool]) -> list[dict[str, Any]]:
        """One stored event as the watcher sees it through its selectors."""
        now = visible(e.obj)
        if e.type != "MODIFIED":
            return [{"type": e.type, "object": copy.deepcopy(e.obj)}] if now else []
        before = next((h.obj for h in reversed(self.store.history)
                       if h.resource is e.resource and h.rv < e.rv and h.obj["metadata"]["name"] == e.obj["metadata"]["name"]
                       and h.obj["metadata"].get("namespace") == e.obj["metadata"].get("namespace")), None)
        was = visible(before) if before is not None else now  # no older version kept: assume unchanged
        if now and was:
            return [{"type": "MODIFIED", "object": copy.deepcopy(e.obj)}]
        if now:
            return [{"type": "ADDED", "object": copy.deepcopy(e.obj)}]
        if was:
            return [{"type": "DELETED", "object": copy.deepcopy(e.obj)}]
        return []

    def _list(self, res: Resource, ns: str, query: dict[str, str]) -> dict[str, Any]:
        labels, fields = label_matcher(query.get("labelSelector", "")), field_matcher(query.get("fieldSelector", ""))
        with self.store.cond:
            items = [copy.deepcopy(o) for _, o in sorted(self.store.objects[res].items())
                     if (not ns or o["metadata"].get("namespace") == ns)
                     and labels(o["metadata"].get("labels") or {}) and fields(o)]
            rv = self.store.rv
        start = 0
        if query.get("continue"):
            try:
                token = json.loads(base64.urlsafe_b64decode(query["continue"]))
                start, rv = int(token["start"]), int(token["rv"])
            except (ValueError, KeyError, TypeError):
                raise ApiError(400, "BadRequest", "invalid continue token") from None
        meta: dict[str, Any] = {"resourceVersion": str(rv)}
        limit = int(query.get("limit") or 0)
        if limit and start + limit < len(items):
            meta["continue"] = base64.urlsafe_b64encode(json.dumps({"start": start + limit, "rv": rv}).encode()).decode()
            meta["remainingItemCount"] = len(items) - start - limit
            items = items[start:start + limit]
        else:
            items = items[start:]
        if res.builtin:  # the real server leaves these off the items of built-in lists
            for o in items:
                o.pop("apiVersion", None)
                o.pop("kind", None)
        return {"kind": f"{res.kind}List", "apiVersion": res.api_version, "metadata": meta, "items": items}

    def _get(self, res: Resource, ns: str, name: str) -> dict[str, Any]:
        with self.store.cond:
            obj = self.store.objects[res].get((ns if res.namespaced else "", name))
        if obj is None:
            raise ApiError(404, "NotFound", f'{res.plural} "{name}" not found', name=name, group=res.group, kind=res.plural)
        return copy.deepcopy(obj)

    def _token_review(self, body: dict[str, Any]) -> dict[str, Any]:
        if body.get("kind", "TokenReview") != "TokenReview":  # like the real server, a missing kind defaults from the URL
            raise ApiError(400, "BadRequest", "the body must be a TokenReview")
        spec = body.get("spec") or {}
        token, wanted = spec.get("token"), spec.get("audiences") or []
        info = self.tokens.get(token or "")
        out: dict[str, Any] = {"authenticated": False}
        if info is None:
            out["error"] = "[invalid bearer token, token lookup failed]"
        else:
            aud = [a for a in wanted if a in info.audiences] if wanted else list(info.audiences)
            if wanted and not aud:
                out["error"] = "[invalid bearer token, token audiences is invalid]"
            else:
                out = {"authenticated": True, "audiences": aud,
                       "user": {"username": info.username, "uid": info.uid,
                                "groups": ["system:serviceaccounts", f"system:serviceaccounts:{info.username.split(':')[2]}",
                                           "system:authenticated"],
                                "extra": info.extra}}
        return {"kind": "TokenReview", "apiVersion": "authentication.k8s.io/v1", "metadata": {"creationTimestamp": None},
                "spec": spec, "status": out}

    def add_service_account_token(self, token: str, namespace: str, service_account: str, audiences: Iterable[str],
                                  pod: str | None = None, node: str | None = None) -> None:
        """A projected token as the kubelet would mint it (pod- and node-bound claims in extra)."""
        extra: dict[str, list[str]] = {}
        if pod:
            extra["authentication.kubernetes.io/pod-name"] = [pod]
            extra["authentication.kubernetes.io/pod-uid"] = [str(uuid.uuid4())]
        if node:
            extra["authentication.kubernetes.io/node-name"] = [node]
        self.tokens[token] = TokenInfo(f"system:serviceaccount:{namespace}:{service_account}", tuple(audiences), extra=extra)
