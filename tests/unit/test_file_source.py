"""The standalone source: a directory of YAML, re-read on change; bad resources reject only themselves."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

import nodemesh
from nodemesh.controller.file_source import DirSource, load_dir, read_dir
from nodemesh.model import ClusterState

NODES = """
apiVersion: v1
kind: Node
metadata: {name: node1}
---
apiVersion: v1
kind: Namespace
metadata: {name: demo, labels: {nodemesh.io/mesh: enabled}}
"""


def service(name: str = "web", ip: str = "10.96.0.10", port: int = 80) -> str:
    return f"""
apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: demo}}
spec: {{clusterIP: {ip}, selector: {{app: {name}}}, ports: [{{port: {port}}}]}}
"""


def pod(name: str, node: str = "node1") -> str:
    return f"""
apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: demo}}
spec: {{nodeName: {node}, containers: [{{name: c}}]}}
"""


def write(path: Path, text: str) -> None:
    # bump mtime explicitly: two writes within one timestamp tick must still be seen as a change
    path.write_text(text)
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


def keys(state: ClusterState) -> set[str]:
    return {f"{k[0]}/{k[2]}" for k in state.objects}


@pytest.fixture
def lab(tmp_path: Path) -> Path:
    write(tmp_path / "00-nodes.yaml", NODES)
    write(tmp_path / "web.yaml", service())
    (tmp_path / "notes.txt").write_text("not yaml, not read")
    return tmp_path


def test_load_dir(lab):
    state = load_dir(str(lab), trust_domain="example.org")
    assert keys(state) == {"Node/node1", "Namespace/demo", "Service/web"}
    assert state.trust_domain == "example.org"


def test_malformed_file_ignored_rest_applied(lab):
    write(lab / "broken.yaml", "kind: [unclosed")
    write(lab / "api.yaml", service("api", "10.96.0.11"))
    state, errors = read_dir(str(lab))
    assert keys(state) == {"Node/node1", "Namespace/demo", "Service/web", "Service/api"}
    (err,) = errors
    assert err.source.endswith("broken.yaml") and "not valid YAML" in str(err)


def test_bad_object_rejects_only_itself(lab):
    write(lab / "pods.yaml", pod("good") + "---" + pod("lost", node="node9") + "---\n" + "apiVersion: v1\nkind: Gadget\nmetadata: {name: g}\n")
    state, errors = read_dir(str(lab))
    assert "Pod/good" in keys(state) and "Pod/lost" not in keys(state)
    assert sorted(e.field for e in errors) == ["kind", "spec.nodeName"]
    assert all(e.source.endswith("pods.yaml") for e in errors)
    assert any("node 'node9' does not exist" in str(e) and "Pod demo/lost" in str(e) for e in errors)


def test_duplicate_definition_first_file_wins(lab):
    write(lab / "zz-web.yaml", service(ip="10.96.0.99"))
    state, errors = read_dir(str(lab))
    assert state.get("Service", "demo", "web").cluster_ip == "10.96.0.10"
    assert "also defined in" in str(errors[0]) and errors[0].source.endswith("zz-web.yaml")


def test_watcher_detects_changes_and_keeps_last_good(lab):
    seen: list[ClusterState] = []
    src = DirSource(str(lab), seen.append)
    assert src.refresh() and len(seen) == 1
    assert not src.refresh()  # nothing changed: no new state

    write(lab / "web.yaml", service(port=8080))
    assert src.refresh()
    assert seen[-1].get("Service", "demo", "web").ports[0].port == 8080

    # Half-saved file: the file's previous objects stay, the error is counted once.
    write(lab / "web.yaml", "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: demo")
    assert not src.refresh()
    assert src.state.get("Service", "demo", "web").ports[0].port == 8080
    assert src.errors_total == 1 and len(src.errors) == 1

    # An invalid update of one object keeps that object's previous version; a new object still lands.
    write(lab / "web.yaml", service(port=70000) + "---" + service("api", "10.96.0.11"))
    assert src.refresh()
    assert src.state.get("Service", "demo", "web").ports[0].port == 8080
    assert src.state.get("Service", "demo", "api") is not None
    assert src.errors_total == 2

    # Fixed: the error clears; a removed file removes its objects.
    write(lab / "web.yaml", service(port=81))
    assert src.refresh() and src.errors == []
    (lab / "web.yaml").unlink()
    assert src.refresh()
    assert keys(seen[-1]) == {"Node/node1", "Namespace/demo"}


def test_missing_directory_is_not_ready_then_recovers(tmp_path):
    seen: list[ClusterState] = []
    src = DirSource(str(tmp_path / "later"), seen.append)
    assert not src.refresh() and src.state is None and src.errors_total == 1
    (tmp_path / "later").mkdir()
    assert src.refresh() and seen[-1].objects == {}


def test_polling_loop_delivers_changes(lab):
    async def main() -> None:
        seen: list[ClusterState] = []
        src = DirSource(str(lab), seen.append, interval=0.02)
        task = asyncio.create_task(src.run())
        try:
            for _ in range(100):
                if seen:
                    break
                await asyncio.sleep(0.01)
            write(lab / "api.yaml", service("api", "10.96.0.11"))
            for _ in range(100):
                if len(seen) == 2:
                    break
                await asyncio.sleep(0.01)
            assert len(seen) == 2 and seen[-1].get("Service", "demo", "api") is not None
        finally:
            task.cancel()

    asyncio.run(main())


def test_default_lab_directory_loads_cleanly():
    state, errors = read_dir(str(Path(nodemesh.__file__).parent / "labs"))
    assert errors == [] and len(state.pods) == 3
