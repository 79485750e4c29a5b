"""The Kubernetes cluster-state source: list + watch through the `kubernetes` client.

One reflector thread per kind (the client is synchronous) lists, then watches from the list's
resourceVersion with bookmarks, resumes from the last version it saw when a stream ends or drops,
relists on 410 Gone, and backs off (exponential, jittered, honouring Retry-After) on API errors.
Reflectors only record raw objects; the event loop turns them into one `ClusterState` with the
same rules as the standalone source: a malformed resource only rejects itself, an invalid update
keeps the object's last good version, and the controller keeps serving the last good state while
the API is unreachable. The first state is delivered once every kind has been listed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import threading
from collections.abc import Callable
from functools import partial
from typing import Any

import urllib3
from kubernetes import client as k8s
from kubernetes import watch as k8s_watch
from kubernetes.client.rest import ApiException

from nodemesh.errors import ConfigError
from nodemesh.model import DEFAULT_TRUST_DOMAIN, SUPPORTED_KINDS, ClusterState, Object, ObjectKey, key_of, parse_object

from nodemesh.controller.state_merge import SourceObjects, StateSource
from nodemesh.controller.k8s_resources import WatchedKind, admit, raw_key, watched_kinds

log = logging.getLogger(__name__)

WATCH_SECONDS = 300  # the server ends each watch after this; we resume from the last version
LIST_PAGE = 500


def make_api_client(kubeconfig: str | None = None) -> k8s.ApiClient:
    """In-cluster config (the controller's service account) or a kubeconfig for running outside."""
    from kubernetes import config

    if kubeconfig is None:
        try:
            config.load_incluster_config()
            return k8s.ApiClient()
        except config.ConfigException:
            pass
    try:
        config.load_kube_config(config_file=kubeconfig)
    except (config.ConfigException, OSError) as exc:
        raise ConfigError(f"no Kubernetes API access: not in a cluster and no usable kubeconfig ({exc})") from None
    return k8s.ApiClient()


def list_function(api: k8s.ApiClient, wk: WatchedKind) -> Callable[..., Any]:
    """The client's list call for a kind, across all namespaces."""
    if wk.group == "":
        core = k8s.CoreV1Api(api)
        return getattr(core, f"list_{_snake(wk.kind)}" if not wk.namespaced else f"list_{_snake(wk.kind)}_for_all_namespaces")
    if wk.group == "discovery.k8s.io":
        return k8s.DiscoveryV1Api(api).list_endpoint_slice_for_all_namespaces
    return partial(k8s.CustomObjectsApi(api).list_cluster_custom_object, wk.group, wk.version, wk.plural)


def _snake(kind: str) -> str:
    return "".join("_" + c.lower() if c.isupper() else c for c in kind).lstrip("_")


class Backoff:
    """Exponential with full jitter, reset after a success."""

    def __init__(self, base: float = 0.2, cap: float = 30.0, rng: random.Random | None = None) -> None:
        self.base, self.cap, self.attempt = base, cap, 0
        self.rng = rng or random.Random()

    def next(self, retry_after: float | None = None) -> float:
        self.attempt += 1
        delay = self.rng.uniform(self.base, min(self.cap, self.base * 2 ** self.attempt))
        return max(delay, min(retry_after, self.cap)) if retry_after else delay

    def reset(self) -> None:
        self.attempt = 0


class _Gone(Exception):
    """The API server no longer has the history we asked for: relist."""


class Reflector:
    """Keeps one kind's raw objects in step with the API server (runs in its own thread)."""

    def __init__(self, wk: WatchedKind, list_fn: Callable[..., Any], sink: "KubeSource",
                 watch_seconds: int = WATCH_SECONDS, backoff: Backoff | None = None) -> None:
        self.wk, self.list_fn, self.sink = wk, list_fn, sink
        self.watch_seconds = watch_seconds
        self.backoff = backoff or Backoff()
        self.resource_version: str | None = None
        self.relists = 0  # lists after the first (410 Gone, or recovering from an error)
        self.errors = 0
        self._stop = threading.Event()
        self._watch: k8s_watch.Watch | None = None

    def stop(self) -> None:
        self._stop.set()
        w = self._watch
        if w is not None:
            w.stop()  # shuts the socket down so a blocked read returns now

    def run(self) -> None:
        while not self._stop.is_set():
            try:
                if self.resource_version is None:
                    self._list()
                self._watch_once()
                self.backoff.reset()
            except _Gone as exc:
                log.info("%s: %s; relisting", self.wk.kind, exc)
                self.resource_version = None
            except ApiException as exc:
                if exc.status == 410:
                    log.info("%s: resourceVersion %s expired (410 Gone); relisting", self.wk.kind, self.resource_version)
                    self.resource_version = None
                    continue
                self._failed(_api_reason(exc), _retry_after(exc))
            except (urllib3.exceptions.HTTPError, OSError, ValueError) as exc:
                if self._stop.is_set():
                    return
                self._failed(f"connection to the API server failed: {exc}", None)

    def _failed(self, reason: str, retry_after: float | None) -> None:
        self.errors += 1
        delay = self.backoff.next(retry_after)
        log.warning("%s: %s; retrying in %.1fs, serving the last good state meanwhile", self.wk.kind, reason, delay)
        self._stop.wait(delay)

    def _list(self) -> None:
        items: dict[tuple[str, str], dict[str, Any]] = {}
        token = None
        while True:
            kwargs: dict[str, Any] = {"limit": LIST_PAGE, "_preload_content": False, "_request_timeout": 60}
            if token:
                kwargs["_continue"] = token
            resp = self.list_fn(**kwargs)
            try:
                body = json.loads(resp.data)
            finally:
                resp.release_conn()
            for obj in body.get("items") or []:
                items[raw_key(self.wk, obj)] = obj
            token = (body.get("metadata") or {}).get("continue")
            if not token:
                break
        if self.sink.synced(self.wk.kind):
            self.relists += 1
        self.resource_version = str((body.get("metadata") or {}).get("resourceVersion") or "") or None
        self.sink.replace(self.wk, items)

    def _watch_once(self) -> None:
        """One watch request, from the last version seen; returns when the server ends it."""
        w = k8s_watch.Watch(return_type="object")  # raw dicts: the model parses API-shaped data
        self._watch = w
        if self._stop.is_set():
            return
        try:
            for event in w.stream(self.list_fn, resource_version=self.resource_version, allow_watch_bookmarks=True,
                                  timeout_seconds=self.watch_seconds, _request_timeout=self.watch_seconds + 30):
                kind, obj = event["type"], event["raw_object"]
                rv = ((obj or {}).get("metadata") or {}).get("resourceVersion")
                if kind == "BOOKMARK":
                    pass  # only moves our position forward
                elif kind in ("ADDED", "MODIFIED"):
                    self.sink.upsert(self.wk, obj)
                elif kind == "DELETED":
                    self.sink.remove(self.wk, obj)
                else:
                    log.warning("%s: unexpected watch event %r ignored", self.wk.kind, kind)
                if rv:
                    self.resource_version = rv
                if self._stop.is_set():
                    break
        finally:
            self._watch = None


def _api_reason(exc: ApiException) -> str:
    message = exc.reason or ""
    try:
        message = json.loads(exc.body or "{}").get("message") or message
    except (ValueError, AttributeError):
        pass
    hint = {401: " (the controller's credentials were refused)",
            403: " (RBAC: the controller's ClusterRole must allow list and watch; see deploy/)"}.get(exc.status or 0, "")
    return f"API error {exc.status}: {message}{hint}"


def _retry_after(exc: ApiException) -> float | None:
    try:
        value = (exc.headers or {}).get("Retry-After")
        return float(value) if value is not None else None
    except (TypeError, ValueError):
        return None


class KubeSource(StateSource):
    """Feeds `on_state` with the cluster state the API server describes (same contract as DirSource)."""

    def __init__(self, api: k8s.ApiClient, on_state: Callable[[ClusterState], Any],
                 trust_domain: str = DEFAULT_TRUST_DOMAIN, watch_seconds: int = WATCH_SECONDS,
                 kinds: tuple[WatchedKind, ...] | None = None, backoff: Callable[[], Backoff] = Backoff) -> None:
        super().__init__(on_state, trust_domain)
        self.api = api
        self.kinds = kinds if kinds is not None else watched_kinds(SUPPORTED_KINDS)
        self.reflectors = [Reflector(wk, list_function(api, wk), self, watch_seconds, backoff()) for wk in self.kinds]
        self._lock = threading.Lock()
        self._raw: dict[str, dict[tuple[str, str], dict[str, Any]]] = {}  # kind -> key -> raw object
        self._dirty = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._parsed: dict[str, dict[tuple[str, str], tuple[str, Object | None, ConfigError | None]]] = {}
        self._last_good: dict[ObjectKey, Object] = {}
        self._threads: list[threading.Thread] = []
        self._wakeup = asyncio.Event()

    # Reflector side (any thread) -----------------------------------------------------------

    def synced(self, kind: str) -> bool:
        with self._lock:
            return kind in self._raw

    def replace(self, wk: WatchedKind, items: dict[tuple[str, str], dict[str, Any]]) -> None:
        with self._lock:
            self._raw[wk.kind] = items
        self._changed()

    def upsert(self, wk: WatchedKind, obj: dict[str, Any]) -> None:
        with self._lock:
            self._raw.setdefault(wk.kind, {})[raw_key(wk, obj)] = obj
        self._changed()

    def remove(self, wk: WatchedKind, obj: dict[str, Any]) -> None:
        with self._lock:
            self._raw.setdefault(wk.kind, {}).pop(raw_key(wk, obj), None)
        self._changed()

    def _changed(self) -> None:
        with self._lock:
            if self._dirty:
                return  # a rebuild is already scheduled: it will see this change too
            self._dirty = True
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._wakeup.set)

    # Event-loop side ------------------------------------------------------------------------

    def rebuild(self) -> bool:
        """Builds the state from the raw objects; returns True if a new state was delivered."""
        with self._lock:
            self._dirty = False
            if any(wk.kind not in self._raw for wk in self.kinds):
                return False  # not every kind listed yet: a partial state would drop workloads
            raw = {k: dict(v) for k, v in self._raw.items()}
        results: dict[str, SourceObjects] = {}
        for wk in self.kinds:
            source = f"kubernetes {wk.plural}"
            res = results[source] = SourceObjects()
            cache = self._parsed.setdefault(wk.kind, {})
            for key in set(cache) - set(raw[wk.kind]):
                del cache[key]
            for key, obj in raw[wk.kind].items():
                rv = str((obj.get("metadata") or {}).get("resourceVersion", ""))
                hit = cache.get(key)
                if hit is None or hit[0] != rv:
                    hit = cache[key] = (rv, *self._parse(wk, obj, source))
                _, parsed, error = hit
                if error is not None:
                    res.errors.append(error)
                    old = self._last_good.get((wk.kind, *key))
                    if old is not None:  # an invalid update keeps the last good version
                        res.objects[key_of(old)] = old
                elif parsed is not None:
                    res.objects[key_of(parsed)] = parsed
        delivered = self._publish(results)
        assert self.state is not None
        self._last_good = dict(self.state.objects)  # the merged state (an equal one if unchanged)
        return delivered

    def _parse(self, wk: WatchedKind, obj: dict[str, Any], source: str) -> tuple[Object | None, ConfigError | None]:
        doc, why = admit(wk, obj)
        if doc is None:
            log.debug("%s %s skipped: %s", wk.kind, raw_key(wk, obj), why)
            return None, None
        try:
            return parse_object(doc, source), None
        except ConfigError as exc:
            return None, exc

    def start_threads(self) -> None:
        for r in self.reflectors:
            t = threading.Thread(target=r.run, name=f"k8s-{r.wk.plural}", daemon=True)
            t.start()
            self._threads.append(t)

    def stop_threads(self, timeout: float = 5.0) -> None:
        for r in self.reflectors:
            r.stop()
        for t in self._threads:
            t.join(timeout)
        self._threads = []

    async def run(self) -> None:
        """Watches until cancelled."""
        self._loop = asyncio.get_running_loop()
        self._wakeup = asyncio.Event()
        self.start_threads()
        try:
            while True:
                await self._wakeup.wait()
                self._wakeup.clear()
                try:
                    self.rebuild()
                except Exception:  # never let one bad batch stop the source (static stability)
                    log.exception("building the cluster state failed; keeping the last good state")
        finally:
            await asyncio.to_thread(self.stop_threads)

    @property
    def relists(self) -> int:
        return sum(r.relists for r in self.reflectors)

    @property
    def api_errors(self) -> int:
        return sum(r.errors for r in self.reflectors)
