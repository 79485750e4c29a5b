/* sock_ops (DESIGN.md data path step 3): when a redirected client connection
 * is established, re-key its original destination from the socket cookie to
 * the client's (ip, port), which the proxy sees as getpeername() of the
 * accepted socket. ACTIVE_ESTABLISHED runs in tcp_finish_connect() before the
 * final ACK is sent, so the entry exists before the proxy's accept() returns. */
#include "include/maps.h"

int nm_sockops(struct bpf_sock_ops *skops)
{
    if (skops->family != 2 /* AF_INET */)
        return 1;

    switch (skops->op) {
    case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB: {
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
        /* SOCKHASH (sockmap short-circuit, data path step 4): insert this
         * client socket here in the sockmap issue. Not implemented yet. */
        break;
    }
    /* SOCKHASH: the proxy-side end (PASSIVE_ESTABLISHED) goes here in the sockmap issue. */
    default:
        break;
    }
    return 1;
}
