"""Config files for the peers the bench runs: nginx (server and reverse-proxy hop) and haproxy
(one hop, and the two halves of the sidecar-pair model). Pure renderers: text in, text out.

Every process gets its own prefix directory for pid, logs and temp files, so several run side
by side (and beside a system nginx) without sharing anything.
"""

from __future__ import annotations

from dataclasses import dataclass

# Ports the bench servers listen on in their pods (the Services in labs/bench.yaml map these 1:1).
HTTP_PORT = 8080  # HTTP/1.1, small `return 200` response
H2C_PORT = 8081  # HTTP/2 cleartext with prior knowledge (h2load)
BULK_PORT = 5201  # iperf3
# The hop pod's listeners (one haproxy, one nginx).
HAPROXY_HOP_HTTP, HAPROXY_HOP_H2, HAPROXY_HOP_BULK = 7080, 7081, 7201
NGINX_HOP_HTTP, NGINX_HOP_H2 = 9080, 9081
# Sidecar-pair model: where iptables REDIRECT sends the pod's traffic.
SIDECAR_OUT_HTTP, SIDECAR_OUT_H2, SIDECAR_OUT_BULK = 15001, 15002, 15003  # client pod, OUTPUT
SIDECAR_IN_HTTP, SIDECAR_IN_H2, SIDECAR_IN_BULK = 15006, 15007, 15008  # server pod, PREROUTING

RESPONSE_BODY = "x" * 200  # ~250-byte responses with headers, as in the shared baseline


def _nginx(prefix: str, server: str, upstreams: str = "") -> str:
    """One worker, no access log, everything it writes under prefix."""
    return f"""worker_processes 1;
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/tmp;
    proxy_temp_path {prefix}/tmp;
    keepalive_requests 1000000;
{upstreams}    server {{
{server}
    }}
}}
"""


def nginx_server(prefix: str) -> str:
    """The bench's server: HTTP/1.1 on HTTP_PORT and h2c on H2C_PORT, a small `return 200`."""
    return _nginx(prefix, f"""        listen {HTTP_PORT} reuseport backlog=4096;
        listen {H2C_PORT} http2;
        location / {{ default_type text/plain; return 200 "{RESPONSE_BODY}"; }}""")


def nginx_hop(prefix: str, upstream: str) -> str:
    """A reverse-proxy hop with pooled upstream connections (HTTP/1.1 and h2c in, HTTP/1.1 out)."""
    return _nginx(prefix, f"""        listen {NGINX_HOP_HTTP} backlog=4096;
        listen {NGINX_HOP_H2} http2;
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}""", upstreams=f"    upstream backend {{ server {upstream}:{HTTP_PORT}; keepalive 128; }}\n")


_HAPROXY_GLOBAL = """global
    nbthread 1
    maxconn 4096
    pidfile {prefix}/haproxy.pid
{user}    ssl-default-bind-options ssl-min-ver TLSv1.3
    ssl-default-server-options ssl-min-ver TLSv1.3
defaults
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    option http-keep-alive
    http-reuse always
"""


def _global(prefix: str, user: str | None = None) -> str:
    return _HAPROXY_GLOBAL.format(prefix=prefix, user=f"    user {user}\n" if user else "")


def haproxy_hop(prefix: str, upstream: str) -> str:
    """One haproxy hop: HTTP mode with pooled upstream connections; h2c terminated; bulk as TCP."""
    return _global(prefix) + f"""
frontend http_in
    mode http
    bind :{HAPROXY_HOP_HTTP}
    default_backend http_out
frontend h2_in
    mode http
    bind :{HAPROXY_HOP_H2} proto h2
    default_backend http_out
backend http_out
    mode http
    server s {upstream}:{HTTP_PORT}
frontend bulk_in
    mode tcp
    bind :{HAPROXY_HOP_BULK}
    default_backend bulk_out
backend bulk_out
    mode tcp
    server s {upstream}:{BULK_PORT}
"""


@dataclass(frozen=True)
class TlsFiles:
    ca: str  # PEM of the mesh CA
    cert: str  # PEM of this side's certificate + key (haproxy's `crt` format)


def haproxy_sidecar_client(prefix: str, server_ip: str, tls: TlsFiles, user: str) -> str:
    """The client pod's sidecar: L7 for HTTP/1.1 (pooled mTLS upstream, as Linkerd/Envoy do),
    TCP for h2c and bulk, TLS 1.3 with client certificates to the server pod's sidecar.

    It runs as `user` so the pod's iptables OUTPUT rule can exempt its own connections."""
    tls_opts = f"ssl verify required ca-file {tls.ca} crt {tls.cert} alpn http/1.1"
    return _global(prefix, user) + f"""
frontend http_out
    mode http
    bind 127.0.0.1:{SIDECAR_OUT_HTTP}
    default_backend http_mtls
backend http_mtls
    mode http
    server s {server_ip}:{HTTP_PORT} {tls_opts}
frontend h2_out
    mode tcp
    bind 127.0.0.1:{SIDECAR_OUT_H2}
    default_backend h2_mtls
backend h2_mtls
    mode tcp
    server s {server_ip}:{H2C_PORT} ssl verify required ca-file {tls.ca} crt {tls.cert}
frontend bulk_out
    mode tcp
    bind 127.0.0.1:{SIDECAR_OUT_BULK}
    default_backend bulk_mtls
backend bulk_mtls
    mode tcp
    server s {server_ip}:{BULK_PORT} ssl verify required ca-file {tls.ca} crt {tls.cert}
"""


def haproxy_sidecar_server(prefix: str, tls: TlsFiles, user: str) -> str:
    """The server pod's sidecar: terminates mTLS (client certificate required), forwards to the
    app on loopback (untouched by the PREROUTING redirect)."""
    bind_tls = f"ssl crt {tls.cert} ca-file {tls.ca} verify required"
    return _global(prefix, user) + f"""
frontend http_in
    mode http
    bind :{SIDECAR_IN_HTTP} {bind_tls} alpn http/1.1
    default_backend app_http
backend app_http
    mode http
    server app 127.0.0.1:{HTTP_PORT}
frontend h2_in
    mode tcp
    bind :{SIDECAR_IN_H2} {bind_tls}
    default_backend app_h2
backend app_h2
    mode tcp
    server app 127.0.0.1:{H2C_PORT}
frontend bulk_in
    mode tcp
    bind :{SIDECAR_IN_BULK} {bind_tls}
    default_backend app_bulk
backend app_bulk
    mode tcp
    server app 127.0.0.1:{BULK_PORT}
"""


def sidecar_client_iptables(server_ip: str, sidecar_user: str) -> list[list[str]]:
    """iptables commands for the client pod: its app's connections to the server go to the sidecar."""
    base = ["iptables", "-w", "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-d", server_ip,
            "-m", "owner", "!", "--uid-owner", sidecar_user]
    return [base + ["--dport", str(port), "-j", "REDIRECT", "--to-ports", str(to)]
            for port, to in ((HTTP_PORT, SIDECAR_OUT_HTTP), (H2C_PORT, SIDECAR_OUT_H2), (BULK_PORT, SIDECAR_OUT_BULK))]


def sidecar_server_iptables() -> list[list[str]]:
    """iptables commands for the server pod: inbound connections go to the sidecar first."""
    base = ["iptables", "-w", "-t", "nat", "-A", "PREROUTING", "-p", "tcp"]
    return [base + ["--dport", str(port), "-j", "REDIRECT", "--to-ports", str(to)]
            for port, to in ((HTTP_PORT, SIDECAR_IN_HTTP), (H2C_PORT, SIDECAR_IN_H2), (BULK_PORT, SIDECAR_IN_BULK))]
