/* sock_ops (DESIGN.md data path steps 3 and 4).
 * - ACTIVE_ESTABLISHED of a redirected client connection: re-key its original destination from
 *   the socket cookie to the client's (ip, port), which the proxy sees as getpeername() of the
 *   accepted socket. This runs in tcp_finish_connect() before the final ACK is sent, so the
 *   entry exists before the proxy's accept() returns.
 * - Both ends of every connection to or from the node proxy's address (pod -> outbound
 *   listener, proxy -> local pod) go into sock_hash, so redirect.c can hand their bytes
 *   straight to the peer socket. Both ends are sockets of this host (the proxy address is the
 *   node's own bridge address). If sock_hash is full the socket keeps the TCP path (counted). */
#include "include/maps.h"

int nm_sockops(struct bpf_sock_ops *skops)
{
    if (skops->family != 2 /* AF_INET */)
        return 1;
    if (skops->op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB && skops->op != BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB)
        return 1;

    if (skops->op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB) {
        __u64 cookie = bpf_get_socket_cookie(skops);
        struct nm_addr4 *orig = orig_dst_by_cookie.lookup(&cookie);
        if (orig) {
            struct nm_tuple_key key = {};
            key.ip4 = skops->local_ip4;            /* network order */
            key.port = (__u16)skops->local_port;   /* host order */
            struct nm_addr4 val = *orig;           /* copy before deleting the entry it points to */
            orig_dst_by_tuple.update(&key, &val);
            orig_dst_by_cookie.delete(&cookie);
            int idx = NM_CNT_MOVED;
            __u64 *cnt = nm_counters.lookup(&idx);
            if (cnt)
                *cnt += 1;
        }
    }

    int set = NM_SET_SHORTCUT;
    __u32 *shortcut = nm_settings.lookup(&set);
    if (!shortcut || *shortcut == 0)
        return 1;
    int zero = 0;
    struct nm_addr4 *proxy = proxy_addr.lookup(&zero);
    if (!proxy || proxy->ip4 == 0)
        return 1;
    if (skops->local_ip4 != proxy->ip4 && skops->remote_ip4 != proxy->ip4)
        return 1;

    struct nm_sock_key key = {};
    key.sip = skops->local_ip4;
    key.dip = skops->remote_ip4;
    key.sport = skops->local_port;                          /* host order */
    key.dport = __builtin_bswap32(skops->remote_port);      /* network (<<16 on LE) -> host */
    int rc = sock_hash.sock_hash_update(skops, &key, BPF_NOEXIST);
    int idx = rc == 0 ? NM_CNT_SOCKMAP_ADDED : NM_CNT_SOCKMAP_FULL;
    __u64 *cnt = nm_counters.lookup(&idx);
    if (cnt)
        *cnt += 1;
    return 1;
}
