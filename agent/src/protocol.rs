//! The protocols a target can speak. A leaf: the configuration, the policy, the record and the
//! approvals all name protocols, and none of them owns the name.

use std::{fmt, str::FromStr};

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Postgres,
    Ssh,
    Http,
    Kubernetes,
    /// Datagrams the kernel refused (recorded; UDP is never relayed).
    Udp,
    /// A socket the kernel refused to create (raw, packet, ping, SCTP, MPTCP, other families).
    Socket,
    /// A unix socket address the kernel refused a connect or send to.
    Unix,
    /// Queries to a configured resolver, through the daemon's DNS forwarder (recorded).
    Dns,
}

impl Protocol {
    pub const ALL: [Protocol; 9] = [
        Protocol::Tcp,
        Protocol::Postgres,
        Protocol::Ssh,
        Protocol::Http,
        Protocol::Kubernetes,
        Protocol::Udp,
        Protocol::Socket,
        Protocol::Unix,
        Protocol::Dns,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Postgres => "postgres",
            Protocol::Ssh => "ssh",
            Protocol::Http => "http",
            Protocol::Kubernetes => "kubernetes",
            Protocol::Udp => "udp",
            Protocol::Socket => "socket",
            Protocol::Unix => "unix",
            Protocol::Dns => "dns",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Protocol {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Protocol::ALL
            .into_iter()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| {
                "use tcp, postgres, ssh, http, kubernetes, udp, socket, unix or dns".into()
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_through_text_and_serde() {
        for p in Protocol::ALL {
            assert_eq!(p.to_string().parse::<Protocol>(), Ok(p));
            let json = serde_json::to_string(&p).unwrap();
            assert_eq!(json, format!("\"{p}\""));
        }
        assert!("gopher".parse::<Protocol>().is_err());
    }
}
