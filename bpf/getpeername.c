/* cgroup/getpeername4 (transparency, as Cilium's socket-LB): a pod that calls getpeername() on
 * a redirected socket sees the address it dialed (e.g. the service VIP), not the node proxy's.
 * connect4 remembered the original destination by socket cookie in peer_by_cookie. */
#include "include/maps.h"

int nm_getpeername4(struct bpf_sock_addr *ctx)
{
    if (ctx->type != 1)   /* SOCK_STREAM */
        return 1;
    __u64 cookie = bpf_get_socket_cookie(ctx);
    struct nm_addr4 *orig = peer_by_cookie.lookup(&cookie);
    if (!orig)
        return 1;
    ctx->user_ip4 = orig->ip4;
    ctx->user_port = (__u32)orig->port;
    int idx = NM_CNT_PEERNAME_RESTORED;
    __u64 *cnt = nm_counters.lookup(&idx);
    if (cnt)
        *cnt += 1;
    return 1;
}
