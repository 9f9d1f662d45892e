//! The daemon's configuration: one TOML file, every key optional, unknown keys rejected.
//!
//! Reading is split in two, as in ztunnel: [`Config::load`] reads the file once, and the pure
//! [`Config::from_toml`] parses and validates text, so tests exercise every rule without I/O.
//! `bulkhead.example.toml` at the repository root documents each key.

use std::{
    borrow::Cow,
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    str::FromStr,
};

use serde::{Deserialize, Serialize};

use crate::protocol::Protocol;
use crate::{
    credentials::CredentialRef,
    net::{Cidr, OrigDstAddr},
    proxy::{
        http::settings::HttpTarget, postgres::settings::PostgresTarget, ssh::settings::SshTarget,
    },
};

pub const DEFAULT_CONFIG_PATH: &str = "/etc/bulkhead/bulkhead.toml";
/// Below 1024 (`net.ipv4.ip_unprivileged_port_start`): while the daemon is down no other local
/// user can bind it and receive what the pinned programs still send there.
pub const DEFAULT_LISTENER_PORT: u16 = 951;
pub const DEFAULT_GOVERNED_CGROUP: &str = "bulkhead.governed";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/bulkhead";
pub const DEFAULT_RUN_DIR: &str = "/run/bulkhead";
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/bulkhead";
/// Besides root, members of this group may use the CLI (the control socket).
pub const DEFAULT_ADMIN_GROUP: &str = "bulkhead";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config file {path}: key `{key}`: {problem}")]
    Invalid {
        path: PathBuf,
        key: String,
        problem: String,
    },
}

/// Where the configuration came from, for error messages and `bulkhead status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum Source {
    Embedded,
    File(PathBuf),
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Embedded => f.write_str("embedded default"),
            Source::File(p) => write!(f, "{}", p.display()),
        }
    }
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub source: Source,
    pub daemon: DaemonConfig,
    pub listener: ListenerConfig,
    pub governed: GovernedConfig,
    pub capture: CaptureConfig,
    pub store: StoreConfig,
    pub approvals: ApprovalsConfig,
    pub run: RunConfig,
    pub targets: Vec<Target>,
}

impl Config {
    /// This configuration with the targets of `newer` (the file read again): what a reload
    /// (`SIGHUP`) applies while the daemon runs. Every other section stays as the daemon
    /// started; [`Config::restart_needed`] names those that differ.
    #[must_use]
    pub fn with_targets_of(&self, newer: &Config) -> Config {
        Config {
            targets: newer.targets.clone(),
            ..self.clone()
        }
    }

    /// The sections of `newer` that differ from this running configuration and apply only
    /// after a restart: the listener, the cgroup, the capture rules, the store, approvals.
    /// (`[run]` is read by `bulkhead run` itself, each time.)
    pub fn restart_needed(&self, newer: &Config) -> Vec<&'static str> {
        let mut out = Vec::new();
        if self.daemon != newer.daemon {
            out.push("daemon");
        }
        if self.listener != newer.listener {
            out.push("listener");
        }
        if self.governed != newer.governed {
            out.push("governed");
        }
        if self.capture != newer.capture {
            out.push("capture");
        }
        if self.store != newer.store {
            out.push("store");
        }
        if self.approvals != newer.approvals {
            out.push("approvals");
        }
        out
    }
}

/// How `bulkhead run` starts a governed command (`[run]`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunConfig {
    /// Supplementary groups (names or gids) the command keeps from its user's groups; every
    /// other one is dropped, and the admin group always is.
    pub keep_groups: Vec<String>,
}

/// How requests held for approval wait (`[approvals]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApprovalsConfig {
    /// How long a request waits for an admin when its rule does not say; then it is denied.
    pub default_timeout: std::time::Duration,
    /// Pending approvals one identity (uid + executable) may have at once: a looping tool
    /// cannot flood the admins.
    pub max_pending_per_identity: usize,
    /// Pending approvals on the host at once: bounds the memory and the admins' queue.
    pub max_pending: usize,
}

/// The longest an approval may wait, or a grant window last: held requests and grants are
/// bounded in time like everything else.
pub const MAX_APPROVAL_WAIT: std::time::Duration = std::time::Duration::from_hours(24);
/// The most pending approvals `approvals.max_pending` may allow.
pub const MAX_PENDING_APPROVALS: usize = 10_000;

/// Retention of the session record.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StoreConfig {
    pub retention: crate::record::Retention,
    /// How often the daemon prunes.
    pub prune_interval: std::time::Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct DaemonConfig {
    pub state_dir: PathBuf,
    pub run_dir: PathBuf,
    pub bpf_pin_dir: PathBuf,
    /// Detach on exit and never pin: when the daemon is gone, governed connections go direct.
    pub fail_open: bool,
    /// `tracing` filter directives, overridden by `RUST_LOG`.
    pub log: String,
    /// Group whose members may use the control socket besides root.
    pub admin_group: String,
    /// Policy files (`*.toml`), reloaded on change and on SIGHUP.
    pub policy_dir: PathBuf,
    /// Runtime worker threads for the relays.
    pub workers: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ListenerConfig {
    pub ipv4: Ipv4Addr,
    /// `None` disables the IPv6 listener; IPv6 connects are then refused rather than redirected.
    pub ipv6: Option<Ipv6Addr>,
    pub port: u16,
}

#[derive(Debug, Clone, PartialEq)]
pub struct GovernedConfig {
    /// Relative paths are under the cgroup2 mount; `/` is the hierarchy's root (only with
    /// governed users).
    pub cgroup: PathBuf,
    /// Empty: every process in the cgroup. Otherwise only these uids (`governed.uids` and the
    /// accounts of `governed.users`).
    pub uids: Vec<u32>,
    /// `governed.users` as configured, for messages.
    pub users: Vec<String>,
}

impl GovernedConfig {
    /// The governed cgroup's directory under `mount`.
    pub fn resolve(&self, mount: &Path) -> Result<PathBuf, crate::cgroup::CgroupError> {
        crate::cgroup::resolve(mount, &self.cgroup, !self.uids.is_empty())
    }
}

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

/// The dotted key (`listener.port`) whose value a TOML error points at: the key of the value's
/// line (or, inside a multi-line array, of the nearest line above with one) under the last
/// table header before it.
fn key_at(text: &str, e: &toml::de::Error) -> Option<String> {
    let start = e.span()?.start;
    let before = text.get(..start)?;
    let mut key = None;
    let mut table = None;
    for line in before.rsplit('\n').map(str::trim) {
        if line.starts_with('[') {
            table = Some(line.trim_matches(|c| c == '[' || c == ']').trim());
            break;
        }
        if key.is_none() && !line.starts_with('#') {
            key = line
                .split_once('=')
                .map(|(k, _)| k.trim())
                .filter(|k| !k.is_empty());
        }
    }
    let key = key?;
    Some(match table {
        Some(t) if !t.is_empty() => format!("{t}.{key}"),
        _ => key.to_string(),
    })
}

/// A deserializer's complaint in an admin's words: what the key takes first, then what it got
/// (`invalid type: string "abc", expected u16` → `expected a whole number from 0 to 65535, got
/// string "abc"`).
fn readable_expectation(message: &str) -> String {
    let ranges = [
        ("expected u16", "expected a whole number from 0 to 65535"),
        ("expected u8", "expected a whole number from 0 to 255"),
        (
            "expected u32",
            "expected a whole number from 0 to 4294967295",
        ),
        ("expected u64", "expected a whole number of 0 or more"),
        ("expected usize", "expected a whole number of 0 or more"),
        ("expected a boolean", "expected true or false"),
        ("expected a string", "expected a quoted string"),
        ("expected a sequence", "expected a list in brackets ([...])"),
    ];
    let mut out = message.to_string();
    for (from, to) in ranges {
        out = out.replace(from, to);
    }
    for lead in ["invalid type: ", "invalid value: "] {
        if let Some((got, expected)) = out
            .strip_prefix(lead)
            .and_then(|rest| rest.split_once(", expected "))
        {
            return format!("expected {expected}, got {got}");
        }
    }
    out
}

/// The SHA-256 of a configuration file's bytes (`None` when it cannot be read), to tell a
/// running daemon that its file changed.
pub fn file_digest(path: &Path) -> Option<[u8; 32]> {
    use sha2::Digest as _;
    std::fs::read(path)
        .ok()
        .map(|b| sha2::Sha256::digest(&b).into())
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

impl Config {
    /// The configuration used when no file is given and the default path does not exist.
    pub fn embedded_default() -> Self {
        Self::from_raw(RawConfig::default(), Source::Embedded)
            .expect("the embedded default configuration is valid")
    }

    /// Reads `path`; with `None`, the default path if it exists, else the embedded default.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let path = match path {
            Some(p) => p.to_path_buf(),
            None if Path::new(DEFAULT_CONFIG_PATH).exists() => PathBuf::from(DEFAULT_CONFIG_PATH),
            None => return Ok(Self::embedded_default()),
        };
        let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read {
            path: path.clone(),
            source,
        })?;
        Self::from_toml(&text, Source::File(path))
    }

    /// Parses and validates configuration text.
    pub fn from_toml(text: &str, source: Source) -> Result<Self, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| match key_at(text, &e) {
            // A value of the wrong kind: name the key and what it takes.
            Some(key) if e.message().contains("expected") => ConfigError::Invalid {
                path: source_path(&source),
                key,
                problem: readable_expectation(e.message().trim()),
            },
            _ => ConfigError::Parse {
                path: source_path(&source),
                message: readable_expectation(&e.to_string()),
            },
        })?;
        Self::from_raw(raw, source)
    }

    fn from_raw(raw: RawConfig, source: Source) -> Result<Self, ConfigError> {
        let invalid = |key: String, problem: String| ConfigError::Invalid {
            path: source_path(&source),
            key,
            problem,
        };

        let RawConfig {
            daemon,
            listener,
            governed,
            capture,
            store,
            approvals,
            run,
            target,
        } = raw;
        let approvals = approvals_from_raw(&approvals, &invalid)?;

        let duration = |key: &str, text: &str| -> Result<std::time::Duration, ConfigError> {
            humantime::parse_duration(text).map_err(|e| {
                invalid(
                    key.into(),
                    format!("{text:?} is not a duration like \"30days\" or \"12h\": {e}"),
                )
            })
        };
        let max_age = match store.max_age.as_str() {
            "" => None,
            text => Some(duration("store.max_age", text)?),
        };
        let prune_interval = duration("store.prune_interval", &store.prune_interval)?;
        let max_bytes = match store.max_size.as_str() {
            "" => None,
            text => Some(parse_size(text).map_err(|e| invalid("store.max_size".into(), e))?),
        };
        if prune_interval.is_zero() {
            return Err(invalid(
                "store.prune_interval".into(),
                "must be longer than zero".into(),
            ));
        }
        if daemon.admin_group.is_empty() {
            return Err(invalid(
                "daemon.admin_group".into(),
                "must name a group".into(),
            ));
        }
        if let Some(i) = run.keep_groups.iter().position(|g| g.trim().is_empty()) {
            return Err(invalid(
                format!("run.keep_groups[{i}]"),
                "must name a group (or give its gid)".into(),
            ));
        }
        if !(1..=256).contains(&daemon.workers) {
            return Err(invalid(
                "daemon.workers".into(),
                format!("{} is not between 1 and 256", daemon.workers),
            ));
        }

        let ipv4: Ipv4Addr = listener.ipv4.parse().map_err(|_| {
            invalid(
                "listener.ipv4".into(),
                format!("{:?} is not an IPv4 address", listener.ipv4),
            )
        })?;
        if !ipv4.is_loopback() {
            return Err(invalid(
                "listener.ipv4".into(),
                format!("{ipv4} is not a loopback address; the listener must not be reachable from the network"),
            ));
        }
        let ipv6 = match listener.ipv6.as_str() {
            "" => None,
            s => {
                let a: Ipv6Addr = s.parse().map_err(|_| {
                    invalid(
                        "listener.ipv6".into(),
                        format!("{s:?} is not an IPv6 address (use \"\" to disable)"),
                    )
                })?;
                if !a.is_loopback() {
                    return Err(invalid(
                        "listener.ipv6".into(),
                        format!(
                            "{a} is not ::1; the listener must not be reachable from the network"
                        ),
                    ));
                }
                Some(a)
            }
        };
        if listener.port == 0 {
            return Err(invalid(
                "listener.port".into(),
                "must be a fixed port: the kernel redirects to it even while the daemon restarts"
                    .into(),
            ));
        }

        let mut uids = governed.uids;
        for (i, name) in governed.users.iter().enumerate() {
            let account = crate::account::Account::lookup(name).ok_or_else(|| {
                invalid(
                    format!("governed.users[{i}]"),
                    format!("no user {name:?} on this host"),
                )
            })?;
            if !uids.contains(&account.uid) {
                uids.push(account.uid);
            }
        }
        let cgroup = governed.cgroup.unwrap_or_else(|| {
            if governed.users.is_empty() {
                DEFAULT_GOVERNED_CGROUP.into()
            } else {
                "/".into()
            }
        });
        if cgroup.as_os_str().is_empty() {
            return Err(invalid(
                "governed.cgroup".into(),
                "must not be empty".into(),
            ));
        }
        if cgroup
            .components()
            .any(|c| matches!(c, std::path::Component::ParentDir))
        {
            return Err(invalid(
                "governed.cgroup".into(),
                "must not contain `..`".into(),
            ));
        }
        if uids.is_empty()
            && cgroup
                .components()
                .all(|c| matches!(c, std::path::Component::RootDir))
        {
            return Err(invalid(
                "governed.cgroup".into(),
                "must not be the root cgroup: that would govern every process on the host; \
                 name a cgroup, or govern users everywhere with governed.users (or uids)"
                    .into(),
            ));
        }

        let parse_cidrs = |key: &str, list: &[String]| -> Result<Vec<Cidr>, ConfigError> {
            list.iter()
                .enumerate()
                .map(|(i, s)| {
                    s.parse::<Cidr>()
                        .map_err(|e| invalid(format!("{key}[{i}]"), e))
                })
                .collect()
        };
        let include = parse_cidrs("capture.include", &capture.include)?;
        let exclude = parse_cidrs("capture.exclude", &capture.exclude)?;
        if let Some(i) = capture.exclude_ports.iter().position(|p| *p == 0) {
            return Err(invalid(
                format!("capture.exclude_ports[{i}]"),
                "port 0 is not a port".into(),
            ));
        }
        let mut dns = Vec::new();
        for (i, entry) in capture.dns.iter().enumerate() {
            if entry == "system" {
                // Read once, when the configuration loads; a missing file names no resolver.
                let text = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
                dns.extend(resolv_conf_nameservers(&text));
                continue;
            }
            let addr = entry
                .parse::<SocketAddr>()
                .or_else(|_| entry.parse::<IpAddr>().map(|ip| SocketAddr::new(ip, 53)))
                .map_err(|_| {
                    invalid(
                        format!("capture.dns[{i}]"),
                        format!("{entry:?} is not \"system\", an IP address or IP:PORT"),
                    )
                })?;
            dns.push(addr);
        }
        for (i, a) in capture.unix_allow.iter().enumerate() {
            if crate::net::unix_key(a).is_none() {
                return Err(invalid(
                    format!("capture.unix_allow[{i}]"),
                    format!(
                        "{a:?} is not an absolute socket path or @name (abstract) of at most 108 bytes"
                    ),
                ));
            }
        }
        let udp_allow = capture
            .udp_allow
            .iter()
            .enumerate()
            .map(|(i, s)| {
                s.parse::<UdpAllow>()
                    .map_err(|e| invalid(format!("capture.udp_allow[{i}]"), e))
            })
            .collect::<Result<Vec<_>, _>>()?;

        let mut targets: Vec<Target> = Vec::with_capacity(target.len());
        for (i, t) in target.into_iter().enumerate() {
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
            if let Some((field, problem)) = t.credentials.as_ref().and_then(CredentialRef::problem)
            {
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
            let kind = match (t.protocol, t.postgres) {
                (Protocol::Kubernetes, None) => {
                    let kube = t.kubernetes.unwrap_or_default();
                    if let Some((key, problem)) = kube.problem() {
                        return Err(invalid(format!("target[{i}].kubernetes.{key}"), problem));
                    }
                    TargetKind::Kubernetes(kube)
                }
                (Protocol::Http, None) => {
                    let http = t.http.unwrap_or_default();
                    if let Some((key, problem)) = http.problem() {
                        return Err(invalid(format!("target[{i}].http.{key}"), problem));
                    }
                    TargetKind::Http(http)
                }
                (Protocol::Ssh, None) => {
                    let Some(ssh) = t.ssh else {
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
            targets.push(Target {
                name: t.name,
                addresses,
                credentials: t.credentials,
                kind,
            });
        }

        Ok(Config {
            source,
            daemon: DaemonConfig {
                state_dir: daemon.state_dir,
                run_dir: daemon.run_dir,
                bpf_pin_dir: daemon.bpf_pin_dir,
                fail_open: daemon.fail_open,
                log: daemon.log,
                admin_group: daemon.admin_group,
                policy_dir: daemon.policy_dir,
                workers: daemon.workers,
            },
            listener: ListenerConfig {
                ipv4,
                ipv6,
                port: listener.port,
            },
            governed: GovernedConfig {
                cgroup,
                uids,
                users: governed.users,
            },
            capture: CaptureConfig {
                loopback: capture.loopback,
                include,
                exclude,
                exclude_ports: capture.exclude_ports,
                unmatched: capture.unmatched,
                dns,
                udp_allow,
                sockets: capture.sockets,
                unix_allow: capture.unix_allow,
                fast_path: capture.fast_path,
            },
            store: StoreConfig {
                retention: crate::record::Retention {
                    max_age_us: max_age.map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX)),
                    max_bytes,
                },
                prune_interval,
            },
            approvals,
            run: RunConfig {
                keep_groups: run.keep_groups,
            },
            targets,
        })
    }

    /// Where a connection to `dst` goes, as the policy knows it: its target, or for a
    /// destination no target names, a `tcp` target named by the address.
    pub fn resolve(&self, dst: OrigDstAddr) -> ResolvedTarget<'_> {
        match self.target_for(dst) {
            Some(t) => ResolvedTarget {
                name: Cow::Borrowed(&t.name),
                protocol: t.protocol(),
                target: Some(t),
            },
            None => ResolvedTarget {
                name: Cow::Owned(unmatched_name(dst)),
                protocol: Protocol::Tcp,
                target: None,
            },
        }
    }

    /// The first target whose addresses match `dst`: exact sockets before networks.
    pub fn target_for(&self, dst: OrigDstAddr) -> Option<&Target> {
        let exact = self.targets.iter().find(|t| {
            t.addresses
                .iter()
                .any(|a| matches!(a, TargetAddress::Socket(_)) && a.matches(dst))
        });
        exact.or_else(|| {
            self.targets.iter().find(|t| {
                t.addresses
                    .iter()
                    .any(|a| matches!(a, TargetAddress::Network(_)) && a.matches(dst))
            })
        })
    }

    pub fn control_socket(&self) -> PathBuf {
        self.daemon.run_dir.join("control.sock")
    }

    pub fn store_path(&self) -> PathBuf {
        self.daemon.state_dir.join("sessions.sled")
    }

    pub fn listener_v4(&self) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(self.listener.ipv4), self.listener.port)
    }

    pub fn listener_v6(&self) -> Option<SocketAddr> {
        self.listener
            .ipv6
            .map(|a| SocketAddr::new(IpAddr::V6(a), self.listener.port))
    }
}

/// `512KiB`, `64MiB`, `4GiB`, `1000B` (binary units; a bare number is bytes).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{text:?} is not a size like \"512MiB\" or \"4GiB\""))?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" | "K" | "KB" => 1 << 10,
        "MiB" | "M" | "MB" => 1 << 20,
        "GiB" | "G" | "GB" => 1 << 30,
        "TiB" | "T" | "TB" => 1 << 40,
        other => {
            return Err(format!(
                "{text:?}: unknown unit {other:?} (B, KiB, MiB, GiB, TiB)"
            ))
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("{text:?} is too large"))
}

/// Validates `[approvals]`; `invalid` builds the error naming the key.
fn approvals_from_raw(
    raw: &RawApprovals,
    invalid: &dyn Fn(String, String) -> ConfigError,
) -> Result<ApprovalsConfig, ConfigError> {
    let default_timeout = humantime::parse_duration(&raw.default_timeout).map_err(|e| {
        invalid(
            "approvals.default_timeout".into(),
            format!(
                "{:?} is not a duration like \"5min\" or \"90s\": {e}",
                raw.default_timeout
            ),
        )
    })?;
    if default_timeout.is_zero() || default_timeout > MAX_APPROVAL_WAIT {
        return Err(invalid(
            "approvals.default_timeout".into(),
            format!(
                "must be longer than zero and at most {}",
                humantime::format_duration(MAX_APPROVAL_WAIT)
            ),
        ));
    }
    for (key, value) in [
        (
            "approvals.max_pending_per_identity",
            raw.max_pending_per_identity,
        ),
        ("approvals.max_pending", raw.max_pending),
    ] {
        if value == 0 || value > MAX_PENDING_APPROVALS {
            return Err(invalid(
                key.into(),
                format!("must be between 1 and {MAX_PENDING_APPROVALS}"),
            ));
        }
    }
    Ok(ApprovalsConfig {
        default_timeout,
        max_pending_per_identity: raw.max_pending_per_identity,
        max_pending: raw.max_pending,
    })
}

fn source_path(source: &Source) -> PathBuf {
    match source {
        Source::Embedded => PathBuf::from("<embedded>"),
        Source::File(p) => p.clone(),
    }
}

// The file's shape. Every section and key has a default so an empty file is valid.

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawConfig {
    daemon: RawDaemon,
    listener: RawListener,
    governed: RawGoverned,
    capture: RawCapture,
    store: RawStore,
    approvals: RawApprovals,
    run: RawRun,
    target: Vec<RawTarget>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawRun {
    keep_groups: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawApprovals {
    default_timeout: String,
    max_pending_per_identity: usize,
    max_pending: usize,
}

impl Default for RawApprovals {
    fn default() -> Self {
        Self {
            default_timeout: "5min".into(),
            max_pending_per_identity: 5,
            max_pending: 100,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawStore {
    max_age: String,
    max_size: String,
    prune_interval: String,
}

impl Default for RawStore {
    fn default() -> Self {
        Self {
            max_age: "90days".into(),
            max_size: "4GiB".into(),
            prune_interval: "1min".into(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawDaemon {
    state_dir: PathBuf,
    run_dir: PathBuf,
    bpf_pin_dir: PathBuf,
    fail_open: bool,
    log: String,
    admin_group: String,
    policy_dir: PathBuf,
    workers: usize,
}

impl Default for RawDaemon {
    fn default() -> Self {
        Self {
            state_dir: DEFAULT_STATE_DIR.into(),
            run_dir: DEFAULT_RUN_DIR.into(),
            bpf_pin_dir: DEFAULT_PIN_DIR.into(),
            fail_open: false,
            log: "info".into(),
            admin_group: DEFAULT_ADMIN_GROUP.into(),
            policy_dir: crate::policy::DEFAULT_POLICY_DIR.into(),
            workers: 1,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawListener {
    ipv4: String,
    ipv6: String,
    port: u16,
}

impl Default for RawListener {
    fn default() -> Self {
        Self {
            ipv4: "127.0.0.1".into(),
            ipv6: "::1".into(),
            port: DEFAULT_LISTENER_PORT,
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawGoverned {
    /// Default: `DEFAULT_GOVERNED_CGROUP`, or `/` (the hierarchy's root) with `users`.
    cgroup: Option<PathBuf>,
    uids: Vec<u32>,
    users: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawCapture {
    loopback: bool,
    include: Vec<String>,
    exclude: Vec<String>,
    exclude_ports: Vec<u16>,
    unmatched: Unmatched,
    dns: Vec<String>,
    udp_allow: Vec<String>,
    sockets: Vec<SocketKind>,
    unix_allow: Vec<String>,
    fast_path: bool,
}

impl Default for RawCapture {
    fn default() -> Self {
        Self {
            loopback: true,
            include: Vec::new(),
            exclude: Vec::new(),
            exclude_ports: Vec::new(),
            unmatched: Unmatched::Relay,
            dns: vec!["system".into()],
            udp_allow: Vec::new(),
            sockets: Vec::new(),
            unix_allow: DEFAULT_UNIX_ALLOW.iter().map(ToString::to_string).collect(),
            fast_path: false,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTarget {
    name: String,
    addresses: Vec<String>,
    #[serde(default = "default_protocol")]
    protocol: Protocol,
    #[serde(default)]
    credentials: Option<CredentialRef>,
    #[serde(default)]
    postgres: Option<PostgresTarget>,
    #[serde(default)]
    http: Option<HttpTarget>,
    /// A Kubernetes API server's settings: the HTTP gateway's (`[target.kubernetes]`).
    #[serde(default)]
    kubernetes: Option<HttpTarget>,
    ssh: Option<SshTarget>,
}

fn default_protocol() -> Protocol {
    Protocol::Tcp
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::postgres::settings::{AuthMethod, PostgresLogin};

    fn pg_login<'a>(t: &'a Target, user: &str, database: &str) -> Option<PostgresLogin<'a>> {
        match &t.kind {
            TargetKind::Postgres(pg) => pg.login(t.credentials.as_ref(), user, database),
            _ => panic!("{} is not a PostgreSQL target", t.name),
        }
    }

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::from_toml(text, Source::File("test.toml".into()))
    }

    fn err(text: &str) -> String {
        parse(text)
            .expect_err("config should be rejected")
            .to_string()
    }

    #[test]
    fn governed_users_are_uids_everywhere_and_only_they_allow_the_root_cgroup() {
        let c = parse("[governed]\nusers = [\"nobody\"]\nuids = [4242]\n").unwrap();
        assert_eq!(
            c.governed.cgroup,
            PathBuf::from("/"),
            "users govern everywhere"
        );
        assert_eq!(c.governed.uids, vec![4242, 65534]);
        assert_eq!(c.governed.users, vec!["nobody".to_string()]);
        let c = parse("[governed]\nusers = [\"nobody\"]\ncgroup = \"agents\"\n").unwrap();
        assert_eq!(c.governed.cgroup, PathBuf::from("agents"));
        let c = parse("[governed]\ncgroup = \"/\"\nuids = [1000]\n").unwrap();
        assert_eq!(c.governed.cgroup, PathBuf::from("/"));
        let e = err("[governed]\ncgroup = \"/\"\n");
        assert!(
            e.contains("`governed.cgroup`") && e.contains("governed.users"),
            "{e}"
        );
        let e = err("[governed]\nusers = [\"no-such-user-here\"]\n");
        assert!(
            e.contains("`governed.users[0]`") && e.contains("no-such-user-here"),
            "{e}"
        );
    }

    #[test]
    fn a_value_of_the_wrong_kind_names_its_key_and_what_it_takes() {
        let e = err("[daemon]\nlog = \"info\"\n\n[listener]\nport = 99999\n");
        assert!(
            e.contains("key `listener.port`") && e.contains("from 0 to 65535"),
            "{e}"
        );
        let e = err("[listener]\nport = \"x\"\n");
        assert!(e.contains("`listener.port`") && !e.contains("u16"), "{e}");
        let e = err("[listener]\nport = \"abc\"\n");
        assert!(
            e.ends_with(
                "key `listener.port`: expected a whole number from 0 to 65535, got string \"abc\""
            ),
            "{e}"
        );
        // A value inside a multi-line list: the list's key.
        let e = err("[capture]\nexclude_ports = [\n  22,\n  \"http\",\n]\n");
        assert!(
            e.contains("key `capture.exclude_ports`")
                && e.contains("from 0 to 65535")
                && !e.contains("u16"),
            "{e}"
        );
        let e = err("[daemon]\nworkers = -1\n");
        assert!(
            e.contains("`daemon.workers`: expected a whole number of 0 or more, got integer `-1`"),
            "{e}"
        );
        let e = err("[store]\nmax_age = 90\n");
        assert!(
            e.contains("`store.max_age`: expected a quoted string"),
            "{e}"
        );
        let e = err("[capture]\nloopback = \"yes\"\n");
        assert!(
            e.contains("`capture.loopback`") && e.contains("true or false"),
            "{e}"
        );
        // A syntax error keeps the parser's own report, with its position.
        let e = err("[listener\nport = 1\n");
        assert!(e.contains("line 1"), "{e}");
    }

    #[test]
    fn empty_file_is_the_embedded_default() {
        let c = parse("").unwrap();
        let d = Config::embedded_default();
        assert_eq!(c.listener_v4(), d.listener_v4());
        assert_eq!(c.listener_v4(), "127.0.0.1:951".parse().unwrap());
        assert_eq!(c.listener_v6(), Some("[::1]:951".parse().unwrap()));
        assert_eq!(c.governed.cgroup, PathBuf::from(DEFAULT_GOVERNED_CGROUP));
        assert!(!c.daemon.fail_open);
        assert!(c.capture.loopback, "loopback is captured by default");
        assert_eq!(c.capture.unmatched, Unmatched::Relay);
        assert!(
            !c.capture.fast_path,
            "the kernel fast path is off by default"
        );
        assert!(
            parse("[capture]\nfast_path = true\n")
                .unwrap()
                .capture
                .fast_path
        );
        assert_eq!(d.source, Source::Embedded);
        assert_eq!(c.daemon.admin_group, "bulkhead");
        assert_eq!(c.store.retention.max_age_us, Some(90 * 86_400 * 1_000_000));
        assert_eq!(c.store.retention.max_bytes, Some(4096 << 20));
    }

    #[test]
    fn the_example_file_in_the_repository_parses() {
        let text = include_str!("../../bulkhead.example.toml");
        let c = parse(text).unwrap();
        assert!(!c.targets.is_empty());
        let orders = &c.targets[0];
        let login = |u: &str, d: &str| pg_login(orders, u, d).map(|l| (l.user, l.database));
        assert_eq!(
            login("report_daily", "orders"),
            Some(("reporting".into(), "orders".into()))
        );
        assert_eq!(
            login("app", "orders"),
            Some(("app".into(), "orders".into()))
        );
        assert_eq!(login("app", "postgres"), None);
        let TargetKind::Postgres(pg) = &orders.kind else {
            panic!("orders-db is a postgres target")
        };
        assert_eq!(pg.auth, [AuthMethod::ScramSha256]);
        assert!(!pg.login_to_network);
        let cluster = c.targets.iter().find(|t| t.name == "prod-cluster").unwrap();
        let TargetKind::Kubernetes(kube) = &cluster.kind else {
            panic!("prod-cluster is a kubernetes target")
        };
        assert_eq!(kube.inject[0].prefix, "Bearer ");
    }

    #[test]
    fn unknown_keys_are_named() {
        let e = err("[listener]\nprot = 1\n");
        assert!(e.contains("prot"), "{e}");
        assert!(e.contains("line 2"), "{e}");
        let e = err("colour = \"blue\"\n");
        assert!(e.contains("colour"), "{e}");
        let e =
            err("[[target]]\nname = \"db\"\naddresses = [\"10.0.0.5:5432\"]\npassword = \"x\"\n");
        assert!(e.contains("password"), "{e}");
    }

    #[test]
    fn wrong_types_are_named() {
        let e = err("[listener]\nport = \"fifteen\"\n");
        assert!(e.contains("port"), "{e}");
        let e = err("[listener]\nport = 70000\n");
        assert!(e.contains("port"), "{e}");
    }

    #[test]
    fn bad_values_name_the_key_and_the_problem() {
        let e = err("[listener]\nipv4 = \"10.0.0.1\"\n");
        assert!(
            e.contains("`listener.ipv4`") && e.contains("loopback"),
            "{e}"
        );
        let e = err("[listener]\nport = 0\n");
        assert!(e.contains("`listener.port`"), "{e}");
        let e = err("[capture]\nexclude = [\"10.0.0.0/33\"]\n");
        assert!(e.contains("`capture.exclude[0]`"), "{e}");
        let e = err("[governed]\ncgroup = \"/\"\n");
        assert!(e.contains("`governed.cgroup`") && e.contains("root"), "{e}");
        let e = err("[run]\nkeep_groups = [\"docker\", \" \"]\n");
        assert!(e.contains("`run.keep_groups[1]`"), "{e}");
        let c = Config::from_toml(
            "[run]\nkeep_groups = [\"docker\", \"999\"]\n",
            Source::Embedded,
        )
        .unwrap();
        assert_eq!(c.run.keep_groups, ["docker", "999"]);
        assert!(Config::embedded_default().run.keep_groups.is_empty());
        let e = err("[governed]\ncgroup = \"a/../..\"\n");
        assert!(e.contains("`governed.cgroup`"), "{e}");
        let e = err("[[target]]\nname = \"db\"\naddresses = [\"db.internal:5432\"]\n");
        assert!(e.contains("`target[0].addresses[0]`"), "{e}");
        let e = err("[[target]]\nname = \"db\"\naddresses = []\n");
        assert!(e.contains("`target[0].addresses`"), "{e}");
        let e = err("[[target]]\nname = \"a\"\naddresses = [\"10.0.0.1:1\"]\n[[target]]\nname = \"a\"\naddresses = [\"10.0.0.2:1\"]\n");
        assert!(e.contains("`target[1].name`"), "{e}");
        let e = err(
            "[[target]]\nname = \"db\"\naddresses = [\"10.0.0.5:5432\"]\nprotocol = \"gopher\"\n",
        );
        assert!(e.contains("gopher"), "{e}");
    }

    #[test]
    fn store_retention_is_validated() {
        let e = err("[store]\nmax_age = \"forever\"\n");
        assert!(e.contains("`store.max_age`"), "{e}");
        let e = err("[store]\nprune_interval = \"0s\"\n");
        assert!(e.contains("`store.prune_interval`"), "{e}");
        let c = parse("[store]\nmax_age = \"\"\nmax_size = \"\"\n").unwrap();
        assert_eq!(c.store.retention, crate::record::Retention::default());
        let c = parse("[store]\nmax_age = \"12h\"\nmax_size = \"2MiB\"\n").unwrap();
        assert_eq!(c.store.retention.max_age_us, Some(12 * 3600 * 1_000_000));
        assert_eq!(c.store.retention.max_bytes, Some(2 << 20));
        let e = err("[store]\nmax_size = \"2 parsecs\"\n");
        assert!(e.contains("`store.max_size`"), "{e}");
        assert_eq!(parse_size("4KiB"), Ok(4096));
        assert_eq!(parse_size("100"), Ok(100));
        assert!(parse_size("99999999999TiB").is_err());
        assert!(parse_size("MiB").is_err());
    }

    #[test]
    fn approvals_have_defaults_and_are_validated() {
        let c = parse("").unwrap();
        assert_eq!(
            c.approvals,
            ApprovalsConfig {
                default_timeout: std::time::Duration::from_mins(5),
                max_pending_per_identity: 5,
                max_pending: 100,
            }
        );
        let c = parse("[approvals]\ndefault_timeout = \"90s\"\nmax_pending = 7\n").unwrap();
        assert_eq!(c.approvals.default_timeout.as_secs(), 90);
        assert_eq!(c.approvals.max_pending, 7);
        let e = err("[approvals]\ndefault_timeout = \"soon\"\n");
        assert!(e.contains("`approvals.default_timeout`"), "{e}");
        let e = err("[approvals]\ndefault_timeout = \"0s\"\n");
        assert!(e.contains("`approvals.default_timeout`"), "{e}");
        let e = err("[approvals]\ndefault_timeout = \"3days\"\n");
        assert!(e.contains("`approvals.default_timeout`"), "{e}");
        let e = err("[approvals]\nmax_pending = 0\n");
        assert!(e.contains("`approvals.max_pending`"), "{e}");
        let e = err("[approvals]\nmax_pending_per_identity = 0\n");
        assert!(e.contains("`approvals.max_pending_per_identity`"), "{e}");
        let e = err("[approvals]\nmax_pending_per_identity = -1\n");
        assert!(e.contains("max_pending_per_identity"), "{e}");
        let e = err("[approvals]\ntimeout = \"5min\"\n");
        assert!(e.contains("timeout"), "{e}");
    }

    #[test]
    fn targets_match_exact_sockets_before_networks() {
        let c = parse(
            "[[target]]\nname = \"net\"\naddresses = [\"10.0.0.0/24\"]\n\
             [[target]]\nname = \"db\"\naddresses = [\"10.0.0.5:5432\", \"[fd00::5]:5432\"]\n\
             credentials = { env = \"DB_PASSWORD\" }\n",
        )
        .unwrap();
        let at = |s: &str| {
            c.target_for(OrigDstAddr(s.parse().unwrap()))
                .map(|t| t.name.as_str())
        };
        assert_eq!(at("10.0.0.5:5432"), Some("db"));
        assert_eq!(at("10.0.0.5:22"), Some("net"));
        assert_eq!(at("[::ffff:10.0.0.5]:5432"), Some("db"));
        assert_eq!(at("[fd00::5]:5432"), Some("db"));
        assert_eq!(at("10.0.1.5:5432"), None);
        assert_eq!(
            c.targets[1].credentials,
            Some(CredentialRef::Env("DB_PASSWORD".into()))
        );
    }

    const MAPPED: &str =
        "[[target]]\nname = \"db\"\nprotocol = \"postgres\"\naddresses = [\"10.0.0.5:5432\"]\n\
        credentials = { file = \"/etc/bulkhead/creds/db\" }\n\
        [target.postgres]\ndatabase = \"main\"\n\
        [[target.postgres.map]]\nclient_user = \"app_ro\"\nclient_database = \"sales\"\n\
        user = \"reporting\"\ndatabase = \"sales_prod\"\n\
        credentials = { file = \"/etc/bulkhead/creds/reporting\" }\n\
        [[target.postgres.map]]\nclient_user = \"etl_*\"\nuser = \"loader\"\n\
        [[target.postgres.map]]\nclient_user = \"app_ro\"\nuser = \"reader\"\n\
        [[target.postgres.map]]\nclient_database = \"scratch\"\n";

    #[test]
    fn postgres_map_first_match_wins_and_unmatched_clients_are_refused() {
        let c = parse(MAPPED).unwrap();
        let t = &c.targets[0];
        let login = |u: &str, d: &str| pg_login(t, u, d);
        let reporting = CredentialRef::File("/etc/bulkhead/creds/reporting".into());
        let target_creds = CredentialRef::File("/etc/bulkhead/creds/db".into());
        assert_eq!(
            login("app_ro", "sales"),
            Some(PostgresLogin {
                user: "reporting".into(),
                database: "sales_prod".into(),
                credentials: Some(&reporting),
                mapping: Some(0),
            })
        );
        assert_eq!(
            login("app_ro", "hr"),
            Some(PostgresLogin {
                user: "reader".into(),
                database: "main".into(),
                credentials: Some(&target_creds),
                mapping: Some(2),
            }),
            "a later entry, the target's database and credentials"
        );
        assert_eq!(
            login("etl_nightly", "x").map(|l| l.user),
            Some("loader".into())
        );
        assert_eq!(login("etl_", "x").map(|l| l.mapping), Some(Some(1)));
        assert_eq!(
            login("bob", "scratch"),
            Some(PostgresLogin {
                user: "bob".into(),
                database: "main".into(),
                credentials: Some(&target_creds),
                mapping: Some(3),
            }),
            "an entry without user: the client's own (the target sets none)"
        );
        assert_eq!(login("App_ro", "sales"), None, "names are case-sensitive");
        assert_eq!(login("mallory", "sales"), None);
        assert_eq!(login("", ""), None);
    }

    #[test]
    fn without_a_map_the_target_defaults_apply() {
        let c = parse(
            "[[target]]\nname = \"db\"\nprotocol = \"postgres\"\naddresses = [\"10.0.0.5:5432\"]\n\
             credentials = { env = \"DB_PW\" }\n[target.postgres]\nuser = \"svc\"\n\
             [[target]]\nname = \"plain\"\nprotocol = \"postgres\"\naddresses = [\"10.0.0.6:5432\"]\n\
             postgres = { auth = [\"none\"] }\n",
        )
        .unwrap();
        let env = CredentialRef::Env("DB_PW".into());
        assert_eq!(
            pg_login(&c.targets[0], "alice", "sales"),
            Some(PostgresLogin {
                user: "svc".into(),
                database: "sales".into(),
                credentials: Some(&env),
                mapping: None,
            })
        );
        assert_eq!(
            pg_login(&c.targets[1], "alice", "sales"),
            Some(PostgresLogin {
                user: "alice".into(),
                database: "sales".into(),
                credentials: None,
                mapping: None,
            })
        );
    }

    #[test]
    fn a_map_entry_takes_what_it_leaves_out_from_the_target() {
        let c = parse(
            "[[target]]\nname = \"db\"\nprotocol = \"postgres\"\naddresses = [\"10.0.0.5:5432\"]\n\
             [target.postgres]\nuser = \"svc\"\nauth = [\"none\"]\n\
             [[target.postgres.map]]\nclient_user = \"claude\"\n",
        )
        .unwrap();
        let t = &c.targets[0];
        assert_eq!(
            pg_login(t, "claude", "orders"),
            Some(PostgresLogin {
                user: "svc".into(),
                database: "orders".into(),
                credentials: None,
                mapping: Some(0),
            })
        );
        assert_eq!(pg_login(t, "cursor", "orders"), None);
    }

    #[test]
    fn postgres_map_errors_name_the_entry() {
        let head =
            "[[target]]\nname = \"db\"\nprotocol = \"postgres\"\naddresses = [\"10.0.0.5:5432\"]\n";
        let e = err(&format!(
            "{head}[[target.postgres.map]]\nclient_usr = \"a\"\nuser = \"b\"\n"
        ));
        assert!(e.contains("client_usr") && e.contains("client_user"), "{e}");
        let e = err(&format!(
            "{head}[[target.postgres.map]]\nclient_user = \"\"\nuser = \"b\"\n"
        ));
        assert!(e.contains("empty pattern") && e.contains("line"), "{e}");
        let e = err(&format!(
            "{head}[[target.postgres.map]]\nclient_database = \"a\\\\\"\nuser = \"b\"\n"
        ));
        assert!(e.contains("backslash"), "{e}");
        let e = err(&format!("{head}[[target.postgres.map]]\nuser = \"\"\n"));
        assert!(e.contains("`target[0].postgres.map[0].user`"), "{e}");
        let e = err(&format!(
            "{head}[[target.postgres.map]]\nuser = \"a\"\n[[target.postgres.map]]\nuser = \"b\"\ndatabase = \"\"\n"
        ));
        assert!(e.contains("`target[0].postgres.map[1].database`"), "{e}");
        let e = err(&format!(
            "{head}[[target.postgres.map]]\nuser = \"a\"\ncredentials = {{ env = \"\" }}\n"
        ));
        assert!(
            e.contains("`target[0].postgres.map[0].credentials.env`"),
            "{e}"
        );
        let e = err(&format!(
            "{head}[[target.postgres.map]]\nuser = \"a\"\ncredentials = {{ password = \"x\" }}\n"
        ));
        assert!(e.contains("password"), "{e}");
    }

    #[test]
    fn http_and_kubernetes_targets_take_their_settings() {
        let c = parse(
            "[[target]]\nname = \"api\"\nprotocol = \"http\"\naddresses = [\"10.0.0.7:443\"]\n\
             [target.http]\ntls = \"passthrough\"\n",
        )
        .unwrap();
        assert_eq!(c.targets[0].protocol(), Protocol::Http);
        assert!(matches!(&c.targets[0].kind, TargetKind::Http(h)
            if h.tls == crate::proxy::http::settings::ClientTls::Passthrough));
        let e = parse(
            "[[target]]\nname = \"api\"\nprotocol = \"http\"\naddresses = [\"10.0.0.7:443\"]\n\
             [[target.http.inject]]\nheader = \"host\"\ncredentials = { env = \"T\" }\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("`target[0].http.inject[0].header`"), "{e}");
        let e = parse(
            "[[target]]\nname = \"db\"\nprotocol = \"tcp\"\naddresses = [\"10.0.0.7:5432\"]\n\
             [target.http]\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("`target[0].http`"), "{e}");
        let c = parse(
            "[[target]]\nname = \"k\"\nprotocol = \"kubernetes\"\naddresses = [\"10.0.0.7:6443\"]\n\
             [target.kubernetes]\nca = \"/etc/k.pem\"\n",
        )
        .unwrap();
        assert!(matches!(&c.targets[0].kind, TargetKind::Kubernetes(k)
            if k.ca.as_deref() == Some(std::path::Path::new("/etc/k.pem"))));
        for (bad, key) in [
            (
                "protocol = \"http\"\n[target.kubernetes]\n",
                "`target[0].kubernetes`",
            ),
            (
                "protocol = \"kubernetes\"\n[[target.kubernetes.inject]]\nheader = \"host\"\n\
                 credentials = { env = \"T\" }\n",
                "`target[0].kubernetes.inject[0].header`",
            ),
        ] {
            let e = parse(&format!(
                "[[target]]\nname = \"k\"\naddresses = [\"10.0.0.7:6443\"]\n{bad}"
            ))
            .unwrap_err()
            .to_string();
            assert!(e.contains(key), "{e}");
        }
    }

    #[test]
    fn postgres_auth_methods_are_named_and_validated() {
        let head = "[[target]]\nname = \"db\"\nprotocol = \"postgres\"\n\
                    addresses = [\"10.0.0.5:5432\"]\ncredentials = { env = \"DB_PW\" }\n";
        let pg = |c: &Config| match &c.targets[0].kind {
            TargetKind::Postgres(pg) => pg.clone(),
            _ => panic!("a postgres target"),
        };
        let c = parse(head).unwrap();
        assert_eq!(pg(&c).auth, [AuthMethod::ScramSha256], "the default");
        let c = parse(&format!(
            "{head}postgres = {{ auth = [\"md5\", \"password\", \"none\", \"scram-sha-256\"] }}\n"
        ))
        .unwrap();
        assert_eq!(
            pg(&c).auth,
            [
                AuthMethod::Md5,
                AuthMethod::Password,
                AuthMethod::None,
                AuthMethod::ScramSha256
            ]
        );
        let e = err(&format!("{head}postgres = {{ auth = [\"md4\"] }}\n"));
        assert!(
            e.contains("postgres.auth") && e.contains("\"md4\"") && e.contains("line 6"),
            "{e}"
        );
        let e = err(&format!("{head}[target.postgres]\nauth = [\"trust\"]\n"));
        assert!(
            e.contains("postgres.auth") && e.contains("\"none\"") && e.contains("line 7"),
            "{e}"
        );
        let e = err(&format!("{head}postgres = {{ auth = [] }}\n"));
        assert!(e.contains("`target[0].postgres.auth`"), "{e}");
    }

    #[test]
    fn a_postgres_target_without_a_password_must_allow_none() {
        let head =
            "[[target]]\nname = \"db\"\nprotocol = \"postgres\"\naddresses = [\"10.0.0.5:5432\"]\n";
        let e = err(head);
        assert!(
            e.contains("`target[0].postgres.auth`") && e.contains("\"none\""),
            "{e}"
        );
        parse(&format!("{head}postgres = {{ auth = [\"none\"] }}\n")).unwrap();
        // Every mapped login holds its own password: the default holds.
        let mapped = "[[target.postgres.map]]\nuser = \"a\"\ncredentials = { env = \"A_PW\" }\n";
        parse(&format!("{head}{mapped}")).unwrap();
        let e = err(&format!(
            "{head}{mapped}[[target.postgres.map]]\nuser = \"b\"\n"
        ));
        assert!(e.contains("`target[0].postgres.auth`"), "{e}");
    }

    #[test]
    fn a_postgres_target_of_networks_alone_must_opt_in_to_log_in_there() {
        let target = |addresses: &str, extra: &str| {
            format!(
                "[[target]]\nname = \"db\"\nprotocol = \"postgres\"\naddresses = [{addresses}]\n\
                 credentials = {{ env = \"DB_PW\" }}\n{extra}"
            )
        };
        let e = err(&target("\"10.30.0.0/24\"", ""));
        assert!(
            e.contains("`target[0].addresses`") && e.contains("postgres.login_to_network = true"),
            "{e}"
        );
        let c = parse(&target(
            "\"10.30.0.0/24\"",
            "postgres = { login_to_network = true }\n",
        ))
        .unwrap();
        assert!(matches!(&c.targets[0].kind, TargetKind::Postgres(pg) if pg.login_to_network));
        // A named server beside the network: logged in to there, refused elsewhere
        // (proxy::postgres::upstream::network_refusal).
        parse(&target("\"10.30.0.5:5432\", \"10.30.0.0/24\"", "")).unwrap();
        // Opaque TCP holds no credentials: networks alone are fine.
        parse("[[target]]\nname = \"net\"\naddresses = [\"10.30.0.0/24\"]\n").unwrap();
    }
}
