"""Cython hot paths of the node proxy, built as one extension module (see DESIGN.md, Packaging)."""

from nodemesh.fastpath._fast import TcpStats

__all__ = ["TcpStats"]
