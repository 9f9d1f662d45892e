//! What travels on the control socket: requests, responses and the reports they carry, as
//! JSON lines.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::{
    protocol::Protocol,
    proxy::StatsSnapshot,
    record::{
        Event, ListFilter, Retention, Session, SessionId, SessionStore, StoreError, StoreStats,
    },
};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    Status,
    SessionsList {
        filter: ListFilter,
        limit: usize,
    },
    SessionsShow {
        id: u64,
    },
    SessionsExport {
        selection: Selection,
    },
    SessionsTail {
        filter: ListFilter,
    },
    // Approvals (`approvals.rs`): the approver is the peer, never a field here.
    ApprovalsList,
    ApprovalsApprove {
        id: u64,
        #[serde(default)]
        reason: Option<String>,
        /// Also approve requests like this one for this many seconds (a grant window).
        #[serde(default)]
        for_secs: Option<u64>,
    },
    ApprovalsDeny {
        id: u64,
        #[serde(default)]
        reason: Option<String>,
    },
    ApprovalsGrants,
    ApprovalsRevoke {
        id: u64,
    },
    ApprovalsWatch,
}

/// Which events an export covers.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Selection {
    Session(u64),
    Range {
        since_us: Option<u64>,
        until_us: Option<u64>,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
#[expect(
    clippy::large_enum_variant,
    reason = "a response is written once and dropped; boxing events would add an allocation per exported event"
)]
pub enum Response {
    Ok { result: serde_json::Value },
    Error { message: String },
    Event { event: Event },
    End,
}

/// What `bulkhead status` prints.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusReport {
    pub daemon: Option<DaemonInfo>,
    pub governed_cgroup: String,
    /// Only these uids are governed in the cgroup and below (empty: every process).
    #[serde(default)]
    pub governed_uids: Vec<u32>,
    /// Where the pinned programs send governed connects (nothing pinned: absent).
    #[serde(default)]
    pub redirect: Option<Redirect>,
    pub pinned_links: usize,
    /// Programs are attached when the daemon runs, or when links are pinned without it
    /// (then governed connections are refused: fail closed).
    pub programs_attached: bool,
    pub store: Option<StoreStats>,
    pub retention: Retention,
    /// The policy in force and the last reload error (only while the daemon runs).
    #[serde(default)]
    pub policy: Option<crate::policy::PolicyStatus>,
    /// What is wrong with the configuration, read by the CLI while the daemon is not running
    /// (a running daemon's are in `daemon.warnings`).
    #[serde(default)]
    pub warnings: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DaemonInfo {
    pub pid: u32,
    pub started_at_us: u64,
    pub config: String,
    pub mode: String,
    pub listeners: Vec<String>,
    pub connections: StatsSnapshot,
    /// The configured targets, as the daemon read them at start.
    #[serde(default)]
    pub targets: Vec<TargetInfo>,
    /// What the daemon found wrong at start without refusing to run (unreadable credentials,
    /// a missing admin group).
    #[serde(default)]
    pub warnings: Vec<String>,
    /// The configuration file differs from what the daemon runs: edited since it was last
    /// read (a reload, `SIGHUP`, applies its targets), or read with sections that apply only
    /// after a restart (`restart_needed`).
    #[serde(default)]
    pub config_changed: bool,
    /// Sections of the configuration file, as last read, that differ from what the daemon
    /// runs and apply only after a restart (`listener`, `capture`, ...).
    #[serde(default)]
    pub restart_needed: Vec<String>,
    /// What governed processes can reach besides TCP through the gateway.
    #[serde(default)]
    pub containment: Containment,
}

/// Where the pinned programs redirect governed connects, and whether that is this daemon.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Redirect {
    /// `127.0.0.1:951`, `[::1]:951`; or the error reading the pinned configuration.
    pub to: Vec<String>,
    /// The configuration is complete; until it is every governed connect is refused.
    pub ready: bool,
    /// Whether it is the running daemon's listener (absent when no daemon runs).
    pub this_daemon: Option<bool>,
    #[serde(default)]
    pub error: Option<String>,
}

impl Redirect {
    /// From the pin directory; `listeners` are the running daemon's, if one runs.
    pub fn read(pin_dir: &Path, listeners: Option<&[String]>) -> Option<Self> {
        Some(match crate::ebpf::pinned_redirect(pin_dir)? {
            Ok((v4, v6, port, ready)) => {
                let mut to = vec![std::net::SocketAddr::from((v4, port)).to_string()];
                to.extend(v6.map(|a| std::net::SocketAddr::from((a, port)).to_string()));
                Self {
                    this_daemon: listeners.map(|l| to.iter().all(|t| l.contains(t))),
                    to,
                    ready,
                    error: None,
                }
            }
            Err(e) => Self {
                to: Vec::new(),
                ready: false,
                this_daemon: listeners.map(|_| false),
                error: Some(e.to_string()),
            },
        })
    }
}

/// Besides TCP through the gateway: the sockets and datagrams governed processes may use.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Containment {
    /// Which sockets the kernel filters at `socket()`.
    pub socket_filter: String,
    /// Socket kinds the configuration allows beyond TCP, UDP, unix and netlink.
    pub sockets_allowed: Vec<String>,
    /// Resolvers governed processes may send DNS to.
    pub dns: Vec<String>,
    /// Where their queries go instead, to be recorded and relayed (the DNS forwarder).
    #[serde(default)]
    pub dns_forwarder: Vec<String>,
    /// Other UDP destinations they may send to. Every other datagram is refused and recorded.
    pub udp_allow: Vec<String>,
    /// UDP destinations the policy in force opens (`udp` targets and allow rules).
    #[serde(default)]
    pub udp_policy: Vec<String>,
    /// Why other `udp` names of the policy are not opened.
    #[serde(default)]
    pub udp_policy_notes: Vec<String>,
    /// Unix socket addresses they may connect or send to, or why unix sockets are not governed.
    #[serde(default)]
    pub unix: String,
    /// The kernel fast path for the loopback hop (`capture.fast_path`): "on", "off", or
    /// "off: why" when it was asked for and could not be attached.
    #[serde(default)]
    pub fast_path: String,
    /// What it did (from the pinned counters), when it is on.
    #[serde(default)]
    pub fast_path_counters: Option<crate::ebpf::fast_path::FastPathCounters>,
}

/// What a reload of the configuration file (`SIGHUP`) left: the digest of the file it read,
/// the targets it put in force, what it found wrong in them, and the sections that differ
/// from what runs and wait for a restart.
#[derive(Debug, Clone, Default)]
pub struct Reloaded {
    pub digest: Option<[u8; 32]>,
    pub targets: Vec<TargetInfo>,
    pub warnings: Vec<String>,
    pub restart_needed: Vec<String>,
}

/// The targets of `config`, for `bulkhead status`.
pub fn target_infos(config: &crate::config::Config) -> Vec<TargetInfo> {
    config
        .targets
        .iter()
        .map(|t| TargetInfo {
            name: t.name.clone(),
            protocol: t.protocol(),
            addresses: t.addresses.iter().map(ToString::to_string).collect(),
        })
        .collect()
}

/// A configured target, for `bulkhead status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetInfo {
    pub name: String,
    pub protocol: Protocol,
    pub addresses: Vec<String>,
}

/// A session with its timeline, for `sessions show`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SessionDetail {
    pub session: Session,
    pub events: Vec<Event>,
}

/// Queries shared by the daemon and by the CLI reading a stopped daemon's store.
pub mod query {
    use super::{Event, ListFilter, Selection, SessionDetail, SessionId, SessionStore, StoreError};

    #[derive(Debug, thiserror::Error)]
    pub enum QueryError {
        #[error(transparent)]
        Store(#[from] StoreError),
        #[error("no session with id {0}")]
        UnknownSession(u64),
    }

    pub fn show(store: &dyn SessionStore, id: u64) -> Result<SessionDetail, QueryError> {
        let session = store
            .get(SessionId(id))?
            .ok_or(QueryError::UnknownSession(id))?;
        let events = store.events(SessionId(id))?;
        Ok(SessionDetail { session, events })
    }

    /// Calls `emit` for every event of the selection, oldest first.
    pub fn export(
        store: &dyn SessionStore,
        selection: &Selection,
        mut emit: impl FnMut(Event) -> bool,
    ) -> Result<(), QueryError> {
        match *selection {
            Selection::Session(id) => {
                store
                    .get(SessionId(id))?
                    .ok_or(QueryError::UnknownSession(id))?;
                for e in store.events(SessionId(id))? {
                    if !emit(e) {
                        break;
                    }
                }
            }
            Selection::Range { since_us, until_us } => {
                // Sessions that started up to a day before `since` may still have events in
                // the range.
                let filter = ListFilter {
                    since_us: since_us.map(|s| s.saturating_sub(86_400_000_000)),
                    until_us,
                    ..ListFilter::default()
                };
                let mut sessions = store.list(&filter, usize::MAX)?;
                sessions.reverse();
                for s in sessions {
                    for e in store.events(s.id)? {
                        let in_range = since_us.is_none_or(|t| e.at_us >= t)
                            && until_us.is_none_or(|t| e.at_us <= t);
                        if in_range && !emit(e) {
                            return Ok(());
                        }
                    }
                }
            }
        }
        Ok(())
    }
}
