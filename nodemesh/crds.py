"""nodemesh's CustomResourceDefinitions, with their OpenAPI v3 schemas, as data.

The policy API (`policy.nodemesh.io/v1alpha1`) follows Linkerd's proven shapes so users carry their
knowledge over: `Server` (pods + port + protocol), `AuthorizationPolicy` (target + required
authentications), `MeshTLSAuthentication` (identities or service accounts) and
`NetworkAuthentication` (CIDRs). The schemas are structural (every field typed, unknown fields
pruned by the API server), so `kubectl apply` of a misspelled field is refused by the cluster,
and the test suite validates example resources against them with jsonschema.

nodemesh/policy_model.py is the truth: every object it accepts passes these schemas, and what the
schemas refuse it refuses too (tests/deploy/test_crds_match_model.py). Where the model checks
more than OpenAPI can say (a CIDR's host bits, cross-object references), the schema is looser and
the controller rejects the object itself, by name.
"""

from __future__ import annotations

from typing import Any

from nodemesh.policy_model import (
    AUTHN_KINDS, DEFAULT_POLICIES, IDENTITY_REF_KINDS, PORT_NAME_PATTERN, PROXY_PROTOCOLS, SPIFFE_PATTERN, TARGET_KINDS,
)

GROUP = "policy.nodemesh.io"
VERSION = "v1alpha1"

_NAME = {"type": "string", "minLength": 1, "maxLength": 253}
_LABELS = {"type": "object", "additionalProperties": {"type": "string"}}
_LABEL_SELECTOR: dict[str, Any] = {
    "type": "object",
    "properties": {
        "matchLabels": _LABELS,
        "matchExpressions": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["key", "operator"],
                "properties": {
                    "key": {"type": "string"},
                    "operator": {"type": "string", "enum": ["In", "NotIn", "Exists", "DoesNotExist"]},
                    "values": {"type": "array", "items": {"type": "string"}},
                },
                # In/NotIn need values, Exists/DoesNotExist take none (as the model and Kubernetes say)
                "anyOf": [
                    {"properties": {"operator": {"enum": ["In", "NotIn"]}, "values": {"minItems": 1}}, "required": ["values"]},
                    {"properties": {"operator": {"enum": ["Exists", "DoesNotExist"]}, "values": {"maxItems": 0}}},
                ],
            },
        },
    },
}
# The int-or-string form structural schemas allow: anyOf integer|string, then value validations in
# allOf (minimum/maximum bind numbers only, pattern strings only).
_PORT = {"x-kubernetes-int-or-string": True, "description": "A port number (1-65535) or a container port name.",
         "allOf": [{"anyOf": [{"type": "integer"}, {"type": "string"}]},
                   {"minimum": 1, "maximum": 65535, "pattern": PORT_NAME_PATTERN}]}


def _ref(kinds: tuple[str, ...]) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["kind", "name"],
        "properties": {
            "group": {"type": "string"},
            "kind": {"type": "string", "enum": list(kinds)},
            "name": _NAME,
            "namespace": {"type": "string"},
        },
    }


# A SPIFFE ID of a service account, a whole namespace (.../sa/*), or every identity (*): the
# model's grammar, not Linkerd's DNS-style `*.<namespace>.serviceaccount.identity...` names.
_IDENTITY = r"^(\*|" + SPIFFE_PATTERN.strip("^$") + ")$"
# An IPv4 or IPv6 network or address (optionally with a prefix length or netmask); the model then
# checks it parses and has no host bits set.
_CIDR = {"type": "string", "minLength": 1, "pattern": r"^[0-9a-fA-F:.]+(/[0-9.]+)?$"}

_SPECS: dict[str, dict[str, Any]] = {
    "Server": {
        "type": "object",
        "required": ["podSelector", "port"],
        "properties": {
            "podSelector": _LABEL_SELECTOR,
            "port": _PORT,
            "proxyProtocol": {
                "type": "string",
                "enum": list(PROXY_PROTOCOLS),
                "default": "unknown",
                "description": "How the node proxy treats the port; `unknown` detects the protocol.",
            },
            "accessPolicy": {
                "type": "string",
                "enum": list(DEFAULT_POLICIES),
                "default": "deny",
                "description": "What happens to traffic no AuthorizationPolicy allows.",
            },
        },
    },
    "AuthorizationPolicy": {
        "type": "object",
        "required": ["targetRef"],
        "properties": {
            "targetRef": {**_ref(TARGET_KINDS), "description": "A Server, a Namespace or an HTTPRoute this policy allows traffic to."},
            "requiredAuthenticationRefs": {
                "type": "array",
                "items": _ref(AUTHN_KINDS),
                "description": "MeshTLSAuthentications, NetworkAuthentications or ServiceAccounts a client must all match "
                               "(none: every client).",
            },
        },
    },
    "MeshTLSAuthentication": {
        "type": "object",
        "properties": {
            "identities": {
                "type": "array", "items": {"type": "string", "pattern": _IDENTITY},
                "description": "SPIFFE IDs (spiffe://<trust-domain>/ns/<ns>/sa/<sa>), .../sa/* for every service "
                               "account of a namespace, or `*` for every meshed identity.",
            },
            "identityRefs": {"type": "array", "items": _ref(IDENTITY_REF_KINDS),
                             "description": "ServiceAccounts (in this namespace unless named) or whole Namespaces."},
        },
        # at least one identity or reference, in either list or both
        "anyOf": [
            {"required": ["identities"], "properties": {"identities": {"minItems": 1}}},
            {"required": ["identityRefs"], "properties": {"identityRefs": {"minItems": 1}}},
        ],
    },
    "NetworkAuthentication": {
        "type": "object",
        "required": ["networks"],
        "properties": {
            "networks": {
                "type": "array",
                "minItems": 1,
                "items": {
                    "type": "object",
                    "required": ["cidr"],
                    "properties": {
                        "cidr": _CIDR,
                        "except": {"type": "array", "items": _CIDR},
                    },
                },
            },
        },
    },
}

# kind -> (plural, short names)
_NAMES = {
    "Server": ("servers", ["srv"]),
    "AuthorizationPolicy": ("authorizationpolicies", ["authzpolicy"]),
    "MeshTLSAuthentication": ("meshtlsauthentications", ["meshtlsauthn"]),
    "NetworkAuthentication": ("networkauthentications", ["netauthn"]),
}

POLICY_KINDS = tuple(_SPECS)


def plural(kind: str) -> str:
    return _NAMES[kind][0]


def crd(kind: str) -> dict[str, Any]:
    """The CustomResourceDefinition for one policy kind."""
    plural_name, short = _NAMES[kind]
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural_name}.{GROUP}", "labels": {"app.kubernetes.io/part-of": "nodemesh"}},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": kind, "listKind": f"{kind}List", "plural": plural_name,
                "singular": kind.lower(), "shortNames": short, "categories": ["nodemesh", "policy"],
            },
            "versions": [{
                "name": VERSION,
                "served": True,
                "storage": True,
                "schema": {"openAPIV3Schema": {
                    "type": "object",
                    "required": ["spec"],
                    "properties": {
                        "apiVersion": {"type": "string"},
                        "kind": {"type": "string"},
                        "metadata": {"type": "object"},
                        "spec": _SPECS[kind],
                    },
                }},
            }],
        },
    }


def all_crds() -> list[dict[str, Any]]:
    return [crd(k) for k in POLICY_KINDS]
