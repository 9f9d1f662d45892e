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
mod client;
mod peer;
mod wire;

pub use client::{call, socket_absence, Client, ClientError};
pub use peer::{gid_from_group_file, group_gid, refusal};
pub use wire::*;

use std::{
    io,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, PoisonError},
};

use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::{unix::OwnedWriteHalf, UnixListener, UnixStream},
    sync::{broadcast, watch},
};
use tracing::{debug, warn};

use crate::{
    approval::{ApprovalBroker, Approver},
    policy::PolicyHandle,
    proxy::Stats,
    record::{Event, ListFilter, Retention, SessionId, SessionStore},
};

/// Longest request line accepted.
const MAX_REQUEST: u64 = 64 * 1024;

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
}
