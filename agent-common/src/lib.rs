//! Types shared between the eBPF programs (`agent-ebpf`) and user space (`agent`).
//!
//! Every type is `#[repr(C)]`, `Copy`, and laid out without implicit padding so the kernel and
//! user space agree byte for byte. Addresses are always stored as 16 bytes in network order:
//! IPv4 addresses in their IPv4-mapped IPv6 form (`::ffff:a.b.c.d`), so one key type serves both
//! families.
#![no_std]

/// Names of the maps in the eBPF object; user space pins and opens them by these names.
pub mod maps {
    pub const CAPTURE_CONFIG: &str = "CAPTURE_CONFIG";
    pub const EXCLUDE_V4: &str = "EXCLUDE_V4";
    pub const EXCLUDE_V6: &str = "EXCLUDE_V6";
    pub const INCLUDE_V4: &str = "INCLUDE_V4";
    pub const INCLUDE_V6: &str = "INCLUDE_V6";
    pub const EXCLUDE_PORTS: &str = "EXCLUDE_PORTS";
    pub const GOVERNED_UIDS: &str = "GOVERNED_UIDS";
    pub const PENDING_BY_COOKIE: &str = "PENDING_BY_COOKIE";
    pub const CONNECTIONS: &str = "CONNECTIONS";
    pub const ORIGINAL_BY_COOKIE: &str = "ORIGINAL_BY_COOKIE";
    pub const UDP_ALLOW: &str = "UDP_ALLOW";
    pub const REFUSALS: &str = "REFUSALS";
    pub const UNIX_ALLOW: &str = "UNIX_ALLOW";
    pub const DNS_BY_COOKIE: &str = "DNS_BY_COOKIE";
    pub const UDP_OWNER: &str = "UDP_OWNER";
    pub const UDP_FLOWS: &str = "UDP_FLOWS";
    /// The kernel fast path (`capture.fast_path`): both ends of redirected connections.
    pub const FAST_PATH: &str = "FAST_PATH";
    /// Per sending socket: may its sends skip the loopback TCP stack (`FAST_PATH_*` values).
    pub const FAST_PATH_STATE: &str = "FAST_PATH_STATE";
    /// Per-CPU counters of the fast path (`FAST_PATH_STAT_*` indexes).
    pub const FAST_PATH_STATS: &str = "FAST_PATH_STATS";
    /// Every map, in the order user space pins them.
    pub const ALL: [&str; 19] = [
        CAPTURE_CONFIG,
        EXCLUDE_V4,
        EXCLUDE_V6,
        INCLUDE_V4,
        INCLUDE_V6,
        EXCLUDE_PORTS,
        GOVERNED_UIDS,
        PENDING_BY_COOKIE,
        CONNECTIONS,
        ORIGINAL_BY_COOKIE,
        UDP_ALLOW,
        REFUSALS,
        UNIX_ALLOW,
        DNS_BY_COOKIE,
        UDP_OWNER,
        UDP_FLOWS,
        FAST_PATH,
        FAST_PATH_STATE,
        FAST_PATH_STATS,
    ];
}

/// Names of the programs in the eBPF object.
pub mod programs {
    pub const CONNECT4: &str = "bulkhead_connect4";
    pub const CONNECT6: &str = "bulkhead_connect6";
    pub const SOCK_OPS: &str = "bulkhead_sock_ops";
    pub const GETPEERNAME4: &str = "bulkhead_getpeername4";
    pub const GETPEERNAME6: &str = "bulkhead_getpeername6";
    pub const SENDMSG4: &str = "bulkhead_sendmsg4";
    pub const SENDMSG6: &str = "bulkhead_sendmsg6";
    /// `cgroup/recvmsg4/6`: a reply from the DNS forwarder shows the resolver as its source.
    pub const RECVMSG4: &str = "bulkhead_recvmsg4";
    pub const RECVMSG6: &str = "bulkhead_recvmsg6";
    /// `cgroup_skb/egress`: counts the datagrams that leave for allowed UDP destinations.
    pub const UDP_EGRESS: &str = "bulkhead_udp_egress";
    /// `lsm_cgroup/socket_create`: every address family (needs the BPF LSM).
    pub const SOCKET_CREATE: &str = "bulkhead_socket_create";
    /// `cgroup/sock_create`: the fallback where the BPF LSM is not active (inet sockets only).
    pub const SOCK_CREATE: &str = "bulkhead_sock_create";
    /// `sk_msg` on `FAST_PATH`: a send goes straight to the peer socket's receive queue.
    /// Attached (to the map, not the cgroup) only with `capture.fast_path`.
    pub const FAST_PATH_MSG: &str = "bulkhead_fast_path";
    /// The programs every daemon attaches, in the order user space attaches them; then one of
    /// `SOCKET_CREATE` or `SOCK_CREATE`.
    pub const ALL: [&str; 9] = [
        CONNECT4,
        CONNECT6,
        SOCK_OPS,
        GETPEERNAME4,
        GETPEERNAME6,
        SENDMSG4,
        SENDMSG6,
        RECVMSG4,
        RECVMSG6,
    ];
}

/// Maximum entries of the per-connection maps (LRU: a record nobody collects is evicted).
pub const MAX_CONNECTIONS: u32 = 65_536;
/// Maximum entries of each CIDR trie.
pub const MAX_CIDRS: u32 = 1_024;
/// Maximum entries of `UDP_ALLOW` (resolvers and allowed UDP destinations).
pub const MAX_UDP_ALLOW: u32 = 1_024;
/// Size of the `REFUSALS` ring buffer in bytes (a power of two, a multiple of the page size).
pub const REFUSALS_BYTES: u32 = 256 * 1024;
/// Maximum excluded ports and governed uids.
pub const MAX_PORTS: u32 = 1_024;
pub const MAX_UIDS: u32 = 1_024;

/// Capture loopback destinations (127.0.0.0/8, ::1, ::ffff:127.0.0.0/104) too.
pub const FLAG_CAPTURE_LOOPBACK: u32 = 1 << 0;
/// Capture only the uids in `GOVERNED_UIDS`.
pub const FLAG_UID_FILTER: u32 = 1 << 1;
/// Capture only destinations in `INCLUDE_V4`/`INCLUDE_V6`.
pub const FLAG_INCLUDE_FILTER: u32 = 1 << 2;
/// Governed processes may open ICMP echo ("ping") sockets.
pub const FLAG_ALLOW_PING: u32 = 1 << 3;
/// Governed processes may open raw IP sockets (`SOCK_RAW`; needs `CAP_NET_RAW` anyway).
pub const FLAG_ALLOW_RAW: u32 = 1 << 4;
/// Governed processes may open SCTP sockets.
pub const FLAG_ALLOW_SCTP: u32 = 1 << 5;
/// Governed processes may open MPTCP sockets (not redirected: they bypass the gateway).
pub const FLAG_ALLOW_MPTCP: u32 = 1 << 6;
/// Governed processes may open packet sockets (`AF_PACKET`; needs `CAP_NET_RAW` anyway).
pub const FLAG_ALLOW_PACKET: u32 = 1 << 7;
/// Set by user space once the configuration is complete. Without it every TCP connect from the
/// governed cgroup is refused: a half-configured redirect must not let traffic through.
pub const FLAG_READY: u32 = 1 << 31;
/// Put redirected sockets in `FAST_PATH` when they are established (`capture.fast_path`).
pub const FLAG_FAST_PATH: u32 = 1 << 8;

/// The single entry of `CAPTURE_CONFIG`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CaptureConfig {
    /// Where IPv6 connects are sent (the daemon's IPv6 listener, normally `::1`).
    pub listener_v6: [u8; 16],
    /// Where IPv4 (and IPv4-mapped) connects are sent, network order.
    pub listener_v4: [u8; 4],
    /// `FLAG_*` bits.
    pub flags: u32,
    /// The daemon's listening port, host order. Same port on both families.
    pub listener_port: u16,
    pub reserved: [u8; 6],
}

impl CaptureConfig {
    pub const fn has(&self, flag: u32) -> bool {
        self.flags & flag != 0
    }
}

/// What the kernel saw at `connect()`: where the process wanted to go and who it was.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnectRecord {
    pub cgroup_id: u64,
    /// Original destination, 16 bytes network order (IPv4 as IPv4-mapped).
    pub dst_addr: [u8; 16],
    /// Original destination port, host order.
    pub dst_port: u16,
    /// `AF_INET` or `AF_INET6`: the family of the socket that connected.
    pub family: u16,
    /// Thread id (the kernel's pid).
    pub pid: u32,
    /// Process id (the kernel's tgid).
    pub tgid: u32,
    pub uid: u32,
    pub gid: u32,
    pub comm: [u8; 16],
    pub reserved: u32,
}

/// Key of `CONNECTIONS`: the governed socket's local address and port, which is the peer the
/// daemon sees on `accept()`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SockKey {
    /// 16 bytes network order (IPv4 as IPv4-mapped).
    pub addr: [u8; 16],
    /// Host order.
    pub port: u32,
}

/// Key of `FAST_PATH` and `FAST_PATH_STATE`: a TCP socket's own 4-tuple. A socket finds its
/// peer on loopback under the mirrored key (local and remote swapped).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlowKey {
    /// 16 bytes network order (IPv4 as IPv4-mapped).
    pub local_addr: [u8; 16],
    pub remote_addr: [u8; 16],
    /// Host order.
    pub local_port: u32,
    pub remote_port: u32,
}

impl FlowKey {
    /// The key the socket at the other end of this connection is stored under.
    #[must_use]
    pub const fn mirrored(&self) -> Self {
        Self {
            local_addr: self.remote_addr,
            remote_addr: self.local_addr,
            local_port: self.remote_port,
            remote_port: self.local_port,
        }
    }
}

/// `FAST_PATH_STATE`: the socket has sent nothing yet; its next send may take the fast path.
pub const FAST_PATH_UNDECIDED: u32 = 0;
/// Its sends go to the peer's receive queue.
pub const FAST_PATH_ON: u32 = 1;
/// Some of its bytes went through TCP: all the rest do too (a redirected send would overtake
/// bytes still queued in the peer's TCP receive queue).
pub const FAST_PATH_OFF: u32 = 2;
/// `FAST_PATH_STATS` indexes.
pub const FAST_PATH_STAT_REDIRECTED: u32 = 0;
pub const FAST_PATH_STAT_REDIRECTED_BYTES: u32 = 1;
pub const FAST_PATH_STAT_PASSED: u32 = 2;
pub const FAST_PATH_STAT_PASSED_BYTES: u32 = 3;
/// Sockets put in `FAST_PATH` by `sock_ops` (governed ends).
pub const FAST_PATH_STAT_CLIENTS: u32 = 4;
/// `sock_ops` could not put a governed socket in `FAST_PATH`.
pub const FAST_PATH_STAT_CLIENT_FAILED: u32 = 5;
pub const FAST_PATH_STATS_LEN: u32 = 6;

/// Key of `UNIX_ALLOW`: a unix socket address's `sun_path`, zero-padded (an abstract name
/// starts with its 0 byte).
pub const UNIX_KEY_BYTES: usize = 112;
/// Maximum entries of `UNIX_ALLOW`.
pub const MAX_UNIX_ALLOW: u32 = 256;

/// A unix socket connect or send the kernel refused (`cgroup/connect_unix`, `sendmsg_unix`),
/// as the hand-written program in `agent/src/ebpf/unix.rs` writes it: 144 bytes, told apart
/// from a `Refusal` (80 bytes) by its length.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnixRefusal {
    /// `REFUSED_UNIX`.
    pub kind: u32,
    pub tgid: u32,
    pub uid: u32,
    pub reserved: u32,
    pub comm: [u8; 16],
    pub path: [u8; UNIX_KEY_BYTES],
}
pub const REFUSED_UNIX: u32 = 4;

/// What a `Refusal` refused.
pub const REFUSED_UDP_CONNECT: u32 = 1;
pub const REFUSED_UDP_SENDMSG: u32 = 2;
pub const REFUSED_SOCKET: u32 = 3;

/// A governed process's attempt the kernel refused, sent to the daemon through `REFUSALS` so it
/// is recorded. For UDP the record's destination is the datagram's; for a socket, the record's
/// destination is zero and `family`/`sock_type`/`protocol` are the `socket()` arguments.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub record: ConnectRecord,
    /// `REFUSED_*`.
    pub kind: u32,
    pub family: u32,
    pub sock_type: u32,
    pub protocol: u32,
}

/// `UDP_ALLOW` values: a destination datagrams may go to directly, or a resolver whose
/// datagrams the kernel sends to the daemon's DNS forwarder (the listener's address and port,
/// over UDP), which records and relays them.
pub const UDP_DIRECT: u8 = 1;
pub const UDP_RESOLVER: u8 = 2;

/// Key of `UDP_FLOWS`: a governed UDP socket (by cookie) and a destination it sent to
/// (16 bytes, IPv4 as mapped; port in host order).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct UdpFlowKey {
    pub cookie: u64,
    pub addr: [u8; 16],
    pub port: u16,
    pub family: u16,
    pub reserved: u32,
}

/// What left on one `UdpFlowKey`: cumulative, `bpf_ktime_get_ns` (CLOCK_MONOTONIC) times.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UdpFlow {
    pub first_ns: u64,
    pub last_ns: u64,
    pub datagrams: u64,
    /// UDP payload bytes.
    pub bytes: u64,
}

/// Key of `UDP_ALLOW`, an LPM trie: the port (network order) and then the address (16 bytes,
/// IPv4 as mapped), so a prefix of `16 + n` bits matches that port and the first `n` bits of
/// the address. Entries are always longer than 16 bits: a port is never a wildcard.
pub const UDP_KEY_BYTES: usize = 18;

pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;

/// `addr` as an IPv4-mapped IPv6 address, from the kernel's network-order `u32`.
#[inline(always)]
pub const fn v4_mapped(ip_be: [u8; 4]) -> [u8; 16] {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, ip_be[0], ip_be[1], ip_be[2], ip_be[3],
    ]
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all six types are `repr(C)`, `Copy`, contain only integers and arrays of
    // integers, and have no implicit padding (checked by the size assertions below).
    unsafe impl aya::Pod for super::CaptureConfig {}
    unsafe impl aya::Pod for super::ConnectRecord {}
    unsafe impl aya::Pod for super::SockKey {}
    unsafe impl aya::Pod for super::Refusal {}
    unsafe impl aya::Pod for super::UnixRefusal {}
    unsafe impl aya::Pod for super::UdpFlowKey {}
    unsafe impl aya::Pod for super::UdpFlow {}
    unsafe impl aya::Pod for super::FlowKey {}
}

const _: () = assert!(core::mem::size_of::<CaptureConfig>() == 32);
const _: () = assert!(core::mem::size_of::<ConnectRecord>() == 64);
const _: () = assert!(core::mem::size_of::<SockKey>() == 20);
const _: () = assert!(core::mem::size_of::<Refusal>() == 80);
const _: () = assert!(core::mem::size_of::<UnixRefusal>() == 144);
const _: () = assert!(core::mem::size_of::<UdpFlowKey>() == 32);
const _: () = assert!(core::mem::size_of::<UdpFlow>() == 32);
const _: () = assert!(core::mem::size_of::<FlowKey>() == 40);
