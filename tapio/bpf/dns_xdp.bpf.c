// The dns-xdp receiver's kernel side: DNS queries and responses parsed at
// XDP or TC (clsact ingress and egress), matched in the kernel.
//
// Invariants:
// - Every packet is passed on untouched (XDP_PASS, TC_ACT_UNSPEC so that
//   other classifiers still run); the programs only read.
// - A query (QR=0, to a DNS port) is remembered in `inflight`, an LRU hash
//   keyed by (client address and port, server address, DNS id, transport),
//   with the boot-clock time it was first seen. A response (QR=1, from a DNS
//   port) takes and deletes its query and becomes one ring-buffer event
//   carrying both times, so latency is measured in the kernel and never
//   reordered by the buffer. Whoever deletes an entry reports it: the
//   program (answered) or the agent's sweeper (unanswered), never both.
// - A response whose query is not in `inflight` is an event too (query_ts
//   0), unless `answered` shows the same response was just reported (a
//   packet seen twice, e.g. on both interfaces of a router).
// - Malformed DNS (and headers that cannot be parsed) is counted in
//   `counters[CNT_BAD + reason]`; a failed ring-buffer reserve in
//   `counters[CNT_LOST]`. Only constant-size headers and a bounded name
//   loop are read, each behind a bounds check against the packet's end.
//
// The agent compiles this file with -D flags: RINGBUF_PAGES, MAX_INFLIGHT,
// REPORT_UNMATCHED and PARSE_TCP (0/1), and prepends `is_dns_port(u16)` as generated C.

#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>

#define ETH_HLEN 14
#define ETH_P_IP 0x0800
#define ETH_P_IPV6 0x86DD
#define ETH_P_8021Q 0x8100
#define ETH_P_8021AD 0x88A8
#define IPPROTO_TCP 6
#define IPPROTO_UDP 17

#define MAX_VLAN_TAGS 2
#define MAX_IPV6_EXT 6
#define MAX_NAME 255            // a name's wire form, length bytes and final zero included
#define MAX_LABELS 128          // a 255-byte name has at most 127 labels
#define NAME_BUF 256
#define DNS_HLEN 12

#define HOOK_XDP 1
#define HOOK_TC_INGRESS 2
#define HOOK_TC_EGRESS 3

#define KIND_ANSWERED 1
#define KIND_RESPONSE_ONLY 2

// counter slots; the agent reads them by these numbers (see _decode.py)
#define CNT_PACKETS 0           // UDP/TCP packets to or from a DNS port
#define CNT_QUERIES 1           // queries remembered
#define CNT_QUERY_REPEATED 2    // a query already remembered (retransmission, or seen twice)
#define CNT_RESPONSES 3
#define CNT_MATCHED 4
#define CNT_UNMATCHED 5         // responses without their query
#define CNT_DUPLICATE 6         // a response already reported
#define CNT_MISMATCHED 7        // id matched, question did not
#define CNT_LOST 8              // ring buffer full
#define CNT_FRAGMENT 9          // non-first IP fragments (no UDP header)
#define CNT_TCP_SKIPPED 10      // TCP segments that do not start a DNS message
#define CNT_LATE 11             // a response racing the agent's expiry of its query
#define CNT_BAD 16              // + one of the BAD_* reasons below
#define BAD_IP_HEADER 0
#define BAD_UDP_LENGTH 1
#define BAD_DNS_HEADER 2        // shorter than the 12-byte DNS header (zero-length UDP included)
#define BAD_NO_QUESTION 3
#define BAD_LABEL 4             // a label type other than a plain length (0x40, 0x80)
#define BAD_POINTER 5           // a compression pointer in the first name: nothing precedes it
#define BAD_NAME_TOO_LONG 6
#define BAD_TRUNCATED_QUESTION 7
#define BAD_IPV6_EXT 8          // more extension headers than followed, or truncated
#define BAD_L4_HEADER 9
#define CNT_SLOTS 32

// a response seen again within this window is the same packet seen twice
#define DUPLICATE_WINDOW_NS 1000000000ULL

struct flow_key {
    u8 client[16];      // IPv4 as the first 4 bytes, the rest zero
    u8 server[16];
    u16 client_port;
    u16 id;             // host byte order
    u8 family;          // 4 or 6
    u8 proto;           // IPPROTO_UDP or IPPROTO_TCP
    u16 pad;
};

struct query {
    u64 ts;             // bpf_ktime_get_boot_ns() when first seen
    u32 ifindex;
    u16 server_port;
    u16 qtype;
    u16 qclass;
    u16 flags;          // the query's flags word
    u16 name_len;       // bytes of name[] (wire form without the final zero)
    u16 vlan;           // outermost VLAN id, 0 if untagged
    u8 hook;
    u8 pad[7];
    u8 name[NAME_BUF];
};

struct event {
    u64 query_ts;       // 0: a response whose query was not seen
    u64 response_ts;
    u32 query_ifindex;
    u32 response_ifindex;
    u8 client[16];
    u8 server[16];
    u16 client_port;
    u16 server_port;
    u16 id;
    u16 flags;          // the response's flags word (QR, opcode, AA, TC, RD, RA, AD, CD, rcode)
    u16 query_flags;
    u16 qtype;
    u16 qclass;
    u16 ancount;
    u16 nscount;
    u16 arcount;
    u16 name_len;
    u16 query_vlan;
    u16 response_vlan;
    u16 size;           // the response's DNS message length (UDP payload or TCP length prefix)
    u8 family;
    u8 proto;
    u8 query_hook;
    u8 response_hook;
    u8 kind;
    u8 pad[7];
    u8 name[NAME_BUF];
};

// What one packet parsed to; built on the stack before any map is touched.
struct parsed {
    struct flow_key key;
    u16 server_port;
    u16 flags;
    u16 qtype;
    u16 qclass;
    u16 ancount;
    u16 nscount;
    u16 arcount;
    u16 name_len;
    u16 vlan;
    u16 size;
    u32 name_off;       // where the name's wire form starts, from the packet's start
};

BPF_RINGBUF_OUTPUT(events, RINGBUF_PAGES);
BPF_PERCPU_ARRAY(counters, u64, CNT_SLOTS);
BPF_PERCPU_ARRAY(query_scratch, struct query, 1);
BPF_TABLE("lru_hash", struct flow_key, struct query, inflight, MAX_INFLIGHT);
BPF_TABLE("lru_hash", struct flow_key, u64, answered, MAX_INFLIGHT);

static __always_inline void count(u32 slot) {
    u64 *c = counters.lookup(&slot);
    if (c)
        *c += 1;
}

static __always_inline u16 load_be16(u8 *p) {
    return ((u16)p[0] << 8) | p[1];
}

// Parse from the Ethernet header to the first question. Returns 1 for a DNS
// message to remember or match, 0 for a packet that is not DNS, and -1 for
// one already counted as bad.
static __always_inline int parse(void *data, void *data_end, u16 meta_vlan, struct parsed *out) {
    u8 *p = data;
    if ((void *)(p + ETH_HLEN) > data_end)
        return 0;
    u16 proto = load_be16(p + 12);
    u32 off = ETH_HLEN;
    out->vlan = meta_vlan;
#pragma unroll
    for (int i = 0; i < MAX_VLAN_TAGS; i++) {
        if (proto != ETH_P_8021Q && proto != ETH_P_8021AD)
            break;
        if ((void *)(p + off + 4) > data_end)
            return 0;
        if (!out->vlan)
            out->vlan = load_be16(p + off) & 0x0FFF;
        proto = load_be16(p + off + 2);
        off += 4;
    }

    u8 l4;
    u8 *l4h;
    u8 *l3_end;         // the IP packet's end by its own length field (Ethernet pads short frames)
    if (proto == ETH_P_IP) {
        u8 *ip = p + off;
        if ((void *)(ip + 20) > data_end)
            return 0;
        u32 ihl = (ip[0] & 0x0F) * 4;
        u16 total = load_be16(ip + 2);
        if ((ip[0] >> 4) != 4 || ihl < 20 || total < ihl) {
            count(CNT_BAD + BAD_IP_HEADER);
            return -1;
        }
        l4 = ip[9];
        if (l4 != IPPROTO_UDP && l4 != IPPROTO_TCP)
            return 0;
        if (load_be16(ip + 6) & 0x1FFF) {       // fragment offset: no L4 header here
            count(CNT_FRAGMENT);
            return 0;
        }
        l4h = ip + (ihl & 0x3C);
        l3_end = ip + (total & 0xFFFF);
        if ((void *)(l4h + 4) > data_end)
            return 0;
        if (!is_dns_port(load_be16(l4h + 2)) && !is_dns_port(load_be16(l4h)))
            return 0;
        out->key.family = 4;
        out->key.proto = l4;
        // source and destination; swapped below if this is a response
        __builtin_memcpy(out->key.client, ip + 12, 4);
        __builtin_memcpy(out->key.server, ip + 16, 4);
    } else if (proto == ETH_P_IPV6) {
        u8 *ip = p + off;
        if ((void *)(ip + 40) > data_end)
            return 0;
        if ((ip[0] >> 4) != 6) {
            count(CNT_BAD + BAD_IP_HEADER);
            return -1;
        }
        l3_end = ip + 40 + load_be16(ip + 4);
        u8 next = ip[6];
        u8 *h = ip + 40;
        u32 hoff = 40;
#pragma unroll
        for (int i = 0; i < MAX_IPV6_EXT; i++) {
            if (next == IPPROTO_UDP || next == IPPROTO_TCP)
                break;
            if (next != 0 && next != 43 && next != 44 && next != 60 && next != 51)
                return 0;                              // no next header (59), ESP, ICMPv6 ...
            h = ip + (hoff & 0x7FF);
            if ((void *)(h + 8) > data_end) {
                count(CNT_BAD + BAD_IPV6_EXT);
                return -1;
            }
            u32 len;
            if (next == 44) {                          // fragment header: fixed 8 bytes
                if (load_be16(h + 2) & 0xFFF8) {      // not the first fragment
                    count(CNT_FRAGMENT);
                    return 0;
                }
                len = 8;
            } else if (next == 51) {
                len = ((u32)h[1] + 2) * 4;             // AH counts 4-byte words
            } else {
                len = ((u32)h[1] + 1) * 8;
            }
            next = h[0];
            hoff += len;
        }
        if (next != IPPROTO_UDP && next != IPPROTO_TCP) {
            if (next == 0 || next == 43 || next == 44 || next == 60 || next == 51)
                count(CNT_BAD + BAD_IPV6_EXT);
            return 0;
        }
        l4 = next;
        l4h = ip + (hoff & 0x7FF);
        if ((void *)(l4h + 4) > data_end)
            return 0;
        u16 sport = load_be16(l4h), dport = load_be16(l4h + 2);
        if (!is_dns_port(dport) && !is_dns_port(sport))
            return 0;
        out->key.family = 6;
        out->key.proto = l4;
        __builtin_memcpy(out->key.client, ip + 8, 16);
        __builtin_memcpy(out->key.server, ip + 24, 16);
    } else {
        return 0;
    }

    if (l4 == IPPROTO_TCP && !PARSE_TCP)
        return 0;
    count(CNT_PACKETS);
    u8 *dns;
    u8 *end = l3_end;
    if (l4 == IPPROTO_UDP) {
        if ((void *)(l4h + 8) > data_end) {
            count(CNT_BAD + BAD_L4_HEADER);
            return -1;
        }
        u16 ulen = load_be16(l4h + 4);
        if (ulen < 8 || l4h + ulen > l3_end) {
            count(CNT_BAD + BAD_UDP_LENGTH);
            return -1;
        }
        end = l4h + ulen;
        dns = l4h + 8;
        out->size = ulen - 8;
    } else {
        if ((void *)(l4h + 20) > data_end) {
            count(CNT_BAD + BAD_L4_HEADER);
            return -1;
        }
        u32 doff = (l4h[12] >> 4) * 4;
        if (doff < 20) {
            count(CNT_BAD + BAD_L4_HEADER);
            return -1;
        }
        u8 *payload = l4h + (doff & 0x3C);
        if (payload >= l3_end)
            return 0;                                  // a bare ACK, SYN or FIN
        // best effort: a segment that starts with the 2-byte length and a whole DNS header
        if ((void *)(payload + 2 + DNS_HLEN) > data_end || payload + 2 + DNS_HLEN > l3_end) {
            count(CNT_TCP_SKIPPED);
            return 0;
        }
        out->size = load_be16(payload);
        if (out->size < DNS_HLEN) {
            count(CNT_TCP_SKIPPED);
            return 0;
        }
        dns = payload + 2;
    }
    if (end > (u8 *)data_end)
        end = data_end;

    if ((void *)(dns + DNS_HLEN) > data_end || dns + DNS_HLEN > end) {
        count(CNT_BAD + BAD_DNS_HEADER);
        return -1;
    }
    out->key.id = load_be16(dns);
    out->flags = load_be16(dns + 2);
    u16 qdcount = load_be16(dns + 4);
    out->ancount = load_be16(dns + 6);
    out->nscount = load_be16(dns + 8);
    out->arcount = load_be16(dns + 10);
    u16 sport = load_be16(l4h), dport = load_be16(l4h + 2);
    int is_response = out->flags >> 15;
    if (is_response ? !is_dns_port(sport) : !is_dns_port(dport))
        return 0;                                      // e.g. a query sent from port 53
    if (qdcount == 0) {
        count(CNT_BAD + BAD_NO_QUESTION);
        return -1;
    }

    // The first name: length-prefixed labels ending in a zero byte, walked
    // label by label (not byte by byte: the verifier follows each iteration).
    // It is the first name of the message, so a compression pointer cannot
    // be valid.
    // Every header path converges here as one offset, so that the verifier
    // walks the name loop once for all of them rather than once per path.
    u32 qoff = ((u8 *)dns - (u8 *)data + DNS_HLEN) & 0x3FF;
    u32 endoff = ((u8 *)end - (u8 *)data) & 0xFFFF;
    u8 *q = (u8 *)data + qoff;
    end = (u8 *)data + endoff;
    u32 len = 0;
    int done = 0;
    for (int i = 0; i < MAX_LABELS; i++) {
        u8 *c = q + (len & 0x1FF);
        if ((void *)(c + 1) > data_end || c + 1 > end) {
            count(CNT_BAD + BAD_TRUNCATED_QUESTION);
            return -1;
        }
        u8 b = *c;
        if (b == 0) {
            done = 1;
            break;
        }
        if ((b & 0xC0) == 0xC0) {
            count(CNT_BAD + BAD_POINTER);
            return -1;
        }
        if (b & 0xC0) {
            count(CNT_BAD + BAD_LABEL);
            return -1;
        }
        len += 1 + b;
        if (len >= MAX_NAME) {
            count(CNT_BAD + BAD_NAME_TOO_LONG);
            return -1;
        }
    }
    if (!done) {
        count(CNT_BAD + BAD_NAME_TOO_LONG);
        return -1;
    }
    u8 *tail = q + (len & 0xFF) + 1;
    if ((void *)(tail + 4) > data_end || tail + 4 > end) {
        count(CNT_BAD + BAD_TRUNCATED_QUESTION);
        return -1;
    }
    out->qtype = load_be16(tail);
    out->qclass = load_be16(tail + 2);
    out->name_off = (u8 *)q - (u8 *)data;
    out->name_len = len;

    if (is_response) {
        // the client is the destination: swap to the query's orientation
        u8 tmp[16];
        __builtin_memcpy(tmp, out->key.client, 16);
        __builtin_memcpy(out->key.client, out->key.server, 16);
        __builtin_memcpy(out->key.server, tmp, 16);
        out->key.client_port = dport;
        out->server_port = sport;
    } else {
        out->key.client_port = sport;
        out->server_port = dport;
    }
    return 1;
}

// Copy the name's wire form (len bytes, bounds-checked by parse) into a
// NAME_BUF buffer whose rest is zero, so that two names compare word by word.
static __always_inline int load_name(void *ctx, u8 hook, u32 off, u32 len, u8 *dst) {
    u64 *w = (u64 *)dst;
#pragma unroll
    for (int i = 0; i < NAME_BUF / 8; i++)
        w[i] = 0;
    len &= 0xFF;
    if (len == 0)
        return 0;
    if (hook == HOOK_XDP)
        return bpf_xdp_load_bytes(ctx, off, dst, len);
    return bpf_skb_load_bytes(ctx, off, dst, len);
}

static __always_inline int same_name(u8 *a, u8 *b) {
    u64 *x = (u64 *)a, *y = (u64 *)b;
    u64 diff = 0;
#pragma unroll
    for (int i = 0; i < NAME_BUF / 8; i++)
        diff |= x[i] ^ y[i];
    return diff == 0;
}

static __always_inline void on_query(void *ctx, struct parsed *m, u32 ifindex, u8 hook) {
    int zero = 0;
    struct query *q = query_scratch.lookup(&zero);
    if (!q)
        return;
    if (load_name(ctx, hook, m->name_off, m->name_len, q->name) != 0) {
        count(CNT_BAD + BAD_TRUNCATED_QUESTION);
        return;
    }
    q->ts = bpf_ktime_get_boot_ns();
    q->ifindex = ifindex;
    q->server_port = m->server_port;
    q->qtype = m->qtype;
    q->qclass = m->qclass;
    q->flags = m->flags;
    q->name_len = m->name_len;
    q->vlan = m->vlan;
    q->hook = hook;
    if (inflight.insert(&m->key, q) == 0)
        count(CNT_QUERIES);
    else
        count(CNT_QUERY_REPEATED);
}

static __always_inline void on_response(void *ctx, struct parsed *m, u32 ifindex, u8 hook) {
    u64 now = bpf_ktime_get_boot_ns();
    count(CNT_RESPONSES);
    struct event *e = events.ringbuf_reserve(sizeof(struct event));
    if (!e) {
        count(CNT_LOST);
        // forget the query so that the agent does not report it unanswered
        inflight.delete(&m->key);
        return;
    }
    if (load_name(ctx, hook, m->name_off, m->name_len, e->name) != 0) {
        count(CNT_BAD + BAD_TRUNCATED_QUESTION);
        events.ringbuf_discard(e, 0);
        return;
    }
    struct query *q = inflight.lookup(&m->key);
    if (q && (q->qtype != m->qtype || q->name_len != m->name_len || !same_name(q->name, e->name))) {
        count(CNT_MISMATCHED);
        q = NULL;
    }
    if (!q) {
        u64 *seen = answered.lookup(&m->key);
        if (seen && now - *seen < DUPLICATE_WINDOW_NS) {
            count(CNT_DUPLICATE);
            events.ringbuf_discard(e, 0);
            return;
        }
        count(CNT_UNMATCHED);
        if (!REPORT_UNMATCHED) {
            events.ringbuf_discard(e, 0);
            return;
        }
        e->query_ts = 0;
        e->query_ifindex = 0;
        e->query_flags = 0;
        e->query_vlan = 0;
        e->query_hook = 0;
        e->kind = KIND_RESPONSE_ONLY;
    } else {
        e->query_ts = q->ts;
        e->query_ifindex = q->ifindex;
        e->query_flags = q->flags;
        e->query_vlan = q->vlan;
        e->query_hook = q->hook;
        e->kind = KIND_ANSWERED;
        if (inflight.delete(&m->key) != 0) {
            // the agent expired this query between our lookup and delete: it reports it
            count(CNT_LATE);
            events.ringbuf_discard(e, 0);
            return;
        }
        count(CNT_MATCHED);
        answered.update(&m->key, &now);
    }
    e->response_ts = now;
    e->response_ifindex = ifindex;
    __builtin_memcpy(e->client, m->key.client, 16);
    __builtin_memcpy(e->server, m->key.server, 16);
    e->client_port = m->key.client_port;
    e->server_port = m->server_port;
    e->id = m->key.id;
    e->flags = m->flags;
    e->qtype = m->qtype;
    e->qclass = m->qclass;
    e->ancount = m->ancount;
    e->nscount = m->nscount;
    e->arcount = m->arcount;
    e->name_len = m->name_len;
    e->response_vlan = m->vlan;
    e->size = m->size;
    e->family = m->key.family;
    e->proto = m->key.proto;
    e->response_hook = hook;
    events.ringbuf_submit(e, 0);
}

static __always_inline void handle(void *ctx, void *data, void *data_end, u32 ifindex, u8 hook, u16 meta_vlan) {
    struct parsed m = {};
    if (parse(data, data_end, meta_vlan, &m) != 1)
        return;
    if (m.flags >> 15)
        on_response(ctx, &m, ifindex, hook);
    else
        on_query(ctx, &m, ifindex, hook);
}

int tapio_dns_xdp(struct xdp_md *ctx) {
    handle(ctx, (void *)(long)ctx->data, (void *)(long)ctx->data_end, ctx->ingress_ifindex, HOOK_XDP, 0);
    return XDP_PASS;
}

// Enough of a packet to hold the headers and a question of the longest name.
#define TC_PULL_LEN 640

static __always_inline void tc_handle(struct __sk_buff *skb, u8 hook) {
    void *data = (void *)(long)skb->data;
    void *data_end = (void *)(long)skb->data_end;
    u32 linear = data_end - data;
    if (linear < skb->len && linear < TC_PULL_LEN) {
        // the headers may be in paged data: make the first bytes direct-readable
        bpf_skb_pull_data(skb, skb->len < TC_PULL_LEN ? skb->len : TC_PULL_LEN);
        data = (void *)(long)skb->data;
        data_end = (void *)(long)skb->data_end;
    }
    u16 vlan = skb->vlan_present ? (skb->vlan_tci & 0x0FFF) : 0;
    handle(skb, data, data_end, skb->ifindex, hook, vlan);
}

int tapio_dns_tc_in(struct __sk_buff *skb) {
    tc_handle(skb, HOOK_TC_INGRESS);
    return TC_ACT_UNSPEC;
}

int tapio_dns_tc_eg(struct __sk_buff *skb) {
    tc_handle(skb, HOOK_TC_EGRESS);
    return TC_ACT_UNSPEC;
}
