"""How the controller knows which node an agent runs on, before it streams config or signs CSRs.

`AgentAuthenticator` is the interface the config stream / identity service calls with the node an
agent claims and the token it presents; it returns the verified node or raises `AgentAuthRefused`
(with a `reason` usable as a metrics label). Two implementations:

- `StaticTokens`: the lab's per-node bootstrap tokens (a JSON file written by `nodemesh lab up`);
- `TokenReviewAuthenticator`: in Kubernetes. The agent presents its projected service-account token
  (audience `nodemesh-controller`, see deploy/); the controller asks the API server (TokenReview)
  whether it is valid *for that audience*, that it belongs to the agent's service account, and on
  which node the token's pod runs: the kubelet binds node-name (1.30+) and pod-name claims into
  the token, which TokenReview returns in `user.extra`. A node is never taken from the agent's
  word: a token from node A claiming node B is refused.

The signing rule that follows is unchanged from the lab: a node gets workload certificates only
for pods whose spec.nodeName is that node (controller/csr_policy.allowed_identities).

"Single use" of bootstrap tokens (controller/identity_service.py) is spelled by each authenticator's
`bootstrap_key`: a bootstrap spends that key, and a second bootstrap with the same key is refused
as `reused_token`.

- Static tokens: the key is the node. One token per node, fixed for the controller's life, so once
  a node holds a certificate it renews with it; bootstrapping again needs a new token (restart).
- Projected tokens: the kubelet hands the agent a fresh token on every pod start and rotates it
  before it expires (at 80% of expirationSeconds), and the *same* token may legitimately be shown
  many times (every reconnect of a plaintext stream). So the key is the token itself (its
  SHA-256): one token value bootstraps once, and a replay of a token that already bootstrapped is
  refused; a restarted agent pod, or the next rotated token, bootstraps again. The key is
  remembered until the token's own `exp` (after that the API server refuses it anyway), so the
  memory stays bounded. Two limits, by design: the record is per controller replica (with HA a
  replay to the other replica is accepted once), and a replay can only get a certificate for the
  node the token is bound to: the node binding, not the reuse check, is what keeps nodes apart.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

from nodemesh.errors import NodemeshError
from nodemesh.model import ClusterState

if TYPE_CHECKING:  # the kubernetes client is imported only where TokenReview is used (not in the lab)
    from kubernetes import client as k8s

log = logging.getLogger(__name__)

NODE_NAME_CLAIM = "authentication.kubernetes.io/node-name"
POD_NAME_CLAIM = "authentication.kubernetes.io/pod-name"
SPENT_TOKEN_TTL = 24 * 3600.0  # how long a spent token is remembered when it carries no readable exp
REASONS = ("bad_request", "unknown_node", "bad_token", "wrong_audience", "not_agent", "wrong_node", "api_unavailable")


class AgentAuthRefused(NodemeshError):
    def __init__(self, reason: str, message: str) -> None:
        assert reason in REASONS, reason
        super().__init__(message)
        self.reason = reason


class AgentAuthenticator(Protocol):
    async def authenticate(self, node: str, token: str) -> str:
        """The verified node name; raises AgentAuthRefused."""
        ...

    def bootstrap_key(self, node: str, token: str) -> tuple[str, float | None]:
        """What a bootstrap with this (authenticated) token spends, and until when (epoch seconds;
        None = for the controller's life) a second bootstrap with it counts as reused."""
        ...


def jwt_expiry(token: str) -> float | None:
    """The `exp` claim of a JWT, read without verifying it (only ever called on a token the API
    server has just authenticated), or None if it is not a readable JWT."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        payload = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (ValueError, UnicodeDecodeError):
        return None
    exp = payload.get("exp") if isinstance(payload, dict) else None
    return float(exp) if isinstance(exp, (int, float)) and not isinstance(exp, bool) else None


class StaticTokens:
    def __init__(self, tokens: Mapping[str, str]) -> None:
        self.tokens = dict(tokens)

    async def authenticate(self, node: str, token: str) -> str:
        expected = self.tokens.get(node)
        # compare_digest even for unknown nodes, so timing says nothing about the token
        ok = hmac.compare_digest((expected or "\0").encode(), token.encode())
        if expected is None:
            raise AgentAuthRefused("unknown_node", f"unknown node {node!r}: the controller has no bootstrap token for it")
        if not ok:
            raise AgentAuthRefused("bad_token", f"bad bootstrap token for node {node!r}: use the token issued for this node")
        return node

    def bootstrap_key(self, node: str, token: str) -> tuple[str, float | None]:
        return f"node:{node}", None  # one token per node: spent for good


def check_review(status: Mapping[str, Any], node: str, audience: str, agent_user: str,
                 pod_node: Callable[[str], str | None]) -> str:
    """The pure rule: a TokenReview status (as the API returns it) -> the verified node, or refused.

    `pod_node(pod_name)` looks up where the agent's own pod is scheduled, for API servers older than
    1.30 that bind only the pod name into the token.
    """
    if not status.get("authenticated"):
        err = status.get("error") or "token not authenticated"
        reason = "wrong_audience" if "audience" in err else "bad_token"
        raise AgentAuthRefused(reason, f"the API server refused the token of node {node!r}: {err}")
    audiences = status.get("audiences")
    if audiences is not None and audience not in audiences:
        raise AgentAuthRefused("wrong_audience", f"node {node!r}'s token is not for audience {audience!r} (it is for {audiences})")
    user = status.get("user") or {}
    if user.get("username") != agent_user:
        raise AgentAuthRefused("not_agent", f"the token belongs to {user.get('username')!r}, not the agent's service account {agent_user!r}")
    extra = user.get("extra") or {}
    bound = (extra.get(NODE_NAME_CLAIM) or [None])[0]
    if bound is None:
        pod = (extra.get(POD_NAME_CLAIM) or [None])[0]
        bound = pod_node(pod) if pod else None
        if bound is None:
            raise AgentAuthRefused("wrong_node", f"node {node!r}'s token is bound to no node (pod {pod!r} unknown): "
                                   "use a projected service-account token from the agent DaemonSet")
    if bound != node:
        raise AgentAuthRefused("wrong_node", f"an agent on node {bound!r} claimed to be node {node!r}")
    return node


class TokenReviewAuthenticator:
    """Checks agent tokens with the API server's TokenReview (the client is sync: run in a thread)."""

    def __init__(self, api: k8s.ApiClient, audience: str, namespace: str, service_account: str = "nodemesh-agent",
                 state: Callable[[], ClusterState | None] = lambda: None) -> None:
        from kubernetes import client as k8s

        self.auth = k8s.AuthenticationV1Api(api)
        self.audience = audience
        self.agent_user = f"system:serviceaccount:{namespace}:{service_account}"
        self.namespace = namespace
        self._state = state

    def _pod_node(self, pod: str) -> str | None:
        st = self._state()
        obj = st.get("Pod", self.namespace, pod) if st is not None else None
        return getattr(obj, "node_name", None)

    def review(self, node: str, token: str) -> str:
        from kubernetes import client as k8s
        from kubernetes.client.rest import ApiException

        if not node or not token:
            raise AgentAuthRefused("bad_request", "the agent must name its node and present its service-account token")
        body = k8s.V1TokenReview(api_version="authentication.k8s.io/v1", kind="TokenReview",
                                 spec=k8s.V1TokenReviewSpec(token=token, audiences=[self.audience]))
        try:
            resp = self.auth.create_token_review(body, _request_timeout=10)
        except ApiException as exc:
            raise AgentAuthRefused("api_unavailable", f"TokenReview failed ({exc.status} {exc.reason}); the agent will retry") from None
        except Exception as exc:  # connection errors: the agent retries, we refuse for now
            raise AgentAuthRefused("api_unavailable", f"TokenReview failed: {exc}; the agent will retry") from None
        status = k8s.ApiClient().sanitize_for_serialization(resp.status) or {}
        return check_review(status, node, self.audience, self.agent_user, self._pod_node)

    async def authenticate(self, node: str, token: str) -> str:
        return await asyncio.to_thread(self.review, node, token)

    def bootstrap_key(self, node: str, token: str) -> tuple[str, float | None]:
        exp = jwt_expiry(token)
        return "sha256:" + hashlib.sha256(token.encode()).hexdigest(), exp if exp is not None else time.time() + SPENT_TOKEN_TTL
