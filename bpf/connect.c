/* cgroup/connect4 (DESIGN.md data path step 2): redirect TCP connects to meshed
 * destinations to the node proxy, remembering the original destination by
 * socket cookie (the source port is not known yet; sockops.c re-keys it).
 * Attached to the node's cgroup, so it runs for every pod cgroup below it,
 * whatever netns the socket lives in. Always allows the connect. */
#include "include/maps.h"

int nm_connect4(struct bpf_sock_addr *ctx)
{
    /* SOCK_STREAM is not defined in the bcc compile environment: 1 is TCP. */
    if (ctx->type != 1)
        return 1;

    struct nm_addr4 dst = {};
    dst.ip4 = ctx->user_ip4;
    dst.port = (__u16)ctx->user_port;

    /* Exact (ip, port) first, then (ip, 0) = every port of that IP. Map calls
     * are assigned before testing: bcc may fail to compile them inside an if. */
    __u32 *meshed = meshed_dsts.lookup(&dst);
    if (!meshed) {
        struct nm_addr4 any = {};
        any.ip4 = dst.ip4;
        meshed = meshed_dsts.lookup(&any);
        if (!meshed)
            return 1;
    }

    int zero = 0;
    struct nm_addr4 *proxy = proxy_addr.lookup(&zero);
    if (!proxy || proxy->ip4 == 0 || proxy->port == 0)
        return 1;   /* agent has not configured the proxy yet: pass untouched */
    if (proxy->ip4 == dst.ip4) {
        /* Already aimed at one of the proxy's listeners: never record the proxy as a destination. */
#pragma unroll
        for (int i = 0; i < NM_PROXY_PORTS_MAX; i++) {
            int slot = i;
            struct nm_addr4 *listener = proxy_addr.lookup(&slot);
            if (listener && listener->port != 0 && listener->port == dst.port)
                return 1;
        }
    }

    /* The proxy's own upstream connects must not loop back into it. */
    __u64 cgid = bpf_get_current_cgroup_id();
    __u32 *exempt = exempt_cgroups.lookup(&cgid);
    if (exempt) {
        int idx = NM_CNT_EXEMPT;
        __u64 *cnt = nm_counters.lookup(&idx);
        if (cnt)
            *cnt += 1;
        return 1;
    }

    __u64 cookie = bpf_get_socket_cookie(ctx);
    orig_dst_by_cookie.update(&cookie, &dst);
    peer_by_cookie.update(&cookie, &dst);   /* for getpeername4 (transparency) */

    /* One proxy port per original destination (a hash over the spread ports). With a single
     * port every redirected socket of a pod would share one remote (ip, port), so the pod's
     * ephemeral ports, unique per 4-tuple, would run out on TIME_WAITs of clients that close
     * first (~28k per minute for ALL its meshed traffic: measured, connects slowed to 3 ms and
     * new connections/s fell over 10x); per destination, the tuple space is what direct traffic has. */
    int set = NM_SET_PROXY_PORTS;
    __u32 *nports = nm_settings.lookup(&set);
    if (nports && *nports > 1 && *nports <= NM_PROXY_PORTS_MAX) {
        __u32 h = dst.ip4 ^ ((__u32)dst.port << 16);   /* murmur3's finalizer: every bit counts */
        h ^= h >> 16;
        h *= 0x85ebca6bu;
        h ^= h >> 13;
        h *= 0xc2b2ae35u;
        h ^= h >> 16;
        int slot = (int)(h % *nports);
        struct nm_addr4 *spread = proxy_addr.lookup(&slot);
        if (spread && spread->ip4 == proxy->ip4 && spread->port != 0)
            proxy = spread;
    }
    ctx->user_ip4 = proxy->ip4;
    ctx->user_port = (__u32)proxy->port;
    int idx = NM_CNT_REDIRECTED;
    __u64 *cnt = nm_counters.lookup(&idx);
    if (cnt)
        *cnt += 1;
    return 1;
}
