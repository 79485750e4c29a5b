/* sk_msg on sock_hash (DESIGN.md data path step 4, Merbridge-style): a message sent on a
 * pod<->proxy socket goes straight into the receive queue of the socket at the other end,
 * skipping the TCP/IP stack of this host. If the peer is not in sock_hash (full, or the other
 * end is not ours) the message takes the normal TCP path: never dropped. */
#include "include/maps.h"

int nm_redirect(struct sk_msg_md *msg)
{
    struct nm_sock_key peer = {};
    peer.sip = msg->remote_ip4;
    peer.dip = msg->local_ip4;
    peer.sport = __builtin_bswap32(msg->remote_port);   /* network (<<16 on LE) -> host */
    peer.dport = msg->local_port;                       /* host order */
    /* The proxy spliced this connection (splice.c): the bytes must reach its socket through TCP,
     * where the sk_skb verdict forwards them in the kernel, not its user-space receive queue. */
    struct nm_sock_key *spliced = splice_peer.lookup(&peer);
    if (spliced)
        return SK_PASS;
    long rc = sock_hash.msg_redirect_hash(msg, &peer, BPF_F_INGRESS);
    int idx = rc == SK_PASS ? NM_CNT_SHORTCUT_MSGS : NM_CNT_SHORTCUT_MISS;
    __u64 *cnt = nm_counters.lookup(&idx);
    if (cnt)
        *cnt += 1;
    if (rc == SK_PASS) {
        int bidx = NM_CNT_SHORTCUT_BYTES;
        __u64 *bytes = nm_counters.lookup(&bidx);
        if (bytes)
            *bytes += msg->size;
    }
    return SK_PASS;
}
