"""nodemesh: a sidecar-less service mesh, one eBPF-fed proxy per node."""

__version__ = "0.1.0"
