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
};

use serde::Serialize;

use crate::net::{Cidr, OrigDstAddr};
use crate::protocol::Protocol;

mod capture;
mod raw;
mod target;

use raw::{RawApprovals, RawConfig};

pub use capture::{
    resolv_conf_nameservers, CaptureConfig, SocketKind, UdpAllow, Unmatched, DEFAULT_UNIX_ALLOW,
};
use target::targets_from_raw;
pub use target::{unmatched_name, ResolvedTarget, Target, TargetAddress, TargetKind};

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
        // `bulkhead daemon --fail-open` sets it over the file: a daemon running fail-open
        // cannot tell the flag from the file, so only turning it on counts as a change.
        let daemon = DaemonConfig {
            fail_open: newer.daemon.fail_open || self.daemon.fail_open,
            ..newer.daemon.clone()
        };
        if self.daemon != daemon {
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

        let targets = targets_from_raw(target, &invalid)?;

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

#[cfg(test)]
mod tests;
