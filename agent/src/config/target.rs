//! `[[target]]`: the destinations the gateway knows by name, and how a destination resolves.

use std::{borrow::Cow, fmt, net::SocketAddr, str::FromStr};

use super::{raw::RawTarget, ConfigError};
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

/// The `[[target]]` tables, checked: names (unique, plain), addresses, credential references,
/// and each protocol's own table (only on its protocol's targets).
pub(super) fn targets_from_raw(
    raw: Vec<RawTarget>,
    invalid: &dyn Fn(String, String) -> ConfigError,
) -> Result<Vec<Target>, ConfigError> {
    let mut targets: Vec<Target> = Vec::with_capacity(raw.len());
    for (i, mut t) in raw.into_iter().enumerate() {
        if t.name.is_empty()
            || !t
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return Err(invalid(
                format!("target[{i}].name"),
                format!(
                    "{:?} must be non-empty and use only letters, digits, '-', '_' and '.'",
                    t.name
                ),
            ));
        }
        if targets.iter().any(|o| o.name == t.name) {
            return Err(invalid(
                format!("target[{i}].name"),
                format!("{:?} is used by another target", t.name),
            ));
        }
        if t.addresses.is_empty() {
            return Err(invalid(
                format!("target[{i}].addresses"),
                "needs at least one address".into(),
            ));
        }
        let addresses = t
            .addresses
            .iter()
            .enumerate()
            .map(|(j, a)| {
                a.parse::<TargetAddress>()
                    .map_err(|e| invalid(format!("target[{i}].addresses[{j}]"), e))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if let Some((field, problem)) = t.credentials.as_ref().and_then(CredentialRef::problem) {
            return Err(invalid(
                format!("target[{i}].credentials.{field}"),
                problem.into(),
            ));
        }
        if t.http.is_some() && t.protocol != Protocol::Http {
            return Err(invalid(
                format!("target[{i}].http"),
                "only for targets with protocol = \"http\"".into(),
            ));
        }
        if t.kubernetes.is_some() && t.protocol != Protocol::Kubernetes {
            return Err(invalid(
                format!("target[{i}].kubernetes"),
                "only for targets with protocol = \"kubernetes\"".into(),
            ));
        }
        if t.ssh.is_some() && t.protocol != Protocol::Ssh {
            return Err(invalid(
                format!("target[{i}].ssh"),
                "only for targets with protocol = \"ssh\"".into(),
            ));
        }
        let kind = kind_from_raw(i, &mut t, &addresses, invalid)?;
        targets.push(Target {
            name: t.name,
            addresses,
            credentials: t.credentials,
            kind,
        });
    }
    Ok(targets)
}

/// Target `i`'s protocol and that protocol's own table, checked (the table is taken out of
/// `t`).
fn kind_from_raw(
    i: usize,
    t: &mut RawTarget,
    addresses: &[TargetAddress],
    invalid: &dyn Fn(String, String) -> ConfigError,
) -> Result<TargetKind, ConfigError> {
    let kind = match (t.protocol, t.postgres.take()) {
        (Protocol::Kubernetes, None) => {
            let kube = t.kubernetes.take().unwrap_or_default();
            if let Some((key, problem)) = kube.problem() {
                return Err(invalid(format!("target[{i}].kubernetes.{key}"), problem));
            }
            TargetKind::Kubernetes(kube)
        }
        (Protocol::Http, None) => {
            let http = t.http.take().unwrap_or_default();
            if let Some((key, problem)) = http.problem() {
                return Err(invalid(format!("target[{i}].http.{key}"), problem));
            }
            TargetKind::Http(http)
        }
        (Protocol::Ssh, None) => {
            let Some(ssh) = t.ssh.take() else {
                return Err(invalid(
                    format!("target[{i}].ssh"),
                    "an ssh target needs [target.ssh] with known_hosts and a held credential"
                        .into(),
                ));
            };
            if let Some((key, problem)) = ssh.problem(t.credentials.is_some()) {
                return Err(invalid(format!("target[{i}].ssh.{key}"), problem));
            }
            TargetKind::Ssh(ssh)
        }
        (Protocol::Postgres, pg) => {
            let pg = pg.unwrap_or_default();
            if let Some((key, problem)) = pg.problem(t.credentials.is_some()) {
                return Err(invalid(format!("target[{i}].postgres.{key}"), problem));
            }
            // The gateway logs in with the held credentials only at addresses named
            // as sockets (unless opted in): with only networks, nowhere.
            let named_socket = addresses
                .iter()
                .any(|a| matches!(a, TargetAddress::Socket(_)));
            if !named_socket && !pg.login_to_network {
                return Err(invalid(
                    format!("target[{i}].addresses"),
                    "a postgres target is logged in to only at the IP:PORT addresses it \
                     names, and this one names only networks: name its servers as \
                     IP:PORT, or set postgres.login_to_network = true to log in with its \
                     credentials at whatever address in the network a client dials"
                        .into(),
                ));
            }
            TargetKind::Postgres(pg)
        }
        (_, Some(_)) => {
            return Err(invalid(
                format!("target[{i}].postgres"),
                "only for targets with protocol = \"postgres\"".into(),
            ))
        }
        (Protocol::Tcp, None) => TargetKind::Tcp,
        (other, None) => {
            return Err(invalid(
                format!("target[{i}].protocol"),
                format!(
                    "protocol {other} is not a target's protocol; use \"tcp\", \"postgres\", \"ssh\", \"http\" or \"kubernetes\""
                ),
            ))
        }
    };
    Ok(kind)
}
