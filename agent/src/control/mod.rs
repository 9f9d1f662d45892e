//! The admin API: JSON lines on a unix socket, for the CLI.
//!
//! Reachable by root and members of the admin group only (checked with `SO_PEERCRED`, not
//! just file modes), and never by a process inside the governed cgroup, even as root: a
//! governed tool must not be able to read or steer its own gateway.
//!
//! One request line, then one `ok`/`error` line — or, for `sessions_export` and
//! `sessions_tail`, any number of `event` lines (then `end` for an export), and for
//! `approvals_watch` one `ok` line per notice (`approvals.rs`).

pub mod approvals;

use std::{
    io,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, PoisonError},
};

use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::{unix::OwnedWriteHalf, UnixListener, UnixStream},
    sync::{broadcast, watch},
};
use tracing::{debug, warn};

use crate::{
    approval::{ApprovalBroker, Approver},
    cgroup,
    policy::PolicyHandle,
    protocol::Protocol,
    proxy::{Stats, StatsSnapshot},
    record::{
        Event, ListFilter, Retention, Session, SessionId, SessionStore, StoreError, StoreStats,
    },
};

/// Longest request line accepted.
const MAX_REQUEST: u64 = 64 * 1024;

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

/// State the control server answers from.
pub struct ControlState {
    pub store: Arc<dyn SessionStore>,
    pub stats: Arc<Stats>,
    pub policy: PolicyHandle,
    pub info: DaemonInfo,
    pub governed_cgroup: PathBuf,
    /// Only these uids are governed in it (empty: every process).
    pub governed_uids: Vec<u32>,
    pub cgroup_mount: PathBuf,
    pub pin_dir: PathBuf,
    pub admin_group: String,
    /// The configuration file and its digest at start, to tell when it changed.
    pub config_file: Option<(PathBuf, Option<[u8; 32]>)>,
    /// What the last reload of the configuration file put in force (`None`: none since start).
    pub reloaded: Mutex<Option<Reloaded>>,
    pub retention: Retention,
    pub approvals: Arc<ApprovalBroker>,
}

impl ControlState {
    fn store(&self) -> &dyn SessionStore {
        self.store.as_ref()
    }

    fn status(&self) -> StatusReport {
        let mut info = self.info.clone();
        info.connections = self.stats.snapshot();
        let udp = crate::ebpf::udp_policy::compile(&self.policy.current());
        info.containment.udp_policy = udp.allowed;
        info.containment.udp_policy_notes = udp.notes;
        if info.containment.fast_path == "on" {
            info.containment.fast_path_counters =
                crate::ebpf::fast_path::pinned_counters(&self.pin_dir).and_then(Result::ok);
        }
        let reloaded = self
            .reloaded
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let read_digest = match reloaded {
            Some(r) => {
                info.targets = r.targets;
                info.warnings = r.warnings;
                info.restart_needed = r.restart_needed;
                r.digest
            }
            None => self.config_file.as_ref().and_then(|(_, d)| *d),
        };
        info.config_changed = !info.restart_needed.is_empty()
            || self
                .config_file
                .as_ref()
                .is_some_and(|(path, _)| crate::config::file_digest(path) != read_digest);
        let redirect = Redirect::read(&self.pin_dir, Some(&info.listeners));
        StatusReport {
            daemon: Some(info),
            governed_cgroup: self.governed_cgroup.display().to_string(),
            governed_uids: self.governed_uids.clone(),
            redirect,
            pinned_links: crate::ebpf::pinned_links(&self.pin_dir).len(),
            programs_attached: true,
            store: self.store().stats().ok(),
            retention: self.retention,
            policy: Some(self.policy.status()),
            warnings: Vec::new(),
        }
    }

    fn answer(&self, req: &Request) -> Response {
        let result = match req {
            Request::Status => serde_json::to_value(self.status()).map_err(|e| e.to_string()),
            Request::SessionsList { filter, limit } => self
                .store()
                .list(filter, *limit)
                .map_err(|e| e.to_string())
                .and_then(|l| serde_json::to_value(l).map_err(|e| e.to_string())),
            Request::SessionsShow { id } => query::show(self.store(), *id)
                .map_err(|e| e.to_string())
                .and_then(|d| serde_json::to_value(d).map_err(|e| e.to_string())),
            Request::SessionsExport { .. }
            | Request::SessionsTail { .. }
            | Request::ApprovalsWatch => Err("streaming request".into()),
            Request::ApprovalsList
            | Request::ApprovalsApprove { .. }
            | Request::ApprovalsDeny { .. }
            | Request::ApprovalsGrants
            | Request::ApprovalsRevoke { .. } => {
                Err("approvals are answered with the peer's identity".into())
            }
        };
        match result {
            Ok(result) => Response::Ok { result },
            Err(message) => Response::Error { message },
        }
    }
}

/// How far up the process tree [`refusal`] looks for a governed ancestor; a deeper tree is
/// refused (it cannot be told apart from one that hides a governed ancestor).
const MAX_ANCESTRY: usize = 256;

/// Why a peer may not use the socket, or `None` when it may.
///
/// A peer whose process, or any of its ancestors, runs in the governed cgroup is refused, even
/// as root: a governed process must not reach the control socket through a child it moved out
/// of the cgroup (as root) or through anything it started on the way.
pub fn refusal(
    uid: u32,
    gid: u32,
    pid: Option<u32>,
    admin: Option<(&str, u32)>,
    mount: &Path,
    governed: &Path,
    governed_uids: &[u32],
) -> Option<String> {
    let Some(pid) = pid else {
        return Some("permission denied: the caller's process is unknown".into());
    };
    match governed_in_ancestry(pid, mount, governed, governed_uids) {
        Ok(None) => {}
        Ok(Some(p)) if p == pid => {
            return Some("permission denied: the caller runs in the governed cgroup".into())
        }
        Ok(Some(p)) => {
            return Some(format!(
                "permission denied: the caller descends from process {p} ({}), which runs in \
                 the governed cgroup",
                process_name(p)
            ))
        }
        Err(e) => {
            return Some(format!(
                "permission denied: cannot tell whether the caller or one of its ancestors runs \
                 in the governed cgroup ({e})"
            ))
        }
    }
    if uid == 0 {
        return None;
    }
    match admin {
        Some((_, g)) if g == gid || supplementary_groups(pid).contains(&g) => None,
        Some((name, _)) => Some(format!(
            "permission denied: root or members of the `{name}` group only"
        )),
        None => Some("permission denied: root only (the admin group does not exist)".into()),
    }
}

/// The first of `pid` and its ancestors that runs in the governed cgroup, if any.
fn governed_in_ancestry(
    pid: u32,
    mount: &Path,
    governed: &Path,
    uids: &[u32],
) -> io::Result<Option<u32>> {
    first_governed(
        pid,
        |p| cgroup::pid_is_governed(p, mount, governed, uids),
        parent_pid,
    )
}

fn first_governed(
    pid: u32,
    is_governed: impl Fn(u32) -> io::Result<bool>,
    parent_of: impl Fn(u32) -> io::Result<u32>,
) -> io::Result<Option<u32>> {
    let mut p = pid;
    for _ in 0..MAX_ANCESTRY {
        if is_governed(p)? {
            return Ok(Some(p));
        }
        match parent_of(p)? {
            // The top of this pid namespace's tree (init, or kthreadd's children).
            0 | 1 => return Ok(None),
            parent => p = parent,
        }
    }
    Err(io::Error::other(format!(
        "more than {MAX_ANCESTRY} ancestors"
    )))
}

/// The parent of `pid`, from `/proc/PID/stat` (the field after the state, which follows the
/// last `)`: the name in parentheses may itself contain `)` and spaces).
fn parent_pid(pid: u32) -> io::Result<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    parent_from_stat(&stat).ok_or_else(|| io::Error::other(format!("unreadable /proc/{pid}/stat")))
}

fn parent_from_stat(stat: &str) -> Option<u32> {
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(1)?.parse().ok()
}

fn process_name(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map_or_else(|_| "gone".into(), |c| c.trim_end().to_string())
}

/// The supplementary groups of a process, from `/proc/PID/status`.
fn supplementary_groups(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| l.strip_prefix("Groups:")).map(|g| {
                g.split_whitespace()
                    .filter_map(|x| x.parse().ok())
                    .collect()
            })
        })
        .unwrap_or_default()
}

/// The gid of `name` from `/etc/group` text.
pub fn gid_from_group_file(text: &str, name: &str) -> Option<u32> {
    text.lines().find_map(|l| {
        let mut f = l.split(':');
        (f.next()? == name).then_some(())?;
        f.next()?;
        f.next()?.parse().ok()
    })
}

pub fn group_gid(name: &str) -> Option<u32> {
    gid_from_group_file(&std::fs::read_to_string("/etc/group").ok()?, name)
}

/// Binds the socket: mode 0660, owned by the admin group when it exists. A socket file
/// nothing listens on (a crashed daemon's) is removed, and the log says so; one a live daemon
/// answers on is refused.
pub fn bind(path: &Path, admin_group: &str) -> io::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    match std::os::unix::net::UnixStream::connect(path) {
        // Another daemon answers there (one with other pins and cgroup, so its locks did not
        // stop this one): taking its socket would cut its admins off.
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                "another daemon answers on it; stop that daemon or give this one another \
                 daemon.run_dir",
            ))
        }
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            std::fs::remove_file(path)?;
            warn!(
                path = %path.display(),
                "removed a stale control socket left by a daemon that did not exit cleanly"
            );
        }
        Err(_) => match std::fs::remove_file(path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        },
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
    if let Some(gid) = group_gid(admin_group) {
        std::os::unix::fs::chown(path, None, Some(gid))?;
    }
    Ok(listener)
}

pub async fn serve(
    listener: UnixListener,
    state: Arc<ControlState>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => { warn!(error = %e, "control accept failed"); continue; }
            },
            _ = shutdown.changed() => return,
        };
        let state = Arc::clone(&state);
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            if let Err(e) = connection(stream, &state, shutdown).await {
                debug!(error = %e, "control connection ended");
            }
        });
    }
}

async fn connection(
    stream: UnixStream,
    state: &Arc<ControlState>,
    mut shutdown: watch::Receiver<bool>,
) -> io::Result<()> {
    let cred = stream.peer_cred()?;
    let pid = cred.pid().and_then(|p| u32::try_from(p).ok());
    let (r, mut w) = stream.into_split();
    let admin = group_gid(&state.admin_group).map(|g| (state.admin_group.as_str(), g));
    if let Some(message) = refusal(
        cred.uid(),
        cred.gid(),
        pid,
        admin,
        &state.cgroup_mount,
        &state.governed_cgroup,
        &state.governed_uids,
    ) {
        warn!(uid = cred.uid(), pid = ?pid, "control request refused: {message}");
        record_refused_decision(r, state, cred.uid(), &message).await;
        return write_response(&mut w, &Response::Error { message }).await;
    }
    let approver = Approver::from_uid(cred.uid());
    let mut lines = BufReader::new(r.take(MAX_REQUEST)).lines();
    while let Some(line) = lines.next_line().await? {
        let req = match serde_json::from_str::<Request>(&line) {
            Ok(req) => req,
            Err(e) => {
                write_response(
                    &mut w,
                    &Response::Error {
                        message: format!("bad request: {e}"),
                    },
                )
                .await?;
                continue;
            }
        };
        match req {
            Request::SessionsExport { selection } => export(state, selection, &mut w).await?,
            Request::SessionsTail { filter } => {
                return tail(&state, &filter, &mut w, &mut shutdown).await
            }
            Request::ApprovalsWatch => {
                return approvals::watch(&state.approvals, &mut w, &mut shutdown).await
            }
            other => {
                let response = approvals::answer(&state.approvals, &other, &approver)
                    .unwrap_or_else(|| state.answer(&other));
                write_response(&mut w, &response).await?;
            }
        }
    }
    Ok(())
}

/// How long a refused peer's request is waited for, to record an attempt to decide an approval.
const REFUSED_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

/// A refused peer's first request, when it tries to approve or deny a pending request, is
/// recorded in that request's session (`approver_refused`): an attempt from the governed side
/// to decide its own request is worth an auditor's eyes. Nothing else is read from it.
async fn record_refused_decision(
    r: tokio::net::unix::OwnedReadHalf,
    state: &ControlState,
    uid: u32,
    message: &str,
) {
    let mut lines = BufReader::new(r.take(MAX_REQUEST)).lines();
    let Ok(Ok(Some(line))) = tokio::time::timeout(REFUSED_READ_TIMEOUT, lines.next_line()).await
    else {
        return;
    };
    if let Ok(Request::ApprovalsApprove { id, .. } | Request::ApprovalsDeny { id, .. }) =
        serde_json::from_str::<Request>(&line)
    {
        state
            .approvals
            .refuse_approver(id, &Approver::from_uid(uid), message);
    }
}

/// Streams an export: events are read on a blocking thread and sent through a bounded
/// channel, so a large export neither blocks the runtime nor sits whole in memory.
async fn export(
    state: &Arc<ControlState>,
    selection: Selection,
    w: &mut OwnedWriteHalf,
) -> io::Result<()> {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Response>(256);
    let st = Arc::clone(state);
    let reader = tokio::task::spawn_blocking(move || {
        let result = query::export(st.store(), &selection, |event| {
            tx.blocking_send(Response::Event { event }).is_ok()
        });
        let last = match result {
            Ok(()) => Response::End,
            Err(e) => Response::Error {
                message: e.to_string(),
            },
        };
        let _ = tx.blocking_send(last);
    });
    while let Some(r) = rx.recv().await {
        write_response(w, &r).await?;
    }
    reader.await.map_err(io::Error::other)
}

/// Which events a tail wants: those of sessions its filter matches (each session looked up
/// once), and with `--verdict` only the events of that verdict (denials, holds, masked
/// results, allowed requests).
struct TailFilter {
    /// The filter on sessions, without its time and verdict parts.
    sessions: ListFilter,
    verdicts: ListFilter,
    seen: std::collections::HashMap<SessionId, bool>,
}

impl TailFilter {
    fn new(filter: &ListFilter) -> Self {
        Self {
            sessions: ListFilter {
                denied: false,
                allowed: false,
                held: false,
                masked: false,
                since_us: None,
                ..filter.clone()
            },
            verdicts: filter.clone(),
            seen: std::collections::HashMap::new(),
        }
    }

    fn wants(&mut self, store: &dyn SessionStore, event: &Event) -> bool {
        use crate::record::{EventKind, RecordedVerdict};
        if self.seen.len() > 100_000 {
            self.seen.clear();
        }
        let sessions = &self.sessions;
        let wanted = *self.seen.entry(event.session).or_insert_with(|| {
            store
                .get(event.session)
                .ok()
                .flatten()
                .is_some_and(|s| sessions.matches(&s))
        });
        let v = &self.verdicts;
        let kind = &event.kind;
        wanted
            && (!v.denied
                || matches!(
                    kind,
                    EventKind::Request {
                        verdict: RecordedVerdict::Deny,
                        ..
                    }
                ))
            && (!v.allowed
                || matches!(
                    kind,
                    EventKind::Request {
                        verdict: RecordedVerdict::Allow,
                        ..
                    }
                ))
            && (!v.held
                || matches!(kind, EventKind::Approval { state, .. } if state == "requested"))
            && (!v.masked
                || matches!(
                    kind,
                    EventKind::Response {
                        masked_rows: Some(_),
                        ..
                    }
                ))
    }
}

/// Follows events until the client hangs up or the daemon stops: first the recorded ones
/// since `filter.since_us` (if given), then new ones as they are recorded, none twice.
async fn tail(
    state: &Arc<ControlState>,
    filter: &ListFilter,
    w: &mut OwnedWriteHalf,
    shutdown: &mut watch::Receiver<bool>,
) -> io::Result<()> {
    // Subscribe before reading the history, so nothing falls between the two.
    let mut events = state.store().subscribe();
    write_response(
        w,
        &Response::Ok {
            result: serde_json::Value::Null,
        },
    )
    .await?;
    let mut wanted = TailFilter::new(filter);
    let mut last_id = 0;
    if let Some(since_us) = filter.since_us {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Event>(256);
        let st = Arc::clone(state);
        let reader = tokio::task::spawn_blocking(move || {
            let selection = Selection::Range {
                since_us: Some(since_us),
                until_us: None,
            };
            query::export(st.store(), &selection, |event| {
                tx.blocking_send(event).is_ok()
            })
        });
        while let Some(event) = rx.recv().await {
            last_id = last_id.max(event.id);
            if wanted.wants(state.store(), &event) {
                write_response(w, &Response::Event { event }).await?;
            }
        }
        if let Ok(Err(e)) = reader.await {
            let message = format!("history not complete: {e}");
            write_response(w, &Response::Error { message }).await?;
        }
    }
    loop {
        let event = tokio::select! {
            e = events.recv() => e,
            _ = shutdown.changed() => return write_response(w, &Response::End).await,
        };
        match event {
            Ok(event) if event.id <= last_id => {}
            Ok(event) => {
                if wanted.wants(state.store(), &event) {
                    write_response(w, &Response::Event { event }).await?;
                }
            }
            Err(broadcast::error::RecvError::Lagged(n)) => {
                let message = format!("tail fell behind; {n} events skipped (see sessions export)");
                write_response(w, &Response::Error { message }).await?;
            }
            Err(broadcast::error::RecvError::Closed) => {
                return write_response(w, &Response::End).await
            }
        }
    }
}

async fn write_response(w: &mut OwnedWriteHalf, response: &Response) -> io::Result<()> {
    let mut line = serde_json::to_vec(response).map_err(io::Error::other)?;
    line.push(b'\n');
    w.write_all(&line).await
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// `stale`: a socket file is there but nothing listens (a daemon that did not exit cleanly).
    #[error("the daemon is not running ({})", socket_absence(path, *stale))]
    NotRunning { path: PathBuf, stale: bool },
    #[error("control socket {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{0}")]
    Refused(String),
    #[error("unexpected answer from the daemon: {0}")]
    Protocol(String),
}

/// Why there is no daemon at `path`, as the CLI words it.
pub fn socket_absence(path: &Path, stale: bool) -> String {
    if stale {
        format!(
            "stale control socket at {}: left by a daemon that did not exit cleanly; the next \
             `bulkhead daemon` replaces it",
            path.display()
        )
    } else {
        format!("no control socket at {}", path.display())
    }
}

/// A connection to the daemon (blocking; the CLI has nothing else to do meanwhile).
pub struct Client {
    path: PathBuf,
    reader: std::io::BufReader<std::os::unix::net::UnixStream>,
}

impl Client {
    /// `admin_group` only words the error when the socket refuses us.
    pub fn connect(path: &Path, admin_group: &str) -> Result<Self, ClientError> {
        match std::os::unix::net::UnixStream::connect(path) {
            Ok(s) => Ok(Self {
                path: path.to_path_buf(),
                reader: std::io::BufReader::new(s),
            }),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
                ) =>
            {
                Err(ClientError::NotRunning {
                    path: path.to_path_buf(),
                    stale: e.kind() == io::ErrorKind::ConnectionRefused,
                })
            }
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
                Err(ClientError::Refused(format!(
                    "permission denied on {}: root or members of the `{admin_group}` group only",
                    path.display()
                )))
            }
            Err(source) => Err(ClientError::Io {
                path: path.to_path_buf(),
                source,
            }),
        }
    }

    fn io_err(&self, source: io::Error) -> ClientError {
        ClientError::Io {
            path: self.path.clone(),
            source,
        }
    }

    pub fn send(&mut self, req: &Request) -> Result<(), ClientError> {
        use std::io::Write as _;
        let mut line = serde_json::to_vec(req).map_err(|e| ClientError::Protocol(e.to_string()))?;
        line.push(b'\n');
        let r = self.reader.get_mut().write_all(&line);
        match r {
            Ok(()) => Ok(()),
            // The daemon refuses a peer by answering at once and closing; the refusal may
            // already be waiting for us even though our request could not be written.
            Err(e) => match self.next() {
                Ok(Some(Response::Error { message })) => Err(ClientError::Refused(message)),
                _ => Err(self.io_err(e)),
            },
        }
    }

    /// The next response line; `None` when the daemon closed the connection.
    pub fn next(&mut self) -> Result<Option<Response>, ClientError> {
        use std::io::BufRead as _;
        let mut answer = String::new();
        let n = self.reader.read_line(&mut answer);
        if n.map_err(|e| self.io_err(e))? == 0 {
            return Ok(None);
        }
        serde_json::from_str(&answer)
            .map(Some)
            .map_err(|e| ClientError::Protocol(format!("{e}: {answer:?}")))
    }

    /// One request, one answer.
    pub fn call(&mut self, req: &Request) -> Result<serde_json::Value, ClientError> {
        self.send(req)?;
        match self.next()? {
            Some(Response::Ok { result }) => Ok(result),
            Some(Response::Error { message }) => Err(ClientError::Refused(message)),
            Some(other) => Err(ClientError::Protocol(format!("{other:?}"))),
            None => Err(ClientError::Protocol(
                "the daemon closed the connection".into(),
            )),
        }
    }
}

/// One request to the daemon at `path`.
pub fn call(
    path: &Path,
    admin_group: &str,
    req: &Request,
) -> Result<serde_json::Value, ClientError> {
    Client::connect(path, admin_group)?.call(req)
}

/// Convenience for `StoreError` in the CLI.
impl From<StoreError> for ClientError {
    fn from(e: StoreError) -> Self {
        ClientError::Protocol(e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_stale_socket_is_replaced_and_a_live_one_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("control.sock");
        // A crashed daemon's socket: the file is there, nothing listens.
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        let live = bind(&path, "no-such-group-here").unwrap();
        assert!(std::os::unix::net::UnixStream::connect(&path).is_ok());
        let e = bind(&path, "no-such-group-here").unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AddrInUse, "{e}");
        assert!(
            e.to_string().contains("another daemon answers on it"),
            "{e}"
        );
        // The live daemon still has its socket.
        assert!(std::os::unix::net::UnixStream::connect(&path).is_ok());
        drop(live);
    }

    #[test]
    fn finds_the_admin_group() {
        let groups = "root:x:0:\nbulkhead:x:998:alice,bob\nstaff:x:50:\n";
        assert_eq!(gid_from_group_file(groups, "bulkhead"), Some(998));
        assert_eq!(gid_from_group_file(groups, "nobody"), None);
        assert_eq!(gid_from_group_file("bulkhead:x\n", "bulkhead"), None);
    }

    #[test]
    fn requests_round_trip_as_json_lines() {
        let r: Request =
            serde_json::from_str(r#"{"op":"sessions_list","filter":{"uid":5},"limit":5}"#).unwrap();
        assert!(
            matches!(r, Request::SessionsList { limit: 5, ref filter } if filter.uid == Some(5))
        );
        assert!(serde_json::from_str::<Request>(r#"{"op":"approve"}"#).is_err());
        let text = serde_json::to_string(&Response::Error {
            message: "x".into(),
        })
        .unwrap();
        assert_eq!(text, r#"{"status":"error","message":"x"}"#);
        let r: Request =
            serde_json::from_str(r#"{"op":"sessions_export","selection":{"session":3}}"#).unwrap();
        assert!(matches!(
            r,
            Request::SessionsExport {
                selection: Selection::Session(3)
            }
        ));
    }

    #[test]
    fn the_parent_is_read_past_a_name_with_parentheses_and_spaces() {
        assert_eq!(parent_from_stat("42 (bash) S 7 42 42 0"), Some(7));
        assert_eq!(parent_from_stat("42 (a) b) (c) S 9 42 42"), Some(9));
        assert_eq!(parent_from_stat("42 (x"), None);
        assert_eq!(
            parent_pid(std::process::id()).ok(),
            Some(std::os::unix::process::parent_id())
        );
    }

    /// A process outside the governed cgroup whose parent (or any ancestor) is in it is
    /// found; a process that cannot be read, or a loop, is an error (refused).
    #[test]
    fn a_governed_ancestor_is_found_and_unreadable_ancestry_is_an_error() {
        // 40 -> 30 -> 20 -> 10 -> 1; 20 is governed.
        let parent = |p: u32| match p {
            40 => Ok(30),
            30 => Ok(20),
            20 => Ok(10),
            10 => Ok(1),
            _ => Err(io::Error::other("gone")),
        };
        let governed = |set: &'static [u32]| move |p: u32| Ok(set.contains(&p));
        assert_eq!(
            first_governed(40, governed(&[20]), parent).unwrap(),
            Some(20)
        );
        assert_eq!(
            first_governed(40, governed(&[40]), parent).unwrap(),
            Some(40)
        );
        assert_eq!(first_governed(40, governed(&[]), parent).unwrap(), None);
        assert!(first_governed(50, governed(&[]), parent).is_err());
        let looping = |p: u32| Ok(if p == 7 { 8 } else { 7 });
        assert!(first_governed(7, governed(&[]), looping).is_err());
        let unreadable = |_: u32| Err(io::Error::other("no /proc"));
        assert!(first_governed(40, unreadable, parent).is_err());
    }

    #[test]
    fn the_peer_without_a_pid_is_refused() {
        let r = refusal(
            0,
            0,
            None,
            None,
            Path::new("/sys/fs/cgroup"),
            Path::new("/sys/fs/cgroup/x"),
            &[],
        );
        assert!(r.is_some());
    }

    /// The approvals requests rest on this: a governed process, even root, never reaches the
    /// broker, so it can never approve (or list, or deny) its own held request.
    #[test]
    fn a_governed_process_is_refused_even_as_root() {
        let me = std::process::id();
        let mount =
            crate::cgroup::cgroup2_mount().unwrap_or_else(|_| PathBuf::from("/sys/fs/cgroup"));
        let own = std::fs::read_to_string(format!("/proc/{me}/cgroup")).unwrap();
        let own = crate::cgroup::path_from_proc_cgroup(&own)
            .expect("this process has a cgroup2 path")
            .trim_start_matches('/')
            .to_string();
        // Treat the test's own cgroup as the governed one: it is now a governed process.
        let governed = mount.join(own);
        let refused = refusal(
            0,
            0,
            Some(me),
            Some(("bulkhead", 0)),
            &mount,
            &governed,
            &[],
        )
        .expect("a governed root process must be refused");
        // Governed users only: this process (root) is in the cgroup but not governed.
        assert!(
            refusal(
                0,
                0,
                Some(me),
                Some(("bulkhead", 0)),
                &mount,
                &governed,
                &[65534]
            )
            .is_none(),
            "a process of an ungoverned uid below the cgroup is not governed"
        );
        assert!(refused.contains("governed cgroup"), "{refused}");
        let refused = refusal(
            1000,
            998,
            Some(me),
            Some(("bulkhead", 998)),
            &mount,
            &governed,
            &[],
        )
        .expect("a governed admin must be refused");
        assert!(refused.contains("governed cgroup"), "{refused}");
    }

    #[test]
    fn root_outside_the_governed_cgroup_is_allowed_and_others_are_not() {
        let me = std::process::id();
        let mount =
            crate::cgroup::cgroup2_mount().unwrap_or_else(|_| PathBuf::from("/sys/fs/cgroup"));
        let governed = mount.join("bulkhead-unit-test-never-created");
        assert_eq!(refusal(0, 0, Some(me), None, &mount, &governed, &[]), None);
        let denied = refusal(
            1000,
            1000,
            Some(me),
            Some(("bulkhead", 998)),
            &mount,
            &governed,
            &[],
        )
        .unwrap();
        assert!(denied.contains("`bulkhead` group"), "{denied}");
        assert_eq!(
            refusal(
                1000,
                998,
                Some(me),
                Some(("bulkhead", 998)),
                &mount,
                &governed,
                &[]
            ),
            None
        );
        let no_group = refusal(1000, 998, Some(me), None, &mount, &governed, &[]).unwrap();
        assert!(no_group.contains("root only"), "{no_group}");
    }
}
