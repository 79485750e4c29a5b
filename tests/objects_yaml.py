"""Cluster objects as YAML documents for the model's parser (flow style, one `---` document each),
so tests that build a cluster from text share one spelling of each kind."""

from __future__ import annotations


def _flow(mapping: dict[str, str]) -> str:
    return "{" + ", ".join(f"{k}: {v}" for k, v in mapping.items()) + "}"


def node(name: str, pod_cidr: str, internal_ip: str | None = None) -> str:
    status = f"status: {{addresses: [{{type: InternalIP, address: {internal_ip}}}]}}\n" if internal_ip else ""
    return f"---\napiVersion: v1\nkind: Node\nmetadata: {{name: {name}}}\nspec: {{podCIDR: {pod_cidr}}}\n{status}"


def meshed_namespace(name: str, default_policy: str = "") -> str:
    """A meshed namespace; `default_policy`: its default-inbound-policy annotation, if any."""
    ann = f", annotations: {{config.nodemesh.io/default-inbound-policy: {default_policy}}}" if default_policy else ""
    return f"---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: {name}, labels: {{nodemesh.io/mesh: enabled}}{ann}}}\n"


def service_account(name: str, namespace: str = "demo") -> str:
    return f"---\napiVersion: v1\nkind: ServiceAccount\nmetadata: {{name: {name}, namespace: {namespace}}}\n"


def pod(name: str, *, node: str, sa: str, ip: str, port: int, port_name: str, labels: dict[str, str],
        annotations: dict[str, str] | None = None) -> str:
    """A demo pod with one container port."""
    ann = f", annotations: {_flow(annotations)}" if annotations else ""
    return (f"---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: demo, labels: {_flow(labels)}{ann}}}\n"
            f"spec: {{nodeName: {node}, serviceAccountName: {sa}, containers: [{{name: c, ports: [{{containerPort: {port}, name: {port_name}}}]}}]}}\n"
            f"status: {{podIP: {ip}}}\n")


def service(name: str, vip: str, selector: dict[str, str], port_name: str, target_port: int) -> str:
    """A demo ClusterIP service on port 80."""
    return (f"---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: demo}}\n"
            f"spec: {{clusterIP: {vip}, selector: {_flow(selector)}, ports: [{{name: {port_name}, port: 80, targetPort: {target_port}}}]}}\n")


def server(name: str, app: str, port: int | str, protocol: str = "", access_policy: str = "") -> str:
    """A policy Server selecting the demo pods labelled app=`app` on `port`."""
    extra = (f", proxyProtocol: {protocol}" if protocol else "") + (f", accessPolicy: {access_policy}" if access_policy else "")
    return (f"---\napiVersion: policy.nodemesh.io/v1alpha1\nkind: Server\nmetadata: {{name: {name}, namespace: demo}}\n"
            f"spec: {{podSelector: {{matchLabels: {{app: {app}}}}}, port: {port}{extra}}}\n")


def allow_account(name: str, target_kind: str, target: str, account: str, target_group: str = "") -> str:
    """An AuthorizationPolicy letting demo's service account `account` reach `target_kind` `target`."""
    group = f"group: {target_group}, " if target_group else ""
    return (f"---\napiVersion: policy.nodemesh.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: demo}}\n"
            f"spec:\n  targetRef: {{{group}kind: {target_kind}, name: {target}}}\n"
            f"  requiredAuthenticationRefs: [{{kind: ServiceAccount, name: {account}}}]\n")
