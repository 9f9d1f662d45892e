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
    /// Every map, in the order user space pins them.
    pub const ALL: [&str; 10] = [
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
    ];
}

/// Names of the programs in the eBPF object.
pub mod programs {
    pub const CONNECT4: &str = "bulkhead_connect4";
    pub const CONNECT6: &str = "bulkhead_connect6";
    pub const SOCK_OPS: &str = "bulkhead_sock_ops";
    pub const GETPEERNAME4: &str = "bulkhead_getpeername4";
    pub const GETPEERNAME6: &str = "bulkhead_getpeername6";
    /// Every program, in the order user space attaches them.
    pub const ALL: [&str; 5] = [CONNECT4, CONNECT6, SOCK_OPS, GETPEERNAME4, GETPEERNAME6];
}

/// Maximum entries of the per-connection maps (LRU: a record nobody collects is evicted).
pub const MAX_CONNECTIONS: u32 = 65_536;
/// Maximum entries of each CIDR trie.
pub const MAX_CIDRS: u32 = 1_024;
/// Maximum excluded ports and governed uids.
pub const MAX_PORTS: u32 = 1_024;
pub const MAX_UIDS: u32 = 1_024;

/// Capture loopback destinations (127.0.0.0/8, ::1, ::ffff:127.0.0.0/104) too.
pub const FLAG_CAPTURE_LOOPBACK: u32 = 1 << 0;
/// Capture only the uids in `GOVERNED_UIDS`.
pub const FLAG_UID_FILTER: u32 = 1 << 1;
/// Capture only destinations in `INCLUDE_V4`/`INCLUDE_V6`.
pub const FLAG_INCLUDE_FILTER: u32 = 1 << 2;
/// Set by user space once the configuration is complete. Without it every TCP connect from the
/// governed cgroup is refused: a half-configured redirect must not let traffic through.
pub const FLAG_READY: u32 = 1 << 31;

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
    // SAFETY: all four types are `repr(C)`, `Copy`, contain only integers and arrays of
    // integers, and have no implicit padding (checked by the size assertions below).
    unsafe impl aya::Pod for super::CaptureConfig {}
    unsafe impl aya::Pod for super::ConnectRecord {}
    unsafe impl aya::Pod for super::SockKey {}
}

const _: () = assert!(core::mem::size_of::<CaptureConfig>() == 32);
const _: () = assert!(core::mem::size_of::<ConnectRecord>() == 64);
const _: () = assert!(core::mem::size_of::<SockKey>() == 20);
