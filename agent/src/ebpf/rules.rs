//! Capture rules: the configuration turned into the values the eBPF maps hold.
//!
//! Pure, so the translation is tested without a kernel; [`decide`] mirrors the kernel's
//! decision over the same values and is what `bulkhead status` and tests reason with.

use std::net::{IpAddr, SocketAddr};

use bulkhead_common::{
    CaptureConfig as KernelConfig, FLAG_ALLOW_MPTCP, FLAG_ALLOW_PACKET, FLAG_ALLOW_PING,
    FLAG_ALLOW_RAW, FLAG_ALLOW_SCTP, FLAG_CAPTURE_LOOPBACK, FLAG_INCLUDE_FILTER, FLAG_READY,
    FLAG_UID_FILTER, UDP_KEY_BYTES,
};

use crate::{
    config::{Config, SocketKind},
    net::{to_kernel_bytes, Cidr},
};

/// A `UDP_ALLOW` entry: key (`port ++ address`) and prefix length in bits.
pub type UdpEntry = ([u8; UDP_KEY_BYTES], u32);

/// The `UDP_ALLOW` entry for `port` on the network `net` (IPv4 as mapped, like the kernel's).
pub fn udp_entry(net: Cidr, port: u16) -> UdpEntry {
    let mut key = [0u8; UDP_KEY_BYTES];
    key[..2].copy_from_slice(&port.to_be_bytes());
    key[2..].copy_from_slice(&to_kernel_bytes(net.addr()));
    let addr_bits = match net.addr() {
        IpAddr::V4(_) => 96 + u32::from(net.prefix()),
        IpAddr::V6(_) => u32::from(net.prefix()),
    };
    (key, 16 + addr_bits)
}

/// Everything user space writes into the maps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaptureRules {
    /// Written with `FLAG_READY` last, after every other map is filled.
    pub config: KernelConfig,
    pub exclude_v4: Vec<([u8; 4], u32)>,
    pub exclude_v6: Vec<([u8; 16], u32)>,
    pub include_v4: Vec<([u8; 4], u32)>,
    pub include_v6: Vec<([u8; 16], u32)>,
    pub exclude_ports: Vec<u16>,
    pub uids: Vec<u32>,
    /// Allowed UDP destinations (datagrams pass as they are).
    pub udp_allow: Vec<UdpEntry>,
    /// Resolvers (datagrams go to the DNS forwarder, which records and relays them).
    pub resolvers: Vec<UdpEntry>,
    /// Unix socket addresses governed processes may connect or send to.
    pub unix_allow: Vec<[u8; bulkhead_common::UNIX_KEY_BYTES]>,
}

fn split(cidrs: &[Cidr]) -> (Vec<([u8; 4], u32)>, Vec<([u8; 16], u32)>) {
    let mut v4 = Vec::new();
    let mut v6 = Vec::new();
    for c in cidrs {
        match c.addr() {
            IpAddr::V4(a) => v4.push((a.octets(), u32::from(c.prefix()))),
            IpAddr::V6(a) => v6.push((a.octets(), u32::from(c.prefix()))),
        }
    }
    (v4, v6)
}

impl CaptureRules {
    pub fn from_config(config: &Config) -> Self {
        let mut flags = FLAG_READY;
        if config.capture.loopback {
            flags |= FLAG_CAPTURE_LOOPBACK;
        }
        if !config.governed.uids.is_empty() {
            flags |= FLAG_UID_FILTER;
        }
        if !config.capture.include.is_empty() {
            flags |= FLAG_INCLUDE_FILTER;
        }
        if config.capture.fast_path {
            flags |= bulkhead_common::FLAG_FAST_PATH;
        }
        for kind in &config.capture.sockets {
            flags |= match kind {
                SocketKind::Ping => FLAG_ALLOW_PING,
                SocketKind::Raw => FLAG_ALLOW_RAW,
                SocketKind::Sctp => FLAG_ALLOW_SCTP,
                SocketKind::Mptcp => FLAG_ALLOW_MPTCP,
                SocketKind::Packet => FLAG_ALLOW_PACKET,
            };
        }
        let host = |ip: IpAddr| {
            Cidr::new(ip, if ip.is_ipv4() { 32 } else { 128 }).expect("a host prefix is valid")
        };
        let resolvers = config
            .capture
            .dns
            .iter()
            .map(|r| udp_entry(host(r.ip().to_canonical()), r.port()))
            .collect();
        let udp_allow = config
            .capture
            .udp_allow
            .iter()
            .map(|a| udp_entry(a.net, a.port))
            .collect();
        let (exclude_v4, exclude_v6) = split(&config.capture.exclude);
        let (include_v4, include_v6) = split(&config.capture.include);
        Self {
            config: KernelConfig {
                // Without an IPv6 listener, IPv6 connects are sent to `[::]:port`, which the
                // kernel treats as the local host where nothing listens: they are refused,
                // never let through.
                listener_v6: config.listener.ipv6.map_or([0; 16], |a| a.octets()),
                listener_v4: config.listener.ipv4.octets(),
                flags,
                listener_port: config.listener.port,
                reserved: [0; 6],
            },
            exclude_v4,
            exclude_v6,
            include_v4,
            include_v6,
            exclude_ports: config.capture.exclude_ports.clone(),
            uids: config.governed.uids.clone(),
            udp_allow,
            resolvers,
            // The daemon's own control socket too: it refuses governed callers itself, with a
            // clear message, and records the attempt in the request's session.
            unix_allow: config
                .capture
                .unix_allow
                .iter()
                .filter_map(|a| crate::net::unix_key(a))
                .chain(crate::net::unix_key(
                    &config.control_socket().display().to_string(),
                ))
                .collect(),
        }
    }

    /// The configuration value with `FLAG_READY` cleared, written first while the other maps
    /// are being replaced, so a half-written rule set refuses rather than leaks.
    pub fn not_ready(&self) -> KernelConfig {
        KernelConfig {
            flags: self.config.flags & !FLAG_READY,
            ..self.config
        }
    }

    /// These rules with the fast path off (its program could not be attached).
    #[must_use]
    pub fn without_fast_path(&self) -> Self {
        let mut rules = self.clone();
        rules.config.flags &= !bulkhead_common::FLAG_FAST_PATH;
        rules
    }

    /// What the kernel programs decide for a TCP connect to `dst` by `uid`: `true` when it is
    /// redirected to the daemon. Mirrors `agent-ebpf`'s `captured()`.
    pub fn decide(&self, dst: SocketAddr, uid: u32) -> bool {
        let cfg = &self.config;
        let ip = dst.ip().to_canonical();
        let port = dst.port();
        let bytes = to_kernel_bytes(ip);
        if port == cfg.listener_port {
            let to_listener = match ip {
                IpAddr::V4(v4) => v4.octets() == cfg.listener_v4 || v4.is_unspecified(),
                IpAddr::V6(v6) => bytes == cfg.listener_v6 || v6.is_unspecified(),
            };
            if to_listener {
                return false;
            }
        }
        if !cfg.has(FLAG_CAPTURE_LOOPBACK) && (ip.is_loopback() || ip.is_unspecified()) {
            return false;
        }
        if self.exclude_ports.contains(&port) {
            return false;
        }
        if cfg.has(FLAG_UID_FILTER) && !self.uids.contains(&uid) {
            return false;
        }
        let in_list = |v4: &[([u8; 4], u32)], v6: &[([u8; 16], u32)]| match ip {
            IpAddr::V4(a) => v4.iter().any(|(net, len)| {
                Cidr::new(IpAddr::from(*net), u8::try_from(*len).unwrap_or(32))
                    .is_ok_and(|c| c.contains(IpAddr::V4(a)))
            }),
            IpAddr::V6(a) => v6.iter().any(|(net, len)| {
                Cidr::new(IpAddr::from(*net), u8::try_from(*len).unwrap_or(128))
                    .is_ok_and(|c| c.contains(IpAddr::V6(a)))
            }),
        };
        if in_list(&self.exclude_v4, &self.exclude_v6) {
            return false;
        }
        !cfg.has(FLAG_INCLUDE_FILTER) || in_list(&self.include_v4, &self.include_v6)
    }
}

impl CaptureRules {
    /// What the kernel programs decide for a datagram to `dst` by `uid`: `true` when it may
    /// leave (not governed, a resolver or an allowed destination). Mirrors `agent-ebpf`'s `udp()`.
    pub fn udp_allowed(&self, dst: SocketAddr, uid: u32) -> bool {
        if !self.decide(dst, uid) {
            return true;
        }
        let ip = dst.ip().to_canonical();
        let key = udp_entry(
            Cidr::new(ip, if ip.is_ipv4() { 32 } else { 128 }).expect("a host prefix is valid"),
            dst.port(),
        )
        .0;
        self.udp_entries().any(|((entry, bits), _)| {
            let (full, rest) = ((bits / 8) as usize, bits % 8);
            key[..full] == entry[..full]
                && (rest == 0 || (key[full] ^ entry[full]) >> (8 - rest) == 0)
        })
    }

    /// Every `UDP_ALLOW` entry with its value: resolvers last, so a resolver listed in
    /// `capture.udp_allow` too is still a resolver (its queries recorded).
    pub fn udp_entries(&self) -> impl Iterator<Item = (UdpEntry, u8)> + '_ {
        self.udp_allow
            .iter()
            .map(|e| (*e, bulkhead_common::UDP_DIRECT))
            .chain(
                self.resolvers
                    .iter()
                    .map(|e| (*e, bulkhead_common::UDP_RESOLVER)),
            )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Source;

    fn rules(toml: &str) -> CaptureRules {
        CaptureRules::from_config(&Config::from_toml(toml, Source::Embedded).unwrap())
    }

    fn captured(r: &CaptureRules, dst: &str) -> bool {
        r.decide(dst.parse().unwrap(), 1000)
    }

    #[test]
    fn default_captures_every_tcp_destination_and_loopback_but_the_listener() {
        let r = rules("");
        assert!(r.config.has(FLAG_READY));
        assert!(r.config.has(FLAG_CAPTURE_LOOPBACK));
        assert!(captured(&r, "10.0.0.5:5432"));
        assert!(captured(&r, "[fd00::5]:22"));
        assert!(captured(&r, "[::ffff:10.0.0.5]:5432"));
        assert!(
            captured(&r, "192.0.2.1:951"),
            "the listener port elsewhere is just a port"
        );
        assert!(captured(&r, "127.0.0.1:5432"));
        assert!(captured(&r, "127.1.2.3:80"));
        assert!(captured(&r, "[::1]:22"));
        assert!(captured(&r, "[::ffff:127.0.0.1]:5432"));
        assert!(!captured(&r, "127.0.0.1:951"));
        assert!(!captured(&r, "[::1]:951"));
        assert!(!captured(&r, "0.0.0.0:951"));
    }

    #[test]
    fn loopback_can_be_left_direct() {
        let r = rules("[capture]\nloopback = false\n");
        assert!(!r.config.has(FLAG_CAPTURE_LOOPBACK));
        assert!(!captured(&r, "127.0.0.1:5432"));
        assert!(!captured(&r, "127.1.2.3:80"));
        assert!(!captured(&r, "[::1]:5432"));
        assert!(!captured(&r, "[::ffff:127.0.0.1]:5432"));
        assert!(!captured(&r, "0.0.0.0:80"));
        assert!(captured(&r, "10.0.0.5:5432"));
    }

    #[test]
    fn the_listener_is_never_captured_but_only_its_own_address_is_exempt() {
        let r = rules("[capture]\nloopback = true\n");
        assert!(captured(&r, "127.0.0.1:5432"));
        assert!(captured(&r, "[::1]:5432"));
        assert!(!captured(&r, "127.0.0.1:951"));
        assert!(!captured(&r, "[::1]:951"));
        assert!(!captured(&r, "[::ffff:127.0.0.1]:951"));
        assert!(
            captured(&r, "127.0.0.2:951"),
            "only the listener's own address is exempt"
        );
    }

    #[test]
    fn excludes_includes_ports_and_uids() {
        let r = rules(
            "[capture]\nexclude = [\"10.9.0.0/16\", \"fd09::/16\"]\nexclude_ports = [53]\n\
             include = [\"10.0.0.0/8\", \"fd00::/8\"]\n[governed]\nuids = [1000]\n",
        );
        assert_eq!(r.exclude_v4, vec![([10, 9, 0, 0], 16)]);
        assert_eq!(r.include_v6.len(), 1);
        assert!(r.config.has(FLAG_UID_FILTER) && r.config.has(FLAG_INCLUDE_FILTER));
        assert!(captured(&r, "10.1.0.1:443"));
        assert!(!captured(&r, "10.9.1.1:443"), "excluded network");
        assert!(!captured(&r, "[fd09::1]:443"), "excluded network");
        assert!(!captured(&r, "10.1.0.1:53"), "excluded port");
        assert!(!captured(&r, "192.0.2.1:443"), "not included");
        assert!(captured(&r, "[fd00::1]:443"));
        assert!(
            !r.decide("10.1.0.1:443".parse().unwrap(), 0),
            "uid not governed"
        );
    }

    #[test]
    fn udp_goes_to_resolvers_and_allowed_destinations_only() {
        let r = rules(
            "[capture]\ndns = [\"10.0.0.2\", \"[fd00::53]:5353\"]\n\
             udp_allow = [\"192.0.2.0/24:514\", \"[fd00:1::/32]:4789\"]\n",
        );
        let ok = |dst: &str| r.udp_allowed(dst.parse().unwrap(), 1000);
        assert!(ok("10.0.0.2:53"));
        assert!(
            ok("[::ffff:10.0.0.2]:53"),
            "IPv4-mapped is the same destination"
        );
        assert!(!ok("10.0.0.2:54"), "a resolver on another port");
        assert!(!ok("10.0.0.3:53"), "another resolver");
        assert!(ok("[fd00::53]:5353"));
        assert!(!ok("[fd00::53]:53"));
        assert!(ok("192.0.2.77:514"));
        assert!(!ok("192.0.3.1:514"));
        assert!(!ok("192.0.2.77:515"));
        assert!(ok("[fd00:1:2::9]:4789"));
        assert!(!ok("[fd00:2::9]:4789"));
        assert!(!ok("198.51.100.7:443"), "QUIC anywhere else is refused");
        assert!(!ok("127.0.0.1:9"), "loopback is captured by default");
        assert!(
            !r.udp_allowed("198.51.100.7:443".parse().unwrap(), 0),
            "no uid filter: every uid is governed"
        );
    }

    #[test]
    fn resolvers_are_marked_for_the_forwarder_and_other_destinations_pass_as_they_are() {
        let r = rules(
            "[capture]\ndns = [\"10.0.0.2\"]\nudp_allow = [\"10.0.0.0/24:53\", \"192.0.2.0/24:514\"]\n",
        );
        let entries: Vec<_> = r.udp_entries().collect();
        let resolver = udp_entry(Cidr::new("10.0.0.2".parse().unwrap(), 32).unwrap(), 53);
        assert_eq!(
            entries.last(),
            Some(&(resolver, bulkhead_common::UDP_RESOLVER))
        );
        assert_eq!(
            entries
                .iter()
                .filter(|(_, v)| *v == bulkhead_common::UDP_DIRECT)
                .count(),
            2
        );
    }

    #[test]
    fn socket_kinds_set_their_flags() {
        let r = rules("[capture]\nsockets = [\"ping\", \"sctp\"]\n");
        assert!(r.config.has(FLAG_ALLOW_PING) && r.config.has(FLAG_ALLOW_SCTP));
        assert!(!r.config.has(FLAG_ALLOW_RAW) && !r.config.has(FLAG_ALLOW_PACKET));
        assert!(!rules("").config.has(FLAG_ALLOW_PING));
    }

    #[test]
    fn not_ready_only_clears_the_ready_flag() {
        let r = rules("[capture]\nloopback = true\n");
        let nr = r.not_ready();
        assert!(!nr.has(FLAG_READY));
        assert!(nr.has(FLAG_CAPTURE_LOOPBACK));
        assert_eq!(nr.listener_port, 951);
    }

    #[test]
    fn disabled_ipv6_listener_points_nowhere() {
        let r = rules("[listener]\nipv6 = \"\"\n");
        assert_eq!(r.config.listener_v6, [0; 16]);
    }
}
