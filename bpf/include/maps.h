/* Shared structs and maps of the nodemesh redirect programs.
 *
 * connect.c and sockops.c are compiled as ONE bcc module (agent/bpf_loader.py
 * #includes both), so every map below exists once and both programs share it.
 * Every map says who writes it and who reads it. The agent's bpf_loader.py is
 * the only user-space code that touches these maps.
 *
 * Byte orders: IPv4 addresses are always network order. Ports are network
 * order except in struct nm_tuple_key, which mirrors bpf_sock_ops.local_port
 * (host order).
 */
#ifndef NODEMESH_MAPS_H
#define NODEMESH_MAPS_H

#include <uapi/linux/bpf.h>

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

/* Indexes of nm_counters (bpf_loader.COUNTER_NAMES lists them in this order). */
#define NM_CNT_REDIRECTED   0  /* connect4 rewrote a meshed destination */
#define NM_CNT_EXEMPT       1  /* meshed destination, but caller's cgroup is exempt */
#define NM_CNT_MOVED        2  /* sock_ops moved cookie -> tuple at ACTIVE_ESTABLISHED */
#define NM_CNT_MAX          3

/* writer: agent (set_meshed) | reader: connect4. A plain hash, never LRU:
 * evicting an entry would silently un-mesh a destination. Value unused (1). */
BPF_HASH(meshed_dsts, struct nm_addr4, __u32, 16384);

/* writer: agent (load, the proxy's own cgroup ids) | reader: connect4.
 * Key = cgroup id (inode of the cgroup v2 directory); exact match, not inherited. */
BPF_HASH(exempt_cgroups, __u64, __u32, 64);

/* writer: agent (load) | reader: connect4. Index 0 = the node proxy's outbound listener. */
BPF_ARRAY(proxy_addr, struct nm_addr4, 1);

/* writer: connect4 (insert) + sock_ops (delete) | reader: sock_ops.
 * Key = socket cookie; the source port is unknown at connect time. */
BPF_TABLE("lru_hash", __u64, struct nm_addr4, orig_dst_by_cookie, 65536);

/* writer: sock_ops (insert) + agent (delete on lookup) | reader: agent
 * (lookup_original_dst from the accepted socket's getpeername()). */
BPF_TABLE("lru_hash", struct nm_tuple_key, struct nm_addr4, orig_dst_by_tuple, 65536);

/* writer: connect4 + sock_ops | reader: agent (counters()). Per-CPU: no atomics needed. */
BPF_PERCPU_ARRAY(nm_counters, __u64, NM_CNT_MAX);

/* No counting helper here on purpose: bcc rewrites map calls only when written in the main
 * file (not in a header function, not inside a macro), so each program bumps its counter
 * inline: lookup, assign, then test. */

#endif /* NODEMESH_MAPS_H */
