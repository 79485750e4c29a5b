"""TLS 1.3 contexts from in-memory PEM, for the mesh (config stream and node-to-node tunnels).

Python's ssl only loads certificates and keys from files, so the PEM goes through a memfd
(an anonymous in-memory file of this process): the private key never touches a disk or another
process. Peer *identity* is not checked by OpenSSL here (no hostnames in mesh certificates);
callers verify the SPIFFE URI SAN after the handshake (nodemesh.spiffe.der_identity).
"""

from __future__ import annotations

import os
import ssl


def _load_chain(ctx: ssl.SSLContext, chain_pem: bytes, key_pem: bytes) -> None:
    fd = os.memfd_create("nodemesh-cred", os.MFD_CLOEXEC)
    try:
        os.write(fd, key_pem + b"\n" + chain_pem)
        ctx.load_cert_chain(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)


def _base(purpose: ssl.Purpose, bundle_pem: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if purpose is ssl.Purpose.CLIENT_AUTH else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    if bundle_pem:
        ctx.load_verify_locations(cadata=bundle_pem)
    return ctx


def client_context(bundle_pem: str, chain_pem: bytes | None = None, key_pem: bytes | None = None) -> ssl.SSLContext:
    """Verifies the server's chain against `bundle_pem`; presents `chain_pem` when given."""
    ctx = _base(ssl.Purpose.SERVER_AUTH, bundle_pem)
    if chain_pem is not None and key_pem is not None:
        _load_chain(ctx, chain_pem, key_pem)
    return ctx


def server_context(bundle_pem: str, chain_pem: bytes, key_pem: bytes, require_client_cert: bool = True) -> ssl.SSLContext:
    """Presents `chain_pem`; verifies client chains against `bundle_pem` (required or optional)."""
    ctx = _base(ssl.Purpose.CLIENT_AUTH, bundle_pem)
    ctx.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
    _load_chain(ctx, chain_pem, key_pem)
    return ctx


def reload_chain(ctx: ssl.SSLContext, chain_pem: bytes, key_pem: bytes) -> None:
    """Swap the certificate a live context presents; handshakes after this use the new one."""
    _load_chain(ctx, chain_pem, key_pem)
