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
//! UDP and other non-stream sockets are never touched.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{
        bpf_sock_addr, bpf_sock_ops, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
        BPF_SOCK_OPS_TCP_CONNECT_CB, BPF_TCP_CLOSE, BPF_TCP_SYN_SENT,
    },
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_get_current_pid_tgid,
        bpf_get_current_uid_gid, bpf_get_socket_cookie,
    },
    macros::{cgroup_sock_addr, map, sock_ops},
    maps::{lpm_trie::Key, Array, HashMap, LpmTrie, LruHashMap},
    programs::{SockAddrContext, SockOpsContext},
};
use aya_log_ebpf::{debug, warn};
use bulkhead_common::{
    v4_mapped, CaptureConfig, ConnectRecord, SockKey, AF_INET, AF_INET6, FLAG_CAPTURE_LOOPBACK,
    FLAG_INCLUDE_FILTER, FLAG_READY, FLAG_UID_FILTER, MAX_CIDRS, MAX_CONNECTIONS, MAX_PORTS,
    MAX_UIDS,
};

/// `connect()` may proceed (possibly rewritten).
const ALLOW: i32 = 1;
/// `connect()` fails with `EPERM`.
const REJECT: i32 = 0;
const SOCK_STREAM: u32 = 1;

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

/// The original destination of this (redirected, stream) socket, if it was dialled as `family`.
#[inline(always)]
fn original(ctx: &SockAddrContext, family: u16) -> Option<Original> {
    // SAFETY: the kernel hands the program a valid `bpf_sock_addr`.
    if !is_stream(unsafe { &*ctx.sock_addr }) {
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

#[inline(always)]
fn record(ctx: &SockAddrContext, dst: [u8; 16], port: u16, family: u16) -> Result<(), i32> {
    let pid_tgid = bpf_get_current_pid_tgid();
    let uid_gid = bpf_get_current_uid_gid();
    let rec = ConnectRecord {
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
    };
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

fn try_connect6(ctx: &SockAddrContext) -> Result<i32, i32> {
    // SAFETY: the kernel hands the program a valid `bpf_sock_addr`.
    let sa = unsafe { &mut *ctx.sock_addr };
    if !is_stream(sa) {
        return Ok(ALLOW);
    }
    let cfg = config(ctx)?;
    let words = sa.user_ip6;
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

fn try_sock_ops(ctx: &SockOpsContext) {
    match ctx.op() {
        BPF_SOCK_OPS_TCP_CONNECT_CB => on_connect(ctx),
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
/// past SYN_SENT (the daemon was down: nothing listened), the daemon never took its record,
/// which would otherwise wait for whoever next connects to the listener from the same local
/// address and port, and lend them this process's identity.
#[inline(always)]
fn on_close(ctx: &SockOpsContext) {
    // SAFETY: the context pointer is the program's own `bpf_sock_ops`.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.ops.cast()) };
    let _ = ORIGINAL_BY_COOKIE.remove(&cookie);
    if ctx.arg(0) == BPF_TCP_SYN_SENT {
        if let Some(key) = local_key(ctx) {
            let _ = CONNECTIONS.remove(&key);
        }
    }
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

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
