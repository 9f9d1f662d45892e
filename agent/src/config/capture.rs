//! `[capture]`: what the kernel side captures and lets through besides TCP.

use std::net::{IpAddr, SocketAddr};

use serde::{Deserialize, Serialize};

use crate::net::Cidr;

#[derive(Debug, Clone, PartialEq)]
pub struct CaptureConfig {
    pub loopback: bool,
    pub include: Vec<Cidr>,
    pub exclude: Vec<Cidr>,
    pub exclude_ports: Vec<u16>,
    pub unmatched: Unmatched,
    /// Resolvers governed processes may send DNS datagrams to (`capture.dns`, with `"system"`
    /// read from `/etc/resolv.conf` when the configuration loads).
    pub dns: Vec<SocketAddr>,
    /// Other UDP destinations governed processes may send to (`capture.udp_allow`).
    pub udp_allow: Vec<UdpAllow>,
    /// Socket kinds governed processes may open beyond TCP, UDP, unix and netlink.
    pub sockets: Vec<SocketKind>,
    /// Unix socket addresses governed processes may connect or send to: absolute paths, and
    /// `@name` for abstract ones (`capture.unix_allow`).
    pub unix_allow: Vec<String>,
    /// The kernel fast path for the loopback hop between governed processes and the gateway
    /// (`capture.fast_path`, off by default): `sk_msg` moves each send straight to the peer
    /// socket. See `ebpf::fast_path`.
    pub fast_path: bool,
}

/// What governed processes may reach over unix sockets by default: the C library's name
/// service and the system resolver, and the system logger. Not a user's session bus or
/// service manager, a multiplexer's server, a container engine or a local database: each of
/// those can act for the process outside the gateway.
pub const DEFAULT_UNIX_ALLOW: [&str; 8] = [
    "/run/nscd/socket",
    "/var/run/nscd/socket",
    "/run/systemd/resolve/io.systemd.Resolve",
    "/run/systemd/userdb/io.systemd.DynamicUser",
    "/var/lib/sss/pipes/nss",
    "/dev/log",
    "/run/systemd/journal/socket",
    "/run/systemd/journal/stdout",
];

/// A network and a port that governed processes may send datagrams to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UdpAllow {
    pub net: Cidr,
    pub port: u16,
}

impl std::str::FromStr for UdpAllow {
    type Err = String;
    /// `ADDR:PORT` or `NET/LEN:PORT`; IPv6 in brackets: `[fd00::5]:53`, `[fd00::/64]:53`.
    fn from_str(s: &str) -> Result<Self, String> {
        let syntax = || format!("{s:?} is not ADDR:PORT or NET/LEN:PORT (IPv6 in brackets)");
        let (net, port) = s.rsplit_once(':').ok_or_else(syntax)?;
        let port: u16 = port.parse().map_err(|_| syntax())?;
        if port == 0 {
            return Err("port 0 is not a port".into());
        }
        let net = net.trim_start_matches('[').replacen(']', "", 1);
        let net: Cidr = if net.contains('/') {
            net.parse()?
        } else {
            let ip: IpAddr = net.parse().map_err(|_| syntax())?;
            Cidr::new(ip, if ip.is_ipv4() { 32 } else { 128 })?
        };
        Ok(Self { net, port })
    }
}

impl std::fmt::Display for UdpAllow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.net.addr() {
            IpAddr::V4(_) => write!(f, "{}:{}", self.net, self.port),
            IpAddr::V6(_) => write!(f, "[{}]:{}", self.net, self.port),
        }
    }
}

/// A kind of socket governed processes may not open unless the configuration says so.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SocketKind {
    /// ICMP echo ("ping") datagram sockets.
    Ping,
    /// Raw IP sockets.
    Raw,
    /// SCTP.
    Sctp,
    /// Multipath TCP (not redirected: it would bypass the gateway).
    Mptcp,
    /// `AF_PACKET`.
    Packet,
}

/// The nameservers of a `resolv.conf` text, port 53 (scoped IPv6 addresses skipped).
pub fn resolv_conf_nameservers(text: &str) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            (words.next() == Some("nameserver"))
                .then(|| words.next())
                .flatten()
                .and_then(|a| a.parse::<IpAddr>().ok())
                .map(|ip| SocketAddr::new(ip, 53))
        })
        .collect()
}

/// What happens to a captured connection whose destination matches no target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Unmatched {
    /// Relay as opaque TCP and record the session.
    Relay,
    /// Close it and record the refusal.
    Refuse,
}
