/* sk_skb stream verdict on splice_hash (same-node L4 kernel splice): once the proxy has decided
 * the route and authorization of an opaque TCP connection between two pods of this node, it puts
 * both of its own sockets (client side, upstream side) into splice_hash and names each one's
 * partner in splice_peer. Every skb either socket receives is then sent out of the partner
 * socket by the kernel, without waking the proxy. Bytes are counted per socket (splice_bytes)
 * so the proxy still reports them; FIN/RST still reach the proxy, which closes the pair. */
#include "include/maps.h"

int nm_splice(struct __sk_buff *skb)
{
    /* A FIN arrives as an empty skb: keep it on this socket (the proxy must see the close, and
     * forwarding it would race the proxy's own shutdown of the partner: EPIPE). */
    if (skb->len == 0)
        return SK_PASS;

    struct nm_sock_key self = {};
    self.sip = skb->local_ip4;
    self.dip = skb->remote_ip4;
    self.sport = skb->local_port;                        /* host order */
    self.dport = __builtin_bswap32(skb->remote_port);    /* network (<<16 on LE) -> host */

    struct nm_sock_key *partner = splice_peer.lookup(&self);
    if (!partner) {
        int pidx = NM_CNT_SPLICE_PASS;
        __u64 *pcnt = nm_counters.lookup(&pidx);
        if (pcnt)
            *pcnt += 1;
        return SK_PASS;   /* not (yet) spliced: the proxy reads it */
    }
    struct nm_sock_key target = *partner;
    __u64 len = skb->len;
    __u64 zero = 0;
    splice_bytes.lookup_or_try_init(&self, &zero);
    __u64 *bytes = splice_bytes.lookup(&self);
    if (bytes)
        __sync_fetch_and_add(bytes, len);
    int idx = NM_CNT_SPLICE_SKBS;
    __u64 *cnt = nm_counters.lookup(&idx);
    if (cnt)
        *cnt += 1;
    int bidx = NM_CNT_SPLICE_BYTES;
    __u64 *b = nm_counters.lookup(&bidx);
    if (b)
        *b += len;
    return splice_hash.sk_redirect_hash(skb, &target, 0);   /* 0 = out of the partner (egress) */
}
