//! Bulkhead's kernel side.
//!
//! * `cgroup/connect4` and `cgroup/connect6` run on every `connect()` made inside the governed
//!   cgroup. A captured TCP connect is rewritten to the daemon's loopback listener and what the
//!   kernel knows about it (original destination, pid/tgid, uid/gid, comm, cgroup id) is stored
//!   under the socket's cookie.
//! * `sock_ops` runs when that socket sends its SYN (`TCP_CONNECT_CB`), when its local address
//!   and port are known, and moves the record to a key the daemon can compute from `accept()`:
//!   the client's local address and port. It then follows that socket's state: when it closes,
//!   its records go (a connect refused while the daemon was down leaves none behind).
//! * `cgroup/getpeername4` and `cgroup/getpeername6` answer `getpeername()` on a redirected
//!   socket with the original destination, not the daemon's listener, so the governed process
//!   sees the peer it dialled.
//!
//! * `cgroup/connect4/6` (for UDP sockets) and `cgroup/sendmsg4/6` decide every datagram
//!   destination of a governed process: a configured resolver or an allowed UDP destination
//!   (`UDP_ALLOW`) passes; anything else is refused (`EPERM`) and reported to the daemon
//!   through the `REFUSALS` ring buffer, which records it.
//! * A datagram to a configured resolver (`UDP_ALLOW` value `UDP_RESOLVER`) is sent to the
//!   daemon's DNS forwarder instead (the listener's address and port, over UDP); who sent it
//!   and to which resolver is kept under the socket's cookie (`DNS_BY_COOKIE`), where the
//!   forwarder finds it. `cgroup/recvmsg4/6` (and `getpeername`) show the forwarder's replies
//!   as coming from that resolver, so resolvers that check the source (glibc) accept them.
//! * `lsm_cgroup/socket_create` (the BPF LSM; `cgroup/sock_create` where it is not active,
//!   which sees inet sockets only) refuses the sockets a governed process could leave by
//!   without a `connect()` the gateway sees: raw, packet, ping, SCTP, MPTCP and every address
//!   family but inet, inet6, unix and netlink, unless the configuration allows them.
//!
//! * The fast path (`capture.fast_path`): `sock_ops` puts a redirected socket in `FAST_PATH`
//!   when it is established (the daemon puts its accepted end there itself), and `sk_msg` on
//!   that map moves each send of either end straight into the other end's receive queue,
//!   skipping the loopback TCP stack. A socket whose first send found no peer keeps using TCP
//!   for good (`FAST_PATH_STATE`): a redirected send would be read before older bytes still
//!   waiting in the peer's TCP receive queue.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{
        bpf_sock_addr, bpf_sock_ops, sk_action::SK_PASS, sk_msg_md, BPF_ANY, BPF_F_INGRESS,
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
        BPF_SOCK_OPS_TCP_CONNECT_CB, BPF_TCP_CLOSE, BPF_TCP_ESTABLISHED, BPF_TCP_SYN_SENT,
    },
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_get_current_pid_tgid,
        bpf_get_current_uid_gid, bpf_get_socket_cookie, bpf_ktime_get_ns,
    },
    macros::{cgroup_skb, cgroup_sock, cgroup_sock_addr, lsm_cgroup, map, sk_msg, sock_ops},
    maps::{lpm_trie::Key, Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf, SockHash},
    programs::{
        LsmContext, SkBuffContext, SkMsgContext, SockAddrContext, SockContext, SockOpsContext,
    },
};
use aya_log_ebpf::{debug, warn};
use bulkhead_common::{
    v4_mapped, CaptureConfig, ConnectRecord, FlowKey, Refusal, SockKey, UdpFlow, UdpFlowKey,
    AF_INET, AF_INET6, FAST_PATH_OFF, FAST_PATH_ON, FAST_PATH_STATS_LEN, FAST_PATH_STAT_CLIENTS,
    FAST_PATH_STAT_CLIENT_FAILED, FAST_PATH_STAT_PASSED, FAST_PATH_STAT_PASSED_BYTES,
    FAST_PATH_STAT_REDIRECTED, FAST_PATH_STAT_REDIRECTED_BYTES, FAST_PATH_UNDECIDED,
    FLAG_ALLOW_MPTCP, FLAG_ALLOW_PACKET, FLAG_ALLOW_PING, FLAG_ALLOW_RAW, FLAG_ALLOW_SCTP,
    FLAG_CAPTURE_LOOPBACK, FLAG_FAST_PATH, FLAG_INCLUDE_FILTER, FLAG_READY, FLAG_UID_FILTER,
    MAX_CIDRS, MAX_CONNECTIONS, MAX_PORTS, MAX_UDP_ALLOW, MAX_UIDS, MAX_UNIX_ALLOW, REFUSALS_BYTES,
    REFUSED_SOCKET, REFUSED_UDP_CONNECT, REFUSED_UDP_SENDMSG, UDP_KEY_BYTES, UDP_RESOLVER,
    UNIX_KEY_BYTES,
};

/// `connect()` may proceed (possibly rewritten).
const ALLOW: i32 = 1;
/// `connect()` fails with `EPERM`.
const REJECT: i32 = 0;
const SOCK_STREAM: u32 = 1;
const SOCK_DGRAM: u32 = 2;
const SOCK_RAW: u32 = 3;
const SOCK_SEQPACKET: u32 = 5;
/// `socket()`'s type argument also carries `SOCK_NONBLOCK`/`SOCK_CLOEXEC`.
const SOCK_TYPE_MASK: u32 = 0xf;
const AF_UNIX: u32 = 1;
const AF_NETLINK: u32 = 16;
const AF_PACKET: u32 = 17;
const IPPROTO_ICMP: u32 = 1;
const IPPROTO_TCP: u32 = 6;
const IPPROTO_UDP: u32 = 17;
const IPPROTO_ICMPV6: u32 = 58;
const IPPROTO_SCTP: u32 = 132;
const IPPROTO_MPTCP: u32 = 262;

#[map]
static CAPTURE_CONFIG: Array<CaptureConfig> = Array::with_max_entries(1, 0);
#[map]
static EXCLUDE_V4: LpmTrie<[u8; 4], u8> = LpmTrie::with_max_entries(MAX_CIDRS, 0);
#[map]
static EXCLUDE_V6: LpmTrie<[u8; 16], u8> = LpmTrie::with_max_entries(MAX_CIDRS, 0);
#[map]
static INCLUDE_V4: LpmTrie<[u8; 4], u8> = LpmTrie::with_max_entries(MAX_CIDRS, 0);
#[map]
static INCLUDE_V6: LpmTrie<[u8; 16], u8> = LpmTrie::with_max_entries(MAX_CIDRS, 0);
#[map]
static EXCLUDE_PORTS: HashMap<u16, u8> = HashMap::with_max_entries(MAX_PORTS, 0);
#[map]
static GOVERNED_UIDS: HashMap<u32, u8> = HashMap::with_max_entries(MAX_UIDS, 0);
/// Records between `connect()` and the SYN, keyed by socket cookie.
#[map]
static PENDING_BY_COOKIE: LruHashMap<u64, ConnectRecord> =
    LruHashMap::with_max_entries(MAX_CONNECTIONS, 0);
/// Records waiting for the daemon, keyed by the client's local address and port.
#[map]
static CONNECTIONS: LruHashMap<SockKey, ConnectRecord> =
    LruHashMap::with_max_entries(MAX_CONNECTIONS, 0);
/// Where each redirected socket was going, by socket cookie (unique per boot), for the
/// socket's `getpeername()`. LRU: a closed socket's entry is evicted in time.
#[map]
static ORIGINAL_BY_COOKIE: LruHashMap<u64, Original> =
    LruHashMap::with_max_entries(MAX_CONNECTIONS, 0);

/// UDP destinations governed processes may send to: `port ++ address`, longest prefix wins.
#[map]
static UDP_ALLOW: LpmTrie<[u8; UDP_KEY_BYTES], u8> = LpmTrie::with_max_entries(MAX_UDP_ALLOW, 0);
/// Refused attempts, for the daemon to record. When it is full the attempt is still refused,
/// just not recorded.
#[map]
static REFUSALS: RingBuf = RingBuf::with_byte_size(REFUSALS_BYTES, 0);
/// Datagrams a governed socket sent to a resolver, which went to the DNS forwarder instead:
/// who sent them and to which resolver (`dst_addr`, `dst_port`), by socket cookie. LRU: a
/// closed socket's entry is evicted in time.
#[map]
static DNS_BY_COOKIE: LruHashMap<u64, ConnectRecord> =
    LruHashMap::with_max_entries(MAX_CONNECTIONS, 0);
/// Who owns each governed UDP socket that sent to an allowed destination, by cookie, so the
/// daemon can attribute its `UDP_FLOWS`.
#[map]
static UDP_OWNER: LruHashMap<u64, ConnectRecord> = LruHashMap::with_max_entries(MAX_CONNECTIONS, 0);
/// Datagrams and bytes that left for allowed destinations, per socket and destination.
#[map]
static UDP_FLOWS: LruHashMap<UdpFlowKey, UdpFlow> =
    LruHashMap::with_max_entries(MAX_CONNECTIONS, 0);
/// Unix socket addresses governed processes may connect or send to. Read only by the
/// `cgroup/connect_unix` program user space assembles itself (aya cannot load that type); it
/// lives here so it is created and pinned with the rest.
#[map]
static UNIX_ALLOW: HashMap<[u8; UNIX_KEY_BYTES], u8> = HashMap::with_max_entries(MAX_UNIX_ALLOW, 0);

/// Both ends of redirected connections (`capture.fast_path`), by their own 4-tuple: the
/// governed socket (put here by `sock_ops`) and the daemon's accepted one (by the daemon).
#[map]
static FAST_PATH: SockHash<FlowKey> = SockHash::with_max_entries(2 * MAX_CONNECTIONS, 0);
/// Whether a socket in `FAST_PATH` may send through it (`FAST_PATH_*`), by its own 4-tuple.
/// Written before the socket goes in the map; a missing entry (evicted) means TCP, which is
/// always safe. LRU: entries of closed sockets go in time.
#[map]
static FAST_PATH_STATE: LruHashMap<FlowKey, u32> =
    LruHashMap::with_max_entries(2 * MAX_CONNECTIONS, 0);
/// What the fast path did (`FAST_PATH_STAT_*`), per CPU.
#[map]
static FAST_PATH_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(FAST_PATH_STATS_LEN, 0);

/// The destination a redirected socket dialled: IPv4 as mapped, the port in host order, and
/// the socket's family (which `getpeername` hook answers it).
#[derive(Clone, Copy)]
#[repr(C)]
struct Original {
    addr: [u8; 16],
    port: u16,
    family: u16,
}

#[cgroup_sock_addr(connect4)]
pub fn bulkhead_connect4(ctx: SockAddrContext) -> i32 {
    match try_connect4(&ctx) {
        Ok(verdict) | Err(verdict) => verdict,
    }
}

#[cgroup_sock_addr(connect6)]
pub fn bulkhead_connect6(ctx: SockAddrContext) -> i32 {
    match try_connect6(&ctx) {
        Ok(verdict) | Err(verdict) => verdict,
    }
}

#[cgroup_sock_addr(getpeername4)]
pub fn bulkhead_getpeername4(ctx: SockAddrContext) -> i32 {
    if let Some(o) = original(&ctx, AF_INET) {
        // SAFETY: the kernel hands the program a valid `bpf_sock_addr`.
        let sa = unsafe { &mut *ctx.sock_addr };
        sa.user_ip4 = u32::from_ne_bytes([o.addr[12], o.addr[13], o.addr[14], o.addr[15]]);
        sa.user_port = u32::from(o.port.to_be());
    }
    // getpeername hooks cannot refuse; 1 is the only valid return.
    ALLOW
}

#[cgroup_sock_addr(getpeername6)]
pub fn bulkhead_getpeername6(ctx: SockAddrContext) -> i32 {
    if let Some(o) = original(&ctx, AF_INET6) {
        // SAFETY: the kernel hands the program a valid `bpf_sock_addr`.
        let sa = unsafe { &mut *ctx.sock_addr };
        let a = o.addr;
        sa.user_ip6 = [
            u32::from_ne_bytes([a[0], a[1], a[2], a[3]]),
            u32::from_ne_bytes([a[4], a[5], a[6], a[7]]),
            u32::from_ne_bytes([a[8], a[9], a[10], a[11]]),
            u32::from_ne_bytes([a[12], a[13], a[14], a[15]]),
        ];
        sa.user_port = u32::from(o.port.to_be());
    }
    ALLOW
}

/// The original destination of this (redirected, stream) socket, if it was dialled as `family`;
/// for a UDP socket connected to the DNS forwarder, the resolver.
#[inline(always)]
fn original(ctx: &SockAddrContext, family: u16) -> Option<Original> {
    // SAFETY: the kernel hands the program a valid `bpf_sock_addr`.
    let sa = unsafe { &*ctx.sock_addr };
    if is_udp(sa) {
        let rec = if family == AF_INET {
            resolver_of_v4(ctx)
        } else {
            resolver_of_v6(ctx)
        }?;
        return Some(Original {
            addr: rec.dst_addr,
            port: rec.dst_port,
            family,
        });
    }
    if !is_stream(sa) {
        return None;
    }
    // SAFETY: the context pointer is the program's own `bpf_sock_addr`.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    // SAFETY: the value is plain bytes, copied out at once.
    let o = unsafe { ORIGINAL_BY_COOKIE.get(&cookie) }.copied()?;
    (o.family == family).then_some(o)
}

#[sock_ops]
pub fn bulkhead_sock_ops(ctx: SockOpsContext) -> u32 {
    try_sock_ops(&ctx);
    // sock_ops return values are ignored for TCP_CONNECT_CB; 1 is the conventional "ok".
    1
}

/// The configuration, or `Err(REJECT)` while user space has not finished writing it.
#[inline(always)]
fn config(ctx: &SockAddrContext) -> Result<&'static CaptureConfig, i32> {
    match CAPTURE_CONFIG.get(0) {
        Some(cfg) if cfg.has(FLAG_READY) => Ok(cfg),
        _ => {
            warn!(ctx, "bulkhead: capture config not ready, refusing connect");
            Err(REJECT)
        }
    }
}

#[inline(always)]
fn is_stream(sa: &bpf_sock_addr) -> bool {
    sa.type_ == SOCK_STREAM
}

/// Decides whether a connect to `dst` (16 bytes, IPv4 as mapped) from `uid` is captured.
/// `dst_v4` is `Some` for IPv4 and IPv4-mapped destinations.
#[inline(always)]
fn captured(
    cfg: &CaptureConfig,
    dst: &[u8; 16],
    dst_v4: Option<[u8; 4]>,
    port: u16,
    uid: u32,
) -> bool {
    // The daemon's own listener is never redirected (it is where captured connects go).
    if port == cfg.listener_port {
        let to_listener = match dst_v4 {
            Some(v4) => v4 == cfg.listener_v4 || v4 == [0, 0, 0, 0],
            None => *dst == cfg.listener_v6 || *dst == [0; 16],
        };
        if to_listener {
            return false;
        }
    }
    if !cfg.has(FLAG_CAPTURE_LOOPBACK) {
        let loopback = match dst_v4 {
            Some(v4) => v4[0] == 127 || v4 == [0, 0, 0, 0],
            None => *dst == [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1] || *dst == [0; 16],
        };
        if loopback {
            return false;
        }
    }
    // SAFETY: values are plain bytes; a concurrent update can at worst change the decision of
    // this one connect, which user space accepts while it edits the rules.
    if unsafe { EXCLUDE_PORTS.get(&port) }.is_some() {
        return false;
    }
    if cfg.has(FLAG_UID_FILTER) && unsafe { GOVERNED_UIDS.get(&uid) }.is_none() {
        return false;
    }
    let (excluded, included) = match dst_v4 {
        Some(v4) => {
            let key = Key::new(32, v4);
            (
                EXCLUDE_V4.get(&key).is_some(),
                INCLUDE_V4.get(&key).is_some(),
            )
        }
        None => {
            let key = Key::new(128, *dst);
            (
                EXCLUDE_V6.get(&key).is_some(),
                INCLUDE_V6.get(&key).is_some(),
            )
        }
    };
    if excluded {
        return false;
    }
    !cfg.has(FLAG_INCLUDE_FILTER) || included
}

/// Who is calling, and where to (zero for a socket that has no destination yet).
#[inline(always)]
fn caller(dst: [u8; 16], port: u16, family: u16) -> ConnectRecord {
    let pid_tgid = bpf_get_current_pid_tgid();
    let uid_gid = bpf_get_current_uid_gid();
    ConnectRecord {
        // SAFETY: plain helper calls without arguments.
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        dst_addr: dst,
        dst_port: port,
        family,
        pid: pid_tgid as u32,
        tgid: (pid_tgid >> 32) as u32,
        uid: uid_gid as u32,
        gid: (uid_gid >> 32) as u32,
        comm: bpf_get_current_comm().unwrap_or([0; 16]),
        reserved: 0,
    }
}

#[inline(always)]
fn record(ctx: &SockAddrContext, dst: [u8; 16], port: u16, family: u16) -> Result<(), i32> {
    let rec = caller(dst, port, family);
    // SAFETY: the context pointer is the program's own `bpf_sock_addr`.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    if PENDING_BY_COOKIE.insert(&cookie, &rec, 0).is_err() {
        // Without a record the daemon cannot know where this connection was going; refuse the
        // connect instead of redirecting a connection the daemon would have to drop anyway.
        warn!(ctx, "bulkhead: cannot record connect, refusing");
        return Err(REJECT);
    }
    // Without this entry only getpeername() shows the listener: no reason to refuse.
    let original = Original {
        addr: dst,
        port,
        family,
    };
    let _ = ORIGINAL_BY_COOKIE.insert(&cookie, &original, 0);
    Ok(())
}

fn try_connect4(ctx: &SockAddrContext) -> Result<i32, i32> {
    // SAFETY: the kernel hands the program a valid `bpf_sock_addr`.
    let sa = unsafe { &mut *ctx.sock_addr };
    if is_udp(sa) {
        return udp4(ctx, REFUSED_UDP_CONNECT);
    }
    if !is_stream(sa) {
        return Ok(ALLOW);
    }
    let cfg = config(ctx)?;
    let v4 = sa.user_ip4.to_ne_bytes();
    let port = u16::from_be(sa.user_port as u16);
    let uid = bpf_get_current_uid_gid() as u32;
    let dst = v4_mapped(v4);
    if !captured(cfg, &dst, Some(v4), port, uid) {
        return Ok(ALLOW);
    }
    record(ctx, dst, port, AF_INET)?;
    sa.user_ip4 = u32::from_ne_bytes(cfg.listener_v4);
    sa.user_port = u32::from(cfg.listener_port.to_be());
    debug!(ctx, "bulkhead: redirected connect4 to port {}", port);
    Ok(ALLOW)
}

/// A `user_ip6` value as 16 bytes, whether it is IPv4-mapped, and the IPv4 address if so.
#[inline(always)]
fn ip6(words: [u32; 4]) -> ([u8; 16], bool, Option<[u8; 4]>) {
    let mut dst = [0u8; 16];
    let mut i = 0;
    while i < 4 {
        let b = words[i].to_ne_bytes();
        dst[i * 4] = b[0];
        dst[i * 4 + 1] = b[1];
        dst[i * 4 + 2] = b[2];
        dst[i * 4 + 3] = b[3];
        i += 1;
    }
    let mapped =
        words[0] == 0 && words[1] == 0 && words[2] == u32::from_ne_bytes([0, 0, 0xff, 0xff]);
    let dst_v4 = if mapped {
        Some([dst[12], dst[13], dst[14], dst[15]])
    } else {
        None
    };
    (dst, mapped, dst_v4)
}

fn try_connect6(ctx: &SockAddrContext) -> Result<i32, i32> {
    // SAFETY: the kernel hands the program a valid `bpf_sock_addr`.
    let sa = unsafe { &mut *ctx.sock_addr };
    if is_udp(sa) {
        return udp6(ctx, REFUSED_UDP_CONNECT);
    }
    if !is_stream(sa) {
        return Ok(ALLOW);
    }
    let cfg = config(ctx)?;
    let words = sa.user_ip6;
    let (dst, mapped, dst_v4) = ip6(words);
    let port = u16::from_be(sa.user_port as u16);
    let uid = bpf_get_current_uid_gid() as u32;
    if !captured(cfg, &dst, dst_v4, port, uid) {
        return Ok(ALLOW);
    }
    record(ctx, dst, port, AF_INET6)?;
    if mapped {
        // A dual-stack socket going to IPv4: send it to the IPv4 listener, still mapped.
        sa.user_ip6 = [0, 0, words[2], u32::from_ne_bytes(cfg.listener_v4)];
    } else {
        let l = cfg.listener_v6;
        sa.user_ip6 = [
            u32::from_ne_bytes([l[0], l[1], l[2], l[3]]),
            u32::from_ne_bytes([l[4], l[5], l[6], l[7]]),
            u32::from_ne_bytes([l[8], l[9], l[10], l[11]]),
            u32::from_ne_bytes([l[12], l[13], l[14], l[15]]),
        ];
    }
    sa.user_port = u32::from(cfg.listener_port.to_be());
    debug!(ctx, "bulkhead: redirected connect6 to port {}", port);
    Ok(ALLOW)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn bulkhead_sendmsg4(ctx: SockAddrContext) -> i32 {
    // SAFETY: the kernel hands the program a valid `bpf_sock_addr`.
    if !is_udp(unsafe { &*ctx.sock_addr }) {
        return ALLOW;
    }
    match udp4(&ctx, REFUSED_UDP_SENDMSG) {
        Ok(verdict) | Err(verdict) => verdict,
    }
}

#[cgroup_sock_addr(sendmsg6)]
pub fn bulkhead_sendmsg6(ctx: SockAddrContext) -> i32 {
    // SAFETY: the kernel hands the program a valid `bpf_sock_addr`.
    if !is_udp(unsafe { &*ctx.sock_addr }) {
        return ALLOW;
    }
    match udp6(&ctx, REFUSED_UDP_SENDMSG) {
        Ok(verdict) | Err(verdict) => verdict,
    }
}

/// A UDP socket (protocol 0 is UDP for a datagram socket of an inet family).
#[inline(always)]
fn is_udp(sa: &bpf_sock_addr) -> bool {
    sa.type_ == SOCK_DGRAM && (sa.protocol == IPPROTO_UDP || sa.protocol == 0)
}

#[inline(always)]
fn udp4(ctx: &SockAddrContext, kind: u32) -> Result<i32, i32> {
    // SAFETY: the kernel hands the program a valid `bpf_sock_addr`.
    let sa = unsafe { &mut *ctx.sock_addr };
    let v4 = sa.user_ip4.to_ne_bytes();
    let port = u16::from_be(sa.user_port as u16);
    if let Some(cfg) = udp(ctx, &v4_mapped(v4), Some(v4), port, AF_INET, kind)? {
        sa.user_ip4 = u32::from_ne_bytes(cfg.listener_v4);
        sa.user_port = u32::from(cfg.listener_port.to_be());
    }
    Ok(ALLOW)
}

#[inline(always)]
fn udp6(ctx: &SockAddrContext, kind: u32) -> Result<i32, i32> {
    // SAFETY: the kernel hands the program a valid `bpf_sock_addr`.
    let sa = unsafe { &mut *ctx.sock_addr };
    let words = sa.user_ip6;
    let (dst, mapped, dst_v4) = ip6(words);
    let port = u16::from_be(sa.user_port as u16);
    if let Some(cfg) = udp(ctx, &dst, dst_v4, port, AF_INET6, kind)? {
        if mapped {
            sa.user_ip6 = [0, 0, words[2], u32::from_ne_bytes(cfg.listener_v4)];
        } else {
            let l = cfg.listener_v6;
            sa.user_ip6 = [
                u32::from_ne_bytes([l[0], l[1], l[2], l[3]]),
                u32::from_ne_bytes([l[4], l[5], l[6], l[7]]),
                u32::from_ne_bytes([l[8], l[9], l[10], l[11]]),
                u32::from_ne_bytes([l[12], l[13], l[14], l[15]]),
            ];
        }
        sa.user_port = u32::from(cfg.listener_port.to_be());
    }
    Ok(ALLOW)
}

/// A datagram a governed UDP socket receives from the DNS forwarder shows the resolver it
/// asked as its source. recvmsg hooks cannot refuse; 1 is the only valid return.
#[cgroup_sock_addr(recvmsg4)]
pub fn bulkhead_recvmsg4(ctx: SockAddrContext) -> i32 {
    if let Some(rec) = resolver_of_v4(&ctx) {
        // SAFETY: the kernel hands the program a valid `bpf_sock_addr`.
        let sa = unsafe { &mut *ctx.sock_addr };
        let a = rec.dst_addr;
        sa.user_ip4 = u32::from_ne_bytes([a[12], a[13], a[14], a[15]]);
        sa.user_port = u32::from(rec.dst_port.to_be());
    }
    ALLOW
}

#[cgroup_sock_addr(recvmsg6)]
pub fn bulkhead_recvmsg6(ctx: SockAddrContext) -> i32 {
    if let Some(rec) = resolver_of_v6(&ctx) {
        // SAFETY: the kernel hands the program a valid `bpf_sock_addr`.
        let sa = unsafe { &mut *ctx.sock_addr };
        let a = rec.dst_addr;
        sa.user_ip6 = [
            u32::from_ne_bytes([a[0], a[1], a[2], a[3]]),
            u32::from_ne_bytes([a[4], a[5], a[6], a[7]]),
            u32::from_ne_bytes([a[8], a[9], a[10], a[11]]),
            u32::from_ne_bytes([a[12], a[13], a[14], a[15]]),
        ];
        sa.user_port = u32::from(rec.dst_port.to_be());
    }
    ALLOW
}

/// The record of the resolver this UDP socket asked, when the address in `ctx` (an IPv4 peer
/// or source) is the DNS forwarder's and the resolver is IPv4.
#[inline(always)]
fn resolver_of_v4(ctx: &SockAddrContext) -> Option<ConnectRecord> {
    // SAFETY: the kernel hands the program a valid `bpf_sock_addr`.
    let sa = unsafe { &*ctx.sock_addr };
    if !is_udp(sa) {
        return None;
    }
    let cfg = CAPTURE_CONFIG.get(0)?;
    if sa.user_port != u32::from(cfg.listener_port.to_be())
        || sa.user_ip4 != u32::from_ne_bytes(cfg.listener_v4)
    {
        return None;
    }
    // SAFETY: the context pointer is the program's own `bpf_sock_addr`.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    // SAFETY: plain bytes, copied out at once.
    let rec = unsafe { DNS_BY_COOKIE.get(&cookie) }.copied()?;
    (rec.family == AF_INET).then_some(rec)
}

/// As [`resolver_of_v4`] for an IPv6 socket: the forwarder's IPv6 address, or its IPv4 one
/// mapped (a dual-stack socket that asked an IPv4 resolver).
#[inline(always)]
fn resolver_of_v6(ctx: &SockAddrContext) -> Option<ConnectRecord> {
    // SAFETY: the kernel hands the program a valid `bpf_sock_addr`.
    let sa = unsafe { &*ctx.sock_addr };
    if !is_udp(sa) {
        return None;
    }
    let cfg = CAPTURE_CONFIG.get(0)?;
    if sa.user_port != u32::from(cfg.listener_port.to_be()) {
        return None;
    }
    let (src, mapped, src_v4) = ip6(sa.user_ip6);
    let from_forwarder = if mapped {
        src_v4 == Some(cfg.listener_v4)
    } else {
        src == cfg.listener_v6
    };
    if !from_forwarder {
        return None;
    }
    // SAFETY: the context pointer is the program's own `bpf_sock_addr`.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    // SAFETY: plain bytes, copied out at once.
    let rec = unsafe { DNS_BY_COOKIE.get(&cookie) }.copied()?;
    (rec.family == AF_INET6).then_some(rec)
}

/// A datagram destination: not governed (loopback when it is not captured, excluded, another
/// uid) or an allowed destination (`Ok(None)`: it passes as it is), a resolver (`Ok(Some)`:
/// recorded, to be sent to the forwarder), or refused and reported.
#[inline(always)]
fn udp(
    ctx: &SockAddrContext,
    dst: &[u8; 16],
    dst_v4: Option<[u8; 4]>,
    port: u16,
    family: u16,
    kind: u32,
) -> Result<Option<&'static CaptureConfig>, i32> {
    let cfg = config(ctx)?;
    let uid = bpf_get_current_uid_gid() as u32;
    if !captured(cfg, dst, dst_v4, port, uid) {
        return Ok(None);
    }
    let p = port.to_be_bytes();
    let mut key = [0u8; UDP_KEY_BYTES];
    key[0] = p[0];
    key[1] = p[1];
    let mut i = 0;
    while i < 16 {
        key[2 + i] = dst[i];
        i += 1;
    }
    match UDP_ALLOW.get(&Key::new(8 * UDP_KEY_BYTES as u32, key)) {
        Some(&UDP_RESOLVER) => {
            let rec = caller(*dst, port, family);
            // SAFETY: the context pointer is the program's own `bpf_sock_addr`.
            let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
            if DNS_BY_COOKIE.insert(&cookie, &rec, 0).is_err() {
                // The forwarder relays only what it can attribute: refuse now rather than
                // send a query it would drop.
                warn!(ctx, "bulkhead: cannot record a DNS query, refusing");
                return Err(REJECT);
            }
            return Ok(Some(cfg));
        }
        Some(_) => {
            // SAFETY: the context pointer is the program's own `bpf_sock_addr`.
            let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
            // The first sender owns the socket; a lookup is cheaper than an update per
            // datagram. Without an owner its datagrams are counted by nobody: still allowed.
            // SAFETY: plain bytes, only tested for presence.
            if unsafe { UDP_OWNER.get(&cookie) }.is_none() {
                let _ = UDP_OWNER.insert(&cookie, &caller(*dst, port, family), 0);
            }
            return Ok(None);
        }
        None => {}
    }
    report(
        caller(*dst, port, family),
        kind,
        u32::from(family),
        SOCK_DGRAM,
        IPPROTO_UDP,
    );
    debug!(ctx, "bulkhead: refused UDP to port {}", port);
    Err(REJECT)
}

/// Counts each datagram a governed socket with an owner (it sent to an allowed destination)
/// sends: by socket and destination, payload bytes, first and last time. Never drops.
#[cgroup_skb(egress)]
pub fn bulkhead_udp_egress(ctx: SkBuffContext) -> i32 {
    let _ = count_udp(&ctx);
    1
}

#[inline(always)]
fn count_udp(ctx: &SkBuffContext) -> Option<()> {
    let first: u8 = ctx.load(0).ok()?;
    let (addr, family, udp_at) = match first >> 4 {
        4 => {
            if ctx.load::<u8>(9).ok()? != IPPROTO_UDP as u8 {
                return None;
            }
            // Only a datagram's first fragment has its UDP header.
            let frag: u16 = u16::from_be(ctx.load(6).ok()?);
            if frag & 0x1fff != 0 {
                return None;
            }
            let dst: [u8; 4] = ctx.load(16).ok()?;
            (v4_mapped(dst), AF_INET, usize::from(first & 0xf) * 4)
        }
        6 => {
            if ctx.load::<u8>(6).ok()? != IPPROTO_UDP as u8 {
                return None;
            }
            let dst: [u8; 16] = ctx.load(24).ok()?;
            (dst, AF_INET6, 40)
        }
        _ => return None,
    };
    // SAFETY: the context's `__sk_buff`, as the helper expects.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.skb.skb.cast()) };
    // SAFETY: plain bytes, only tested for presence.
    if unsafe { UDP_OWNER.get(&cookie) }.is_none() {
        return None;
    }
    let port = u16::from_be(ctx.load(udp_at + 2).ok()?);
    let udp_len = u16::from_be(ctx.load(udp_at + 4).ok()?);
    let key = UdpFlowKey {
        cookie,
        addr,
        port,
        family,
        reserved: 0,
    };
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_ns() };
    let bytes = u64::from(udp_len.saturating_sub(8));
    match UDP_FLOWS.get_ptr_mut(&key) {
        Some(flow) => {
            // SAFETY: a valid map value; concurrent senders on one socket may race on these
            // plain counters, which at worst undercounts.
            unsafe {
                (*flow).last_ns = now;
                (*flow).datagrams += 1;
                (*flow).bytes += bytes;
            }
        }
        None => {
            let flow = UdpFlow {
                first_ns: now,
                last_ns: now,
                datagrams: 1,
                bytes,
            };
            let _ = UDP_FLOWS.insert(&key, &flow, 0);
        }
    }
    Some(())
}

/// Tells the daemon what was refused. A full ring buffer loses the report, not the refusal.
#[inline(always)]
fn report(record: ConnectRecord, kind: u32, family: u32, sock_type: u32, protocol: u32) {
    if let Some(mut entry) = REFUSALS.reserve::<Refusal>(0) {
        entry.write(Refusal {
            record,
            kind,
            family,
            sock_type,
            protocol,
        });
        entry.submit(0);
    }
}

/// `socket()` by a governed process, with the BPF LSM: every family. 1 allows, 0 is `EPERM`.
#[lsm_cgroup(hook = "socket_create")]
pub fn bulkhead_socket_create(ctx: LsmContext) -> i32 {
    let family: i32 = ctx.arg(0);
    let sock_type: i32 = ctx.arg(1);
    let protocol: i32 = ctx.arg(2);
    let kern: i32 = ctx.arg(3);
    if kern != 0 {
        return ALLOW;
    }
    socket_verdict(family as u32, sock_type as u32, protocol as u32)
}

/// `socket()` by a governed process without the BPF LSM: the kernel runs this for inet and
/// inet6 sockets only.
#[cgroup_sock(sock_create)]
pub fn bulkhead_sock_create(ctx: SockContext) -> i32 {
    // SAFETY: the kernel hands the program a valid `bpf_sock`.
    let (family, sock_type, protocol) =
        unsafe { ((*ctx.sock).family, (*ctx.sock).type_, (*ctx.sock).protocol) };
    socket_verdict(family, sock_type, protocol)
}

#[inline(always)]
fn socket_verdict(family: u32, sock_type: u32, protocol: u32) -> i32 {
    // Until user space has written the configuration nothing is allowed beyond the defaults:
    // the allow flags only widen, so a missing configuration is the strictest one.
    let flags = match CAPTURE_CONFIG.get(0) {
        Some(cfg) if cfg.has(FLAG_READY) => {
            let uid = bpf_get_current_uid_gid() as u32;
            // SAFETY: plain bytes, read once.
            if cfg.has(FLAG_UID_FILTER) && unsafe { GOVERNED_UIDS.get(&uid) }.is_none() {
                return ALLOW;
            }
            cfg.flags
        }
        _ => 0,
    };
    if socket_allowed(flags, family, sock_type & SOCK_TYPE_MASK, protocol) {
        return ALLOW;
    }
    report(
        caller([0; 16], 0, family as u16),
        REFUSED_SOCKET,
        family,
        sock_type,
        protocol,
    );
    REJECT
}

#[inline(always)]
fn socket_allowed(flags: u32, family: u32, sock_type: u32, protocol: u32) -> bool {
    let allows = |flag: u32| flags & flag != 0;
    match family {
        AF_UNIX | AF_NETLINK => true,
        2 | 10 => match sock_type {
            SOCK_STREAM => match protocol {
                0 | IPPROTO_TCP => true,
                IPPROTO_SCTP => allows(FLAG_ALLOW_SCTP),
                IPPROTO_MPTCP => allows(FLAG_ALLOW_MPTCP),
                _ => false,
            },
            SOCK_DGRAM => match protocol {
                0 | IPPROTO_UDP => true,
                IPPROTO_ICMP | IPPROTO_ICMPV6 => allows(FLAG_ALLOW_PING),
                _ => false,
            },
            SOCK_SEQPACKET => protocol == IPPROTO_SCTP && allows(FLAG_ALLOW_SCTP),
            SOCK_RAW => allows(FLAG_ALLOW_RAW),
            _ => false,
        },
        AF_PACKET => allows(FLAG_ALLOW_PACKET),
        _ => false,
    }
}

fn try_sock_ops(ctx: &SockOpsContext) {
    match ctx.op() {
        BPF_SOCK_OPS_TCP_CONNECT_CB => on_connect(ctx),
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => on_established(ctx),
        BPF_SOCK_OPS_STATE_CB if ctx.arg(1) == BPF_TCP_CLOSE => on_close(ctx),
        _ => {}
    }
}

/// A redirected socket sends its SYN: publish its record under the key the daemon will see,
/// and ask for its state changes, so its records go when it closes.
#[inline(always)]
fn on_connect(ctx: &SockOpsContext) {
    // SAFETY: the context pointer is the program's own `bpf_sock_ops`.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.ops.cast()) };
    // SAFETY: the value is copied out before the entry is removed.
    let Some(rec) = (unsafe { PENDING_BY_COOKIE.get(&cookie) }).copied() else {
        return; // not a redirected connection
    };
    let Some(key) = local_key(ctx) else {
        return;
    };
    if CONNECTIONS.insert(&key, &rec, 0).is_err() {
        warn!(ctx, "bulkhead: cannot publish connection record");
    }
    let _ = PENDING_BY_COOKIE.remove(&cookie);
    let flags = ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG;
    if ctx.set_cb_flags(flags as i32).is_err() {
        warn!(ctx, "bulkhead: cannot follow a redirected socket's state");
    }
}

/// A redirected socket closes. Its original destination is no longer needed. If it never got
/// past SYN_SENT (the daemon was down: nothing listened), or was reset while established
/// (queued at a listener that then closed: the daemon stopped before accepting it), the
/// daemon may never have taken its record, which would otherwise wait for whoever next
/// connects to the listener from the same local address and port, and lend them this
/// process's identity. A graceful close (FIN_WAIT, CLOSE_WAIT) keeps it: a client may close
/// before the daemon accepts, and its bytes are still to be relayed.
#[inline(always)]
fn on_close(ctx: &SockOpsContext) {
    // SAFETY: the context pointer is the program's own `bpf_sock_ops`.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.ops.cast()) };
    let _ = ORIGINAL_BY_COOKIE.remove(&cookie);
    let old_state = ctx.arg(0);
    if old_state == BPF_TCP_SYN_SENT || old_state == BPF_TCP_ESTABLISHED {
        if let Some(key) = local_key(ctx) {
            let _ = CONNECTIONS.remove(&key);
        }
    }
}

/// A socket is established: if it was redirected and the fast path is on, put it in
/// `FAST_PATH`, marked as not having sent anything (it cannot have: this runs before
/// `connect()` returns).
#[inline(always)]
fn on_established(ctx: &SockOpsContext) {
    match CAPTURE_CONFIG.get(0) {
        Some(cfg) if cfg.has(FLAG_FAST_PATH) => {}
        _ => return,
    }
    // SAFETY: the context pointer is the program's own `bpf_sock_ops`.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.ops.cast()) };
    // SAFETY: only tested for presence.
    if unsafe { ORIGINAL_BY_COOKIE.get(&cookie) }.is_none() {
        return; // not a redirected connection
    }
    let Some(local) = local_key(ctx) else {
        return;
    };
    let ops = ctx.ops;
    // SAFETY: `ops` is the program's own `bpf_sock_ops`.
    let family = unsafe { (*ops).family };
    let remote_addr = if family == u32::from(AF_INET) {
        v4_mapped(remote_ip4(ops).to_ne_bytes())
    } else {
        words_to_bytes(remote_ip6(ops))
    };
    let mut key = FlowKey {
        local_addr: local.addr,
        remote_addr,
        local_port: local.port,
        remote_port: u32::from(u16::from_be((remote_port(ops) >> 16) as u16)),
    };
    if FAST_PATH_STATE
        .insert(&key, &FAST_PATH_UNDECIDED, u64::from(BPF_ANY))
        .is_err()
    {
        count(FAST_PATH_STAT_CLIENT_FAILED, 1);
        return;
    }
    // SAFETY: `ops` is the program's own `bpf_sock_ops`, valid for this call.
    let inserted = FAST_PATH.update(&mut key, unsafe { &mut *ops }, u64::from(BPF_ANY));
    if inserted.is_ok() {
        count(FAST_PATH_STAT_CLIENTS, 1);
    } else {
        // Not in the map: its sends never run the fast path program. Nothing to undo.
        count(FAST_PATH_STAT_CLIENT_FAILED, 1);
    }
}

#[inline(always)]
fn count(index: u32, n: u64) {
    if let Some(c) = FAST_PATH_STATS.get_ptr_mut(index) {
        // SAFETY: a valid per-CPU slot; nothing else writes it on this CPU meanwhile.
        unsafe { *c += n };
    }
}

/// A send on a socket in `FAST_PATH`: into the peer's receive queue when the peer is in the
/// map and every earlier send of this socket went the same way; through TCP otherwise.
#[sk_msg]
pub fn bulkhead_fast_path(ctx: SkMsgContext) -> u32 {
    fast_path(&ctx);
    // With a redirect set, SK_PASS delivers to the peer; without, it is an ordinary send.
    SK_PASS
}

#[inline(always)]
fn fast_path(ctx: &SkMsgContext) {
    let msg = ctx.msg;
    // SAFETY: `msg` is the program's own `sk_msg_md`.
    let family = unsafe { (*msg).family };
    let (local_addr, remote_addr) = if family == u32::from(AF_INET) {
        (
            v4_mapped(msg_local_ip4(msg).to_ne_bytes()),
            v4_mapped(msg_remote_ip4(msg).to_ne_bytes()),
        )
    } else if family == u32::from(AF_INET6) {
        (
            words_to_bytes(msg_local_ip6(msg)),
            words_to_bytes(msg_remote_ip6(msg)),
        )
    } else {
        return;
    };
    let own = FlowKey {
        local_addr,
        remote_addr,
        local_port: msg_local_port(msg),
        remote_port: u32::from(u16::from_be((msg_remote_port(msg) >> 16) as u16)),
    };
    let size = u64::from(msg_size(msg));
    let Some(state) = FAST_PATH_STATE.get_ptr_mut(&own) else {
        count(FAST_PATH_STAT_PASSED, 1);
        count(FAST_PATH_STAT_PASSED_BYTES, size);
        return;
    };
    // SAFETY: a valid map value; only this socket's sends (serialised by its lock) write it.
    let current = unsafe { *state };
    if current != FAST_PATH_OFF {
        let mut peer = own.mirrored();
        if FAST_PATH.redirect_msg(ctx, &mut peer, u64::from(BPF_F_INGRESS)) == i64::from(SK_PASS) {
            if current != FAST_PATH_ON {
                // SAFETY: as above.
                unsafe { *state = FAST_PATH_ON };
            }
            count(FAST_PATH_STAT_REDIRECTED, 1);
            count(FAST_PATH_STAT_REDIRECTED_BYTES, size);
            return;
        }
        // No peer (not yet in the map, or gone): TCP from now on. Leaving the fast path is
        // safe: bytes already redirected are read before anything TCP delivers after them.
        // SAFETY: as above.
        unsafe { *state = FAST_PATH_OFF };
    }
    count(FAST_PATH_STAT_PASSED, 1);
    count(FAST_PATH_STAT_PASSED_BYTES, size);
}

#[inline(always)]
fn words_to_bytes(w: [u32; 4]) -> [u8; 16] {
    let (a, b, c, d) = (
        w[0].to_ne_bytes(),
        w[1].to_ne_bytes(),
        w[2].to_ne_bytes(),
        w[3].to_ne_bytes(),
    );
    [
        a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3], c[0], c[1], c[2], c[3], d[0], d[1], d[2],
        d[3],
    ]
}

/// The socket's local address and port: the peer address the daemon sees on `accept()`.
#[inline(always)]
fn local_key(ctx: &SockOpsContext) -> Option<SockKey> {
    let ops = ctx.ops;
    // SAFETY: `ops` is the program's own `bpf_sock_ops`.
    let (family, local_port) = unsafe { ((*ops).family, (*ops).local_port) };
    let addr = if family == u32::from(AF_INET) {
        v4_mapped(local_ip4(ops).to_ne_bytes())
    } else if family == u32::from(AF_INET6) {
        let w = local_ip6(ops);
        let (a, b, c, d) = (
            w[0].to_ne_bytes(),
            w[1].to_ne_bytes(),
            w[2].to_ne_bytes(),
            w[3].to_ne_bytes(),
        );
        [
            a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3], c[0], c[1], c[2], c[3], d[0], d[1],
            d[2], d[3],
        ]
    } else {
        return None;
    };
    Some(SockKey {
        addr,
        port: local_port,
    })
}

// The verifier accepts context loads only at a constant offset from the unmodified context
// pointer. Inlined into one function, LLVM hoists `ctx + offset` out of the family branches and
// loads through the moved pointer, which the verifier rejects; separate functions keep each
// load a plain `*(u32 *)(r1 + off)`.

#[inline(never)]
fn local_ip4(ops: *mut bpf_sock_ops) -> u32 {
    // SAFETY: `ops` is the program's own context.
    unsafe { core::ptr::read_volatile(&raw const (*ops).local_ip4) }
}

#[inline(never)]
fn local_ip6(ops: *mut bpf_sock_ops) -> [u32; 4] {
    // SAFETY: `ops` is the program's own context.
    unsafe {
        [
            core::ptr::read_volatile(&raw const (*ops).local_ip6[0]),
            core::ptr::read_volatile(&raw const (*ops).local_ip6[1]),
            core::ptr::read_volatile(&raw const (*ops).local_ip6[2]),
            core::ptr::read_volatile(&raw const (*ops).local_ip6[3]),
        ]
    }
}

#[inline(never)]
fn remote_ip4(ops: *mut bpf_sock_ops) -> u32 {
    // SAFETY: `ops` is the program's own context.
    unsafe { core::ptr::read_volatile(&raw const (*ops).remote_ip4) }
}

#[inline(never)]
fn remote_ip6(ops: *mut bpf_sock_ops) -> [u32; 4] {
    // SAFETY: `ops` is the program's own context.
    unsafe {
        [
            core::ptr::read_volatile(&raw const (*ops).remote_ip6[0]),
            core::ptr::read_volatile(&raw const (*ops).remote_ip6[1]),
            core::ptr::read_volatile(&raw const (*ops).remote_ip6[2]),
            core::ptr::read_volatile(&raw const (*ops).remote_ip6[3]),
        ]
    }
}

/// The remote port, network order in the upper 16 bits (as the kernel exposes it).
#[inline(never)]
fn remote_port(ops: *mut bpf_sock_ops) -> u32 {
    // SAFETY: `ops` is the program's own context.
    unsafe { core::ptr::read_volatile(&raw const (*ops).remote_port) }
}

#[inline(never)]
fn msg_local_ip4(msg: *mut sk_msg_md) -> u32 {
    // SAFETY: `msg` is the program's own context.
    unsafe { core::ptr::read_volatile(&raw const (*msg).local_ip4) }
}

#[inline(never)]
fn msg_remote_ip4(msg: *mut sk_msg_md) -> u32 {
    // SAFETY: `msg` is the program's own context.
    unsafe { core::ptr::read_volatile(&raw const (*msg).remote_ip4) }
}

#[inline(never)]
fn msg_local_ip6(msg: *mut sk_msg_md) -> [u32; 4] {
    // SAFETY: `msg` is the program's own context.
    unsafe {
        [
            core::ptr::read_volatile(&raw const (*msg).local_ip6[0]),
            core::ptr::read_volatile(&raw const (*msg).local_ip6[1]),
            core::ptr::read_volatile(&raw const (*msg).local_ip6[2]),
            core::ptr::read_volatile(&raw const (*msg).local_ip6[3]),
        ]
    }
}

#[inline(never)]
fn msg_remote_ip6(msg: *mut sk_msg_md) -> [u32; 4] {
    // SAFETY: `msg` is the program's own context.
    unsafe {
        [
            core::ptr::read_volatile(&raw const (*msg).remote_ip6[0]),
            core::ptr::read_volatile(&raw const (*msg).remote_ip6[1]),
            core::ptr::read_volatile(&raw const (*msg).remote_ip6[2]),
            core::ptr::read_volatile(&raw const (*msg).remote_ip6[3]),
        ]
    }
}

/// Host order.
#[inline(never)]
fn msg_local_port(msg: *mut sk_msg_md) -> u32 {
    // SAFETY: `msg` is the program's own context.
    unsafe { core::ptr::read_volatile(&raw const (*msg).local_port) }
}

/// Network order in the upper 16 bits.
#[inline(never)]
fn msg_remote_port(msg: *mut sk_msg_md) -> u32 {
    // SAFETY: `msg` is the program's own context.
    unsafe { core::ptr::read_volatile(&raw const (*msg).remote_port) }
}

#[inline(never)]
fn msg_size(msg: *mut sk_msg_md) -> u32 {
    // SAFETY: `msg` is the program's own context.
    unsafe { core::ptr::read_volatile(&raw const (*msg).size) }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
