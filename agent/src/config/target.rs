//! `[[target]]`: the destinations the gateway knows by name, and how a destination resolves.

use std::{borrow::Cow, fmt, net::SocketAddr, str::FromStr};

use crate::{
    credentials::CredentialRef,
    net::{Cidr, OrigDstAddr},
    protocol::Protocol,
    proxy::{
        http::settings::HttpTarget, postgres::settings::PostgresTarget, ssh::settings::SshTarget,
    },
};

/// Where a connection goes, as the policy knows it ([`Config::resolve`]).
#[derive(Debug, Clone)]
pub struct ResolvedTarget<'c> {
    /// The target's name, or the address for a destination no target names.
    pub name: Cow<'c, str>,
    pub protocol: Protocol,
    /// The target's configuration; `None` for a destination no target names.
    pub target: Option<&'c Target>,
}

impl ResolvedTarget<'_> {
    pub fn policy_ref(&self) -> crate::policy::TargetRef<'_> {
        crate::policy::TargetRef {
            name: &self.name,
            protocol: self.protocol,
        }
    }
}

/// The name a destination no target names is judged by: its address as `IP:PORT` or
/// `[IPv6]:PORT`, an IPv4-mapped address shown as IPv4 (`10.0.0.5:443`, `[fd00::5]:443`).
pub fn unmatched_name(dst: OrigDstAddr) -> String {
    SocketAddr::new(dst.0.ip().to_canonical(), dst.0.port()).to_string()
}

/// A destination the gateway knows by name.
#[derive(Debug, Clone)]
pub struct Target {
    pub name: String,
    pub addresses: Vec<TargetAddress>,
    /// Credentials the gateway holds for the target (the governed tool never sees them).
    pub credentials: Option<CredentialRef>,
    /// The protocol, with that protocol's own settings.
    pub kind: TargetKind,
}

/// A target's protocol and the settings only that protocol has.
#[derive(Debug, Clone)]
pub enum TargetKind {
    /// Opaque TCP: the connection is decided, recorded and relayed.
    Tcp,
    Postgres(PostgresTarget),
    /// HTTP(S): each request decided by method, host and path.
    Http(HttpTarget),
    /// A Kubernetes API server: the HTTP gateway, each request judged as a Kubernetes one.
    Kubernetes(HttpTarget),
    Ssh(SshTarget),
}

impl Target {
    pub fn protocol(&self) -> Protocol {
        match self.kind {
            TargetKind::Tcp => Protocol::Tcp,
            TargetKind::Postgres(_) => Protocol::Postgres,
            TargetKind::Http(_) => Protocol::Http,
            TargetKind::Kubernetes(_) => Protocol::Kubernetes,
            TargetKind::Ssh(_) => Protocol::Ssh,
        }
    }
}

/// `10.0.0.5:5432`, `[fd00::5]:5432` (one socket), or `10.0.0.0/24` (any port in a network).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetAddress {
    Socket(SocketAddr),
    Network(Cidr),
}

impl TargetAddress {
    pub fn matches(&self, dst: OrigDstAddr) -> bool {
        match self {
            TargetAddress::Socket(s) => {
                s.port() == dst.0.port() && s.ip().to_canonical() == dst.0.ip().to_canonical()
            }
            TargetAddress::Network(c) => c.contains(dst.0.ip()),
        }
    }
}

impl fmt::Display for TargetAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TargetAddress::Socket(s) => s.fmt(f),
            TargetAddress::Network(c) => c.fmt(f),
        }
    }
}

impl FromStr for TargetAddress {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s.contains('/') {
            return s.parse().map(TargetAddress::Network);
        }
        s.parse::<SocketAddr>().map(TargetAddress::Socket).map_err(|_| {
            format!("{s:?} is neither IP:PORT ([IPv6]:PORT for IPv6) nor a network like 10.0.0.0/24")
        })
    }
}
