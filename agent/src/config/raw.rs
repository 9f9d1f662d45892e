//! The file's shape, as serde reads it, before validation ([`super::Config::from_toml`]).

use std::path::PathBuf;

use serde::Deserialize;

use super::{
    SocketKind, Unmatched, DEFAULT_ADMIN_GROUP, DEFAULT_LISTENER_PORT, DEFAULT_PIN_DIR,
    DEFAULT_RUN_DIR, DEFAULT_STATE_DIR, DEFAULT_UNIX_ALLOW,
};
use crate::{
    credentials::CredentialRef,
    protocol::Protocol,
    proxy::{
        http::settings::HttpTarget, postgres::settings::PostgresTarget, ssh::settings::SshTarget,
    },
};

// The file's shape. Every section and key has a default so an empty file is valid.

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawConfig {
    pub(super) daemon: RawDaemon,
    pub(super) listener: RawListener,
    pub(super) governed: RawGoverned,
    pub(super) capture: RawCapture,
    pub(super) store: RawStore,
    pub(super) approvals: RawApprovals,
    pub(super) run: RawRun,
    pub(super) target: Vec<RawTarget>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawRun {
    pub(super) keep_groups: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawApprovals {
    pub(super) default_timeout: String,
    pub(super) max_pending_per_identity: usize,
    pub(super) max_pending: usize,
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
pub(super) struct RawStore {
    pub(super) max_age: String,
    pub(super) max_size: String,
    pub(super) prune_interval: String,
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
pub(super) struct RawDaemon {
    pub(super) state_dir: PathBuf,
    pub(super) run_dir: PathBuf,
    pub(super) bpf_pin_dir: PathBuf,
    pub(super) fail_open: bool,
    pub(super) log: String,
    pub(super) admin_group: String,
    pub(super) policy_dir: PathBuf,
    pub(super) workers: usize,
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
pub(super) struct RawListener {
    pub(super) ipv4: String,
    pub(super) ipv6: String,
    pub(super) port: u16,
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
pub(super) struct RawGoverned {
    /// Default: `DEFAULT_GOVERNED_CGROUP`, or `/` (the hierarchy's root) with `users`.
    pub(super) cgroup: Option<PathBuf>,
    pub(super) uids: Vec<u32>,
    pub(super) users: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawCapture {
    pub(super) loopback: bool,
    pub(super) include: Vec<String>,
    pub(super) exclude: Vec<String>,
    pub(super) exclude_ports: Vec<u16>,
    pub(super) unmatched: Unmatched,
    pub(super) dns: Vec<String>,
    pub(super) udp_allow: Vec<String>,
    pub(super) sockets: Vec<SocketKind>,
    pub(super) unix_allow: Vec<String>,
    pub(super) fast_path: bool,
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
pub(super) struct RawTarget {
    pub(super) name: String,
    pub(super) addresses: Vec<String>,
    #[serde(default = "default_protocol")]
    pub(super) protocol: Protocol,
    #[serde(default)]
    pub(super) credentials: Option<CredentialRef>,
    #[serde(default)]
    pub(super) postgres: Option<PostgresTarget>,
    #[serde(default)]
    pub(super) http: Option<HttpTarget>,
    /// A Kubernetes API server's settings: the HTTP gateway's (`[target.kubernetes]`).
    #[serde(default)]
    pub(super) kubernetes: Option<HttpTarget>,
    pub(super) ssh: Option<SshTarget>,
}

pub(super) fn default_protocol() -> Protocol {
    Protocol::Tcp
}
