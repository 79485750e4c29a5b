"""The policy CRDs' schemas say what nodemesh/policy_model.py accepts (the model is the truth).

Every policy object written anywhere in the tests and examples that the model accepts is valid
under its CRD's openAPIV3Schema (jsonschema, strict as `kubectl apply --validate=strict`), and so
is the model's own dump of it; objects the schema refuses, the model refuses too; and the model's
single-object refusals are refused by the schema as well, but for a short, named list of checks
OpenAPI cannot express.
"""

from __future__ import annotations

import ast
import copy
import glob
import os
from collections.abc import Iterator
from typing import Any, Callable

import pytest
import yaml

from nodemesh.crds import POLICY_KINDS, all_crds
from nodemesh.errors import ConfigError
from nodemesh.model import dump_object, parse_object
from nodemesh.policy_model import API_VERSION

from tests.deploy.kubetools import ROOT, crd_validator

VALIDATORS = {c["spec"]["names"]["kind"]: crd_validator(c) for c in all_crds()}


def schema_errors(doc: dict[str, Any]) -> list[str]:
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in VALIDATORS[doc["kind"]].iter_errors(doc)]


def model_error(doc: dict[str, Any]) -> str | None:
    """What the model says about the object alone (the API server would default the namespace)."""
    doc = copy.deepcopy(doc)
    if isinstance(doc.get("metadata"), dict):
        doc["metadata"].setdefault("namespace", "default")
    try:
        parse_object(doc, "test")
    except ConfigError as exc:
        return str(exc)
    return None


def _is_policy(doc: Any) -> bool:
    return isinstance(doc, dict) and doc.get("apiVersion") == API_VERSION and doc.get("kind") in POLICY_KINDS


def _yaml_policies(text: str) -> list[dict[str, Any]]:
    try:
        return [d for d in yaml.safe_load_all(text) if _is_policy(d)]
    except yaml.YAMLError:
        return []  # a fragment (or a deliberately broken document): not an object


def _python_strings(path: str) -> Iterator[str]:
    """String literals of a module, not the pieces of f-strings (those are not whole documents)."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    pieces = {id(v) for node in ast.walk(tree) if isinstance(node, ast.JoinedStr) for v in node.values}
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in pieces and API_VERSION in node.value:
            yield node.value


def _parametrized_strings() -> Iterator[tuple[str, str]]:
    """The documents test_policy_model builds at import (with its _doc helper) for its cases."""
    from tests.unit import test_policy_model as tpm

    for fn_name in dir(tpm):
        for mark in getattr(getattr(tpm, fn_name), "pytestmark", []):
            if mark.name != "parametrize":
                continue
            for case in mark.args[1]:
                for value in case if isinstance(case, tuple) else (case,):
                    for text in value if isinstance(value, tuple) else (value,):
                        if isinstance(text, str) and API_VERSION in text:
                            yield f"{fn_name}[{case[0]}]", text


def _builder_strings() -> Iterator[tuple[str, str]]:
    """What tests/objects_yaml.py's policy builders produce, in each shape the tests use them
    (their f-strings are not literals the harvest above can read)."""
    from tests import objects_yaml as y

    yield "tests/objects_yaml.py:server", y.server("echo", "echo", "echo")
    yield "tests/objects_yaml.py:server", y.server("echo-http", "echo", 8080, protocol="HTTP/1", access_policy="deny")
    yield "tests/objects_yaml.py:allow_account", y.allow_account("allow-client", "Server", "echo", "client")
    yield "tests/objects_yaml.py:allow_account", y.allow_account("other-on-health", "HTTPRoute", "health", "other",
                                                                 target_group="gateway.networking.k8s.io")


def harvested() -> list[tuple[str, dict[str, Any]]]:
    found: list[tuple[str, dict[str, Any]]] = []
    files = [*glob.glob(os.path.join(ROOT, "deploy", "examples", "*.yaml")),
             *glob.glob(os.path.join(ROOT, "nodemesh", "labs", "*.yaml")),
             *glob.glob(os.path.join(ROOT, "tests", "**", "*.yaml"), recursive=True)]
    for path in files:
        with open(path, encoding="utf-8") as f:
            found += [(os.path.relpath(path, ROOT), d) for d in _yaml_policies(f.read())]
    for path in glob.glob(os.path.join(ROOT, "tests", "**", "*.py"), recursive=True):
        if os.path.abspath(path) == os.path.abspath(__file__):
            continue  # our own refusal table below is not a corpus of objects the model accepts
        for text in _python_strings(path):
            found += [(os.path.relpath(path, ROOT), d) for d in _yaml_policies(text)]
    for where, text in [*_parametrized_strings(), *_builder_strings()]:
        found += [(where, d) for d in _yaml_policies(text)]
    return found


HARVEST = harvested()
ACCEPTED = [(src, d) for src, d in HARVEST if model_error(d) is None]


def test_the_corpus_covers_every_kind() -> None:
    """Not vacuous: examples and fixtures of all four kinds are found and accepted."""
    assert {d["kind"] for _, d in ACCEPTED} == set(POLICY_KINDS)
    assert len(ACCEPTED) >= 15, [src for src, _ in ACCEPTED]
    assert any(src.startswith("deploy/examples") for src, _ in ACCEPTED)


@pytest.mark.parametrize("source, doc", ACCEPTED, ids=[f"{s}:{d['kind']}/{d['metadata'].get('name')}" for s, d in ACCEPTED])
def test_what_the_model_accepts_the_crd_accepts(source: str, doc: dict[str, Any]) -> None:
    assert schema_errors(doc) == [], f"{source}: the model accepts this {doc['kind']} but its CRD refuses it"
    dumped = dump_object(parse_object({**doc, "metadata": {"namespace": "default", **doc["metadata"]}}, source))
    assert schema_errors(dumped) == [], f"{source}: the model's own dump of it is refused by the CRD"


def test_what_the_schema_refuses_in_the_corpus_the_model_refuses() -> None:
    for source, doc in HARVEST:
        if schema_errors(doc):
            assert model_error(doc) is not None, f"{source}: the CRD refuses {doc['kind']} {doc['metadata']} but the model accepts it"


# The model's single-object refusals that OpenAPI cannot say: the controller refuses these objects
# itself (by name). Anything not listed here the schema must refuse as well.
SEMANTIC_ONLY = {
    "invalid CIDR": "octet ranges (10.0.0.300) are not a regular-expression matter",
    "CIDR with host bits": "host bits are arithmetic on the address and the prefix",
}


def _model_refusal_cases() -> list[tuple[str, dict[str, Any]]]:
    from tests.unit import test_policy_model as tpm

    (mark,) = [m for m in tpm.test_parse_errors_name_source_object_field.pytestmark if m.name == "parametrize"]
    return [(case[0], d) for case in mark.args[1] for d in _yaml_policies(case[1])]


@pytest.mark.parametrize("case, doc", _model_refusal_cases(), ids=[c for c, _ in _model_refusal_cases()])
def test_what_the_model_refuses_the_crd_refuses(case: str, doc: dict[str, Any]) -> None:
    assert model_error(doc) is not None
    if case in SEMANTIC_ONLY:
        assert schema_errors(doc) == [], f"{case}: the schema now refuses it; remove it from SEMANTIC_ONLY"
    else:
        assert schema_errors(doc), f"{case}: the model refuses it but the CRD would let it into the cluster"


def _base(kind: str) -> dict[str, Any]:
    return copy.deepcopy(next(d for src, d in ACCEPTED if d["kind"] == kind and src.startswith("deploy/examples")))


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(doc: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node: Any = doc["spec"]
        for p in parents:
            node = node[int(p)] if isinstance(node, list) else node[p]
        if value is _DELETE:
            del node[last]
        else:
            node[int(last) if isinstance(node, list) else last] = value
    return mutate


_DELETE = object()


@pytest.mark.parametrize("kind, mutate", [
    ("Server", _set("port", 0)),
    ("Server", _set("port", "HTTP")),
    ("Server", _set("proxyProtocol", "HTTP/3")),
    ("Server", _set("accessPolicy", "allow")),
    ("Server", _set("podSelector", {"matchExpressions": [{"key": "app", "operator": "Exists", "values": ["a"]}]})),
    ("Server", _set("podSelector", {"matchExpressions": [{"key": "app", "operator": "In", "values": []}]})),
    ("Server", _set("podSelector", {"matchFields": []})),
    ("Server", _set("port", _DELETE)),
    ("MeshTLSAuthentication", _set("identities", ["*.demo.serviceaccount.identity.linkerd.cluster.local"])),
    ("MeshTLSAuthentication", _set("identities", ["spiffe://cluster.local/ns/demo/client"])),
    ("MeshTLSAuthentication", _set("identities", [])),
    ("MeshTLSAuthentication", _set("identityRefs", [{"kind": "Pod", "name": "p"}])),
    ("NetworkAuthentication", _set("networks", [])),
    ("NetworkAuthentication", _set("networks", [{"cidr": "nope"}])),
    ("NetworkAuthentication", _set("networks", [{"except": ["10.0.0.0/8"]}])),
    ("AuthorizationPolicy", _set("targetRef", {"kind": "Service", "name": "s"})),
    ("AuthorizationPolicy", _set("requiredAuthenticationRefs", [{"kind": "Secret", "name": "s"}])),
    ("AuthorizationPolicy", _set("targetRef", _DELETE)),
], ids=lambda v: v if isinstance(v, str) else "")
def test_what_the_crd_refuses_the_model_refuses(kind: str, mutate: Callable[[dict[str, Any]], None]) -> None:
    doc = _base(kind)
    mutate(doc)
    assert schema_errors(doc), "the mutation should make the object schema-invalid"
    assert model_error(doc) is not None, f"the CRD refuses this {kind} but the model accepts it"


@pytest.mark.parametrize("kind, mutate", [
    ("Server", _set("accessPolicy", "cluster-unauthenticated")),
    ("Server", _set("port", "8080")),
    ("MeshTLSAuthentication", _set("identities", ["*", "spiffe://cluster.local/ns/other/sa/*"])),
    ("MeshTLSAuthentication", _set("identityRefs", [{"kind": "Namespace", "name": "demo"}])),  # with identities: both
    ("AuthorizationPolicy", _set("requiredAuthenticationRefs", _DELETE)),  # none: every client
    ("NetworkAuthentication", _set("networks", [{"cidr": "fd00::/8", "except": ["fd00:1::/32"]}, {"cidr": "192.0.2.7"}])),
], ids=lambda v: v if isinstance(v, str) else "")
def test_model_shapes_linkerd_lacks_are_valid(kind: str, mutate: Callable[[dict[str, Any]], None]) -> None:
    doc = _base(kind)
    mutate(doc)
    assert model_error(doc) is None
    assert schema_errors(doc) == []
