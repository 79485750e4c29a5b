/* Shared structs and maps of the nodemesh redirect programs.
 *
 * connect.c, sockops.c, getpeername.c and redirect.c are compiled as ONE bcc module
 * (agent/bpf_loader.py concatenates them), so every map below exists once and all programs
 * share it. Every map says who writes it and who reads it. The agent's bpf_loader.py (through
 * bpf_maps.py, the bpf() syscall; bpf_loader.MAP_FORMATS mirrors the key/value structs below) is
 * the only user-space code that touches these maps (agent/bpf_pins.py only lists, detaches and
 * unlinks pins through bpftool).
 *
 * Pinning: the loader passes -DNM_PIN_DIR="<pin dir>/maps"; each map is then pinned there under
 * its own name, and a restarted agent's module reuses the pinned map (bcc opens an existing pin
 * instead of creating a map), keeping its state. Without NM_PIN_DIR the maps live as long as
 * the loading process (tests of the bare loader).
 *
 * Byte orders: IPv4 addresses are always network order. Ports are network order except in
 * struct nm_tuple_key (mirrors bpf_sock_ops.local_port, host order) and struct nm_sock_key
 * (host order on both ends).
 */
#ifndef NODEMESH_MAPS_H
#define NODEMESH_MAPS_H

#include <uapi/linux/bpf.h>

#ifdef NM_PIN_DIR
#define NM_PIN(_name) ":" NM_PIN_DIR "/" #_name
#else
#define NM_PIN(_name) ""
#endif

/* BPF_TABLE with an optional pin; bcc creates the pin if missing, reuses it otherwise. */
#define NM_TABLE(_type, _key, _leaf, _name, _max) \
    BPF_F_TABLE(_type NM_PIN(_name), _key, _leaf, _name, _max, 0)

/* bcc's BPF_SOCKHASH has no pinned form: the same declaration with a pinnable section. */
#define NM_SOCKHASH(_name, _key_type, _max_entries) \
struct _name##_table_t { \
  _key_type key; \
  int leaf; \
  int (*update) (_key_type *, int *); \
  int (*delete) (_key_type *); \
  int (*sock_hash_update) (void *, void *, u64); \
  int (*msg_redirect_hash) (void *, void *, u64); \
  int (*sk_redirect_hash) (void *, void *, u64); \
  u32 max_entries; \
}; \
__attribute__((section("maps/sockhash" NM_PIN(_name)))) \
struct _name##_table_t _name = { .max_entries = (_max_entries) }; \
BPF_ANNOTATE_KV_PAIR(_name, _key_type, int)

/* An IPv4 endpoint as connect4 sees it (user_ip4/user_port): both network order.
 * The explicit pad keeps hash keys free of uninitialised bytes. */
struct nm_addr4 {
    __u32 ip4;    /* network order */
    __u16 port;   /* network order; 0 in meshed_dsts = every port of ip4 */
    __u16 _pad;   /* always 0 */
};

/* The client end of a redirected connection, as the proxy's getpeername() sees it. */
struct nm_tuple_key {
    __u32 ip4;    /* network order (bpf_sock_ops.local_ip4) */
    __u16 port;   /* HOST order (bpf_sock_ops.local_port is host order) */
    __u16 _pad;   /* always 0 */
};

/* One end of a TCP connection in sock_hash: its own address first. A socket's peer is found by
 * swapping the halves. Ports in HOST order on both sides (remote_port is converted). */
struct nm_sock_key {
    __u32 sip;    /* local IPv4, network order */
    __u32 dip;    /* remote IPv4, network order */
    __u32 sport;  /* local port, host order */
    __u32 dport;  /* remote port, host order */
};

/* Indexes of nm_counters (bpf_loader.COUNTER_NAMES lists them in this order). */
#define NM_CNT_REDIRECTED        0  /* connect4 rewrote a meshed destination */
#define NM_CNT_EXEMPT            1  /* meshed destination, but caller's cgroup is exempt */
#define NM_CNT_MOVED             2  /* sock_ops moved cookie -> tuple at ACTIVE_ESTABLISHED */
#define NM_CNT_SOCKMAP_ADDED     3  /* sock_ops put a pod<->proxy socket into sock_hash */
#define NM_CNT_SOCKMAP_FULL      4  /* sock_hash update failed (full): that socket keeps the TCP path */
#define NM_CNT_SHORTCUT_MSGS     5  /* sk_msg redirected a message straight to the peer socket */
#define NM_CNT_SHORTCUT_BYTES    6  /* ... and its bytes */
#define NM_CNT_SHORTCUT_MISS     7  /* sk_msg found no peer socket: the message took the TCP path */
#define NM_CNT_PEERNAME_RESTORED 8  /* getpeername4 answered the original destination */
#define NM_CNT_SPLICE_SKBS       9  /* sk_skb verdict moved an skb from a spliced proxy socket to its partner */
#define NM_CNT_SPLICE_BYTES     10  /* ... and its bytes */
#define NM_CNT_SPLICE_PASS      11  /* verdict ran on a socket with no partner (yet): the skb stays for user space */
#define NM_CNT_MAX              12

/* Indexes of nm_settings (bpf_loader writes them at load). */
#define NM_SET_SHORTCUT    0  /* 1 = sock_ops adds pod<->proxy sockets to sock_hash (sockmap shortcut) */
#define NM_SET_SPLICE      1  /* 1 = the agent splices new same-node L4 connections (read by user space only) */
#define NM_SET_PROXY_PORTS 2  /* how many proxy_addr entries connect4 spreads destinations over (0/1 = entry 0) */
#define NM_SET_MAX         3

/* Outbound listener ports connect4 may pick from (proxy_addr entries). */
#define NM_PROXY_PORTS_MAX 16

/* writer: agent (set_meshed) | reader: connect4. A plain hash, never LRU:
 * evicting an entry would silently un-mesh a destination. Value unused (1). */
NM_TABLE("hash", struct nm_addr4, __u32, meshed_dsts, 16384);

/* writer: agent (load, the proxy's own cgroup ids) | reader: connect4.
 * Key = cgroup id (inode of the cgroup v2 directory); exact match, not inherited. */
NM_TABLE("hash", __u64, __u32, exempt_cgroups, 64);

/* writer: agent (load) | reader: connect4, sock_ops. The node proxy's outbound listeners: index 0
 * the main one (4140), then the spread ports (nm_settings[NM_SET_PROXY_PORTS] entries in use). */
NM_TABLE("array", int, struct nm_addr4, proxy_addr, NM_PROXY_PORTS_MAX);

/* writer: agent (load) | reader: sock_ops. NM_SET_* switches. */
NM_TABLE("array", int, __u32, nm_settings, NM_SET_MAX);

/* writer: connect4 (insert) + sock_ops (delete) | reader: sock_ops.
 * Key = socket cookie; the source port is unknown at connect time. */
NM_TABLE("lru_hash", __u64, struct nm_addr4, orig_dst_by_cookie, 65536);

/* writer: connect4 | reader: getpeername4. Key = socket cookie (unique per boot, so a stale
 * entry can never answer for another socket); LRU evicts entries of closed sockets. */
NM_TABLE("lru_hash", __u64, struct nm_addr4, peer_by_cookie, 65536);

/* writer: sock_ops (insert) + agent (delete on lookup) | reader: agent
 * (lookup_original_dst from the accepted socket's getpeername()). */
NM_TABLE("lru_hash", struct nm_tuple_key, struct nm_addr4, orig_dst_by_tuple, 65536);

/* writer: sock_ops (insert; the kernel removes closed sockets) | reader: sk_msg (redirect).
 * Both ends of every pod<->proxy connection on this node. */
NM_SOCKHASH(sock_hash, struct nm_sock_key, 65536);

/* Same-node L4 kernel splice (splice.c). writer: agent (splice(): both proxy-side sockets of an
 * authorized opaque TCP connection between two local pods) | reader: sk_skb verdict (redirect
 * target). The kernel removes closed sockets. */
NM_SOCKHASH(splice_hash, struct nm_sock_key, 16384);

/* writer: agent (splice/unsplice) | reader: splice verdict, redirect.c (a pod socket whose proxy
 * end is spliced must take the TCP path, so its bytes reach the verdict, not the proxy).
 * Key = a proxy-side socket; value = its partner proxy-side socket. */
NM_TABLE("hash", struct nm_sock_key, struct nm_sock_key, splice_peer, 16384);

/* writer: splice verdict | reader + delete: agent (per-connection bytes into tcp_*_bytes_total).
 * Key = the proxy-side socket the bytes were read from. */
NM_TABLE("hash", struct nm_sock_key, __u64, splice_bytes, 16384);

/* writer: every program | reader: agent (counters()). Per-CPU: no atomics needed. */
NM_TABLE("percpu_array", int, __u64, nm_counters, NM_CNT_MAX);

/* No counting helper here on purpose: bcc rewrites map calls only when written in the main
 * file (not in a header function, not inside a macro), so each program bumps its counter
 * inline: lookup, assign, then test. */

#endif /* NODEMESH_MAPS_H */
