"""The AgentAuthenticator wired into the controller: node bootstrap (IdentityService) and plaintext
hellos (StreamServer) authenticated by TokenReview against the API test server, over real sockets,
with the same refusal reasons and reuse rule the lab's static tokens have."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
import uvloop

from nodemesh.agent.identity_client import AgentIdentity, BootstrapError
from nodemesh.agent.stream_client import ConfigStream
from nodemesh.controller.agent_auth import StaticTokens, TokenReviewAuthenticator, jwt_expiry
from nodemesh.controller.ca import CertificateAuthority, new_issuer, new_trust_anchor
from nodemesh.controller.config_store import ConfigStore
from nodemesh.controller.identity_service import IdentityService
from nodemesh.controller.stream_server import StreamServer

from tests.integration.test_identity_stream import FAST, TD, _raw_hello, cluster, until
from tests.kubeapi.client import api_client
from tests.kubeapi.server import KubeApiServer

AUD = "nodemesh-controller"


def jwt(exp: float, salt: str) -> str:
    """A JWT-shaped token (the test server does not verify signatures; the controller never does)."""
    enc = lambda d: base64.urlsafe_b64encode(json.dumps(d).encode()).rstrip(b"=").decode()
    return f"{enc({'alg': 'RS256'})}.{enc({'exp': int(exp), 'sub': salt})}.c2ln"


NOW_PLUS_HOUR = time.time() + 3600
TOKEN_A = jwt(NOW_PLUS_HOUR, "pod-a")  # node1's agent pod
TOKEN_A2 = jwt(NOW_PLUS_HOUR + 60, "pod-a-rotated")  # the kubelet's next token for the same pod
TOKEN_B = jwt(NOW_PLUS_HOUR, "pod-b")  # node2's agent pod


def run(coro: Any, timeout: float = 15) -> Any:
    return uvloop.run(asyncio.wait_for(coro, timeout))


@pytest.fixture
def api() -> Iterator[KubeApiServer]:
    with KubeApiServer() as s:
        s.add_service_account_token(TOKEN_A, "nodemesh", "nodemesh-agent", [AUD], pod="agent-a", node="node1")
        s.add_service_account_token(TOKEN_A2, "nodemesh", "nodemesh-agent", [AUD], pod="agent-a", node="node1")
        s.add_service_account_token(TOKEN_B, "nodemesh", "nodemesh-agent", [AUD], pod="agent-b", node="node2")
        yield s


class KubeController:
    """The controller as `--agent-auth tokenreview` builds it: one authenticator for both paths."""

    def __init__(self, api: KubeApiServer, mtls: bool = True) -> None:
        self.anchor = new_trust_anchor(TD)
        self.ca = CertificateAuthority(TD, [self.anchor.cert], new_issuer(self.anchor, TD), 60)
        self.store = ConfigStore(first_revision=1)
        self.store.update(cluster())
        self.auth = TokenReviewAuthenticator(api_client(api), AUD, "nodemesh")
        self.identity = IdentityService(self.ca, self.store, authenticator=self.auth) if mtls else None
        self.server = StreamServer(self.store, ping_interval=0.2, identity=self.identity, authenticator=self.auth)

    async def start(self) -> None:
        await self.server.start("127.0.0.1", 0, ssl=self.identity.server_context() if self.identity else None)

    @property
    def addr(self) -> tuple[str, int]:
        return ("127.0.0.1", self.server.port)


async def _bootstrap(ctl: KubeController, node: str, token: str) -> AgentIdentity:
    ident = AgentIdentity(node, token, ctl.ca.bundle_pem(), TD)
    await ident.bootstrap(ctl.addr)
    return ident


def test_projected_token_bootstraps_its_node_and_the_stream_follows(api: KubeApiServer) -> None:
    async def main() -> None:
        ctl = KubeController(api)
        await ctl.start()
        try:
            ident = AgentIdentity("node1", TOKEN_A, ctl.ca.bundle_pem(), TD)
            stream = ConfigStream(ctl.addr, "node1", "", ident.set_config, identity=ident, **FAST)
            task = asyncio.ensure_future(stream.run())
            try:
                await until(lambda: stream.version > 0 and ident.has_node_cert())
                assert ctl.identity is not None and ctl.identity.signed["node"] == 1
                assert any(p.endswith("/tokenreviews") for _, p, _ in api.requests)
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        finally:
            await ctl.server.close()
    run(main())


@pytest.mark.parametrize("node, token, reason, words", [
    ("node2", TOKEN_A, "wrong_node", "an agent on node 'node1' claimed to be node 'node2'"),
    ("node1", "forged", "bad_token", "refused the token of node 'node1'"),
])
def test_bootstrap_refusals_carry_the_authenticators_reason(api: KubeApiServer, node: str, token: str, reason: str, words: str) -> None:
    async def main() -> None:
        ctl = KubeController(api)
        await ctl.start()
        try:
            with pytest.raises(BootstrapError, match=words):
                await _bootstrap(ctl, node, token)
            assert ctl.identity is not None and dict(ctl.identity.bootstrap_refused) == {reason: 1}
            assert ctl.server.auth_failures == 1 and ctl.identity.signed["node"] == 0
        finally:
            await ctl.server.close()
    run(main())


def test_a_projected_token_bootstraps_once_but_the_next_token_bootstraps_again(api: KubeApiServer) -> None:
    """Reuse is per token value in Kubernetes: a replay is refused, a restarted pod's (or the
    kubelet's rotated) token is a new token and bootstraps; another node is unaffected."""
    async def main() -> None:
        ctl = KubeController(api)
        await ctl.start()
        try:
            await _bootstrap(ctl, "node1", TOKEN_A)
            with pytest.raises(BootstrapError, match="already used"):
                await _bootstrap(ctl, "node1", TOKEN_A)
            assert ctl.identity is not None and ctl.identity.bootstrap_refused["reused_token"] == 1
            await _bootstrap(ctl, "node1", TOKEN_A2)
            await _bootstrap(ctl, "node2", TOKEN_B)
            assert ctl.identity.signed["node"] == 3
        finally:
            await ctl.server.close()
    run(main())


def test_static_tokens_stay_single_use_per_node() -> None:
    """The lab's rule is unchanged: the node's one token is spent by its first bootstrap."""
    st = StaticTokens({"node1": "t1"})
    assert st.bootstrap_key("node1", "t1") == ("node:node1", None)  # per node, never forgotten


def test_spent_tokens_are_forgotten_after_they_expire(api: KubeApiServer) -> None:
    ca_anchor = new_trust_anchor(TD)
    ca = CertificateAuthority(TD, [ca_anchor.cert], new_issuer(ca_anchor, TD), 60)
    svc = IdentityService(ca, ConfigStore(), authenticator=TokenReviewAuthenticator(api_client(api), AUD, "nodemesh"))
    svc.spent = {"sha256:old": time.time() - 1, "sha256:live": time.time() + 60, "node:node1": None}
    svc._forget_expired()
    assert set(svc.spent) == {"sha256:live", "node:node1"}
    key, until_ = svc.authenticator.bootstrap_key("node1", TOKEN_A)
    assert key.startswith("sha256:") and TOKEN_A not in key and until_ == int(NOW_PLUS_HOUR)


@pytest.mark.parametrize("token, exp", [
    (jwt(1234567890, "x"), 1234567890.0),
    ("not-a-jwt", None),
    ("a.!!!.c", None),
    ("a." + base64.urlsafe_b64encode(b'{"exp": "soon"}').decode() + ".c", None),
    ("a." + base64.urlsafe_b64encode(b"[1]").decode() + ".c", None),
])
def test_jwt_expiry(token: str, exp: float | None) -> None:
    assert jwt_expiry(token) == exp


def test_plaintext_hellos_are_checked_by_tokenreview_every_time(api: KubeApiServer) -> None:
    """Without a CA the stream authenticates each hello: the same projected token is accepted on
    every reconnect (no reuse rule there), a token bound to another node is refused."""
    async def main() -> None:
        ctl = KubeController(api, mtls=False)
        await ctl.start()
        try:
            for _ in range(2):
                msg = await _raw_hello(ctl, None, {"type": "hello", "node": "node1", "token": TOKEN_A, "version": 0})
                assert msg["type"] == "config", msg
            msg = await _raw_hello(ctl, None, {"type": "hello", "node": "node1", "token": TOKEN_B, "version": 0})
            assert msg["type"] == "error" and "an agent on node 'node2' claimed to be node 'node1'" in msg["reason"]
            assert ctl.server.auth_failures == 1
        finally:
            await ctl.server.close()
    run(main())


@pytest.mark.parametrize("mtls", [False, True])
def test_the_agent_rereads_its_token_file_so_a_rotated_token_works(api: KubeApiServer, mtls: bool) -> None:
    """The kubelet rewrites the projected token file before the old token expires: the agent reads
    the token at each hello (plaintext) or bootstrap (mTLS), not once at start."""
    async def main() -> None:
        ctl = KubeController(api, mtls=mtls)
        await ctl.start()
        current = ["expired-token"]
        ident = AgentIdentity("node1", lambda: current[0], ctl.ca.bundle_pem(), TD) if mtls else None
        stream = ConfigStream(ctl.addr, "node1", lambda: current[0], ident.set_config if ident else (lambda cfg: None),
                              identity=ident, **FAST)
        task = asyncio.ensure_future(stream.run())
        try:
            await until(lambda: stream.last_error is not None and "refused the token" in stream.last_error)
            current[0] = TOKEN_A2
            await until(lambda: stream.version > 0)
            assert ctl.server.auth_failures >= 1
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await ctl.server.close()
    run(main())
