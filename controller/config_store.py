"""The controller's current cluster state and the versioned config of every node.

A node's config version is the global revision at which that node's config last changed, so an
agent that reconnects with the version it holds gets nothing resent unless its config differs.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace

from nodemesh.model import ClusterState
from nodemesh.nodeconfig import NodeConfig

from nodemesh.controller.discovery import node_config
from nodemesh.controller.policy import with_policy


def _same(a: NodeConfig, b: NodeConfig) -> bool:
    return replace(a, version=0) == replace(b, version=0)


class ConfigStore:
    """Single-threaded (lives on the event loop); `update` is sync so any source can call it."""

    def __init__(self, first_revision: int | None = None, default_policy: str = "all-unauthenticated") -> None:
        # Revisions start from wall-clock milliseconds by default, so a restarted controller never
        # reuses a version an agent still holds for a different config (resume compares with !=).
        self.revision: int = time.time_ns() // 1_000_000 if first_revision is None else first_revision
        self.state: ClusterState | None = None
        self._configs: dict[str, NodeConfig] = {}
        self._changed = asyncio.Event()
        self.default_policy = default_policy  # cluster-wide default inbound policy (a controller flag)

    @property
    def ready(self) -> bool:
        """True once a first state has been loaded."""
        return self.state is not None

    def update(self, state: ClusterState) -> list[str]:
        """Adopts a new state; returns the nodes whose config changed (their versions were bumped)."""
        first = self.state is None
        self.state = state
        base = node_config(state, "", 0)  # the same for every node today: compute it once
        names = sorted({n.name for n in state.nodes} | set(self._configs))
        # Authorization policy is per node (its local pods): the only part computed per node.
        fresh = {n: with_policy(replace(base, node=n), state, self.default_policy) for n in names}
        changed = [n for n in names if n not in self._configs or not _same(self._configs[n], fresh[n])]
        if changed or first:
            self.revision += 1
        for n in changed:
            self._configs[n] = replace(fresh[n], version=self.revision)
        if changed or first:
            # Wake every waiter; each re-checks its own node's version.
            self._changed.set()
            self._changed = asyncio.Event()
        return changed

    def config_for(self, node: str) -> NodeConfig | None:
        """The node's current config (computed on first ask for nodes not in the state), or None
        before the first state is loaded."""
        if self.state is None:
            return None
        cfg = self._configs.get(node)
        if cfg is None:
            cfg = self._configs[node] = with_policy(node_config(self.state, node, self.revision), self.state, self.default_policy)
        return cfg

    def nodes(self) -> list[str]:
        return sorted(self._configs)

    async def wait_for_change(self, node: str, version: int) -> NodeConfig:
        """Returns the node's config as soon as its version differs from `version`."""
        while True:
            cfg = self.config_for(node)
            if cfg is not None and cfg.version != version:
                return cfg
            await self._changed.wait()
