//! Addresses by role, so a client address is never passed where a destination belongs, and the
//! conversions between the kernel's 16-byte form and `std::net`.

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    str::FromStr,
};

use serde::{Deserialize, Serialize};

/// The governed process's end of a redirected connection, as the daemon sees it on `accept()`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ClientAddr(pub SocketAddr);

/// Where the governed process wanted to go before the kernel redirected it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct OrigDstAddr(pub SocketAddr);

impl fmt::Display for ClientAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl fmt::Display for OrigDstAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// The kernel's 16-byte form (IPv4 as IPv4-mapped) of an address.
pub fn to_kernel_bytes(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// An address from the kernel's 16-byte form; IPv4-mapped addresses come back as IPv4.
pub fn from_kernel_bytes(bytes: [u8; 16]) -> IpAddr {
    Ipv6Addr::from(bytes).to_canonical()
}

/// An IP network: `10.0.0.0/8`, `fd00::/8`, or a single address (`/32`, `/128` implied).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    pub fn new(addr: IpAddr, prefix: u8) -> Result<Self, String> {
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if prefix > max {
            return Err(format!("prefix /{prefix} is longer than {max} bits"));
        }
        Ok(Self {
            addr: mask(addr, prefix),
            prefix,
        })
    }

    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// IPv4-mapped IPv6 addresses are matched as IPv4, as the eBPF programs do.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        match (self.addr, ip) {
            (IpAddr::V4(_), IpAddr::V4(_)) | (IpAddr::V6(_), IpAddr::V6(_)) => {
                mask(ip, self.prefix) == self.addr
            }
            _ => false,
        }
    }
}

fn mask(addr: IpAddr, prefix: u8) -> IpAddr {
    match addr {
        IpAddr::V4(a) => {
            let bits = u32::from(a);
            let m = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V4(Ipv4Addr::from(bits & m))
        }
        IpAddr::V6(a) => {
            let bits = u128::from(a);
            let m = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V6(Ipv6Addr::from(bits & m))
        }
    }
}

impl FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (ip, prefix) = match s.split_once('/') {
            Some((ip, p)) => (ip, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = ip
            .parse()
            .map_err(|_| format!("{s:?}: {ip:?} is not an IP address"))?;
        let addr = addr.to_canonical();
        let prefix = match prefix {
            None => {
                if addr.is_ipv4() {
                    32
                } else {
                    128
                }
            }
            Some(p) => p
                .parse::<u8>()
                .map_err(|_| format!("{s:?}: {p:?} is not a prefix length"))?,
        };
        Cidr::new(addr, prefix).map_err(|e| format!("{s:?}: {e}"))
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// The `UNIX_ALLOW` key for a configured address: an absolute path, or `@name` for an
/// abstract one.
pub fn unix_key(address: &str) -> Option<[u8; bulkhead_common::UNIX_KEY_BYTES]> {
    let bytes: Vec<u8> = match address.strip_prefix('@') {
        Some(name) => std::iter::once(0).chain(name.bytes()).collect(),
        None if address.starts_with('/') => address.bytes().collect(),
        None => return None,
    };
    if bytes.len() > 108 {
        return None;
    }
    let mut key = [0u8; bulkhead_common::UNIX_KEY_BYTES];
    key[..bytes.len()].copy_from_slice(&bytes);
    Some(key)
}

/// A refused unix address as an admin reads it (`/run/user/1000/bus`, `@name`).
pub fn unix_address(path: &[u8]) -> String {
    if let Some((0, rest)) = path.split_first() {
        let end = rest.iter().rposition(|b| *b != 0).map_or(0, |i| i + 1);
        format!("@{}", String::from_utf8_lossy(&rest[..end]))
    } else {
        let end = path.iter().position(|b| *b == 0).unwrap_or(path.len());
        String::from_utf8_lossy(&path[..end]).into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_their_display_round_trip() {
        let k = unix_key("/run/nscd/socket").unwrap();
        assert_eq!(&k[..16], b"/run/nscd/socket");
        assert!(k[16..].iter().all(|b| *b == 0));
        assert_eq!(unix_address(&k), "/run/nscd/socket");
        let a = unix_key("@/tmp/.X11-unix/X0").unwrap();
        assert_eq!(a[0], 0);
        assert_eq!(unix_address(&a), "@/tmp/.X11-unix/X0");
        assert!(unix_key("relative/sock").is_none());
        assert!(unix_key(&format!("/{}", "x".repeat(200))).is_none());
    }

    #[test]
    fn cidr_parsing_masks_host_bits() {
        let c: Cidr = "10.1.2.3/8".parse().unwrap();
        assert_eq!(c.to_string(), "10.0.0.0/8");
        let c: Cidr = "10.1.2.3".parse().unwrap();
        assert_eq!(c.to_string(), "10.1.2.3/32");
        let c: Cidr = "fd00::1/8".parse().unwrap();
        assert_eq!(c.to_string(), "fd00::/8");
        let c: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(c.contains("8.8.8.8".parse().unwrap()));
        assert!(!c.contains("::1".parse().unwrap()));
    }

    #[test]
    fn cidr_rejects_garbage() {
        for bad in [
            "",
            "10.0.0.0/33",
            "fd00::/129",
            "10.0.0/8",
            "x/8",
            "10.0.0.0/-1",
            "10.0.0.0/",
        ] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad:?} should not parse");
        }
    }

    #[test]
    fn cidr_matches_mapped_addresses_as_ipv4() {
        let c: Cidr = "10.0.0.0/24".parse().unwrap();
        assert!(c.contains("10.0.0.9".parse().unwrap()));
        assert!(c.contains("::ffff:10.0.0.9".parse().unwrap()));
        assert!(!c.contains("10.0.1.9".parse().unwrap()));
    }

    #[test]
    fn kernel_bytes_round_trip() {
        for s in ["10.1.2.3", "127.0.0.1", "fd00::5", "::1"] {
            let ip: IpAddr = s.parse().unwrap();
            assert_eq!(from_kernel_bytes(to_kernel_bytes(ip)), ip);
        }
        assert_eq!(
            to_kernel_bytes("10.1.2.3".parse().unwrap()),
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 1, 2, 3]
        );
    }
}
