//! The admin API: JSON lines on a unix socket, for the CLI.
//!
//! Reachable by root and members of the `bulkhead` group only (checked with `SO_PEERCRED`, not
//! just file modes), and never by a process inside the governed cgroup, even as root: a
//! governed tool must not be able to read or steer its own gateway.

use std::{
    io,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    sync::Arc,
};

use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream},
    sync::watch,
};
use tracing::{debug, warn};

use crate::{
    cgroup,
    proxy::{Gateway, StatsSnapshot},
    record::{SessionCounts, SessionId},
};

/// The group whose members may use the control socket besides root.
pub const ADMIN_GROUP: &str = "bulkhead";
/// Longest request line accepted.
const MAX_REQUEST: u64 = 64 * 1024;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    Status,
    SessionsList { limit: usize },
    SessionsShow { id: u64 },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Response {
    Ok { result: serde_json::Value },
    Error { message: String },
}

/// What `bulkhead status` prints.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusReport {
    pub daemon: Option<DaemonInfo>,
    pub governed_cgroup: String,
    pub pinned_links: usize,
    /// Programs are attached when the daemon runs, or when links are pinned without it
    /// (then governed connections are refused: fail closed).
    pub programs_attached: bool,
    pub sessions: Option<SessionCounts>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DaemonInfo {
    pub pid: u32,
    pub started_at_us: u64,
    pub config: String,
    pub mode: String,
    pub listeners: Vec<String>,
    pub connections: StatsSnapshot,
}

/// State the control server answers from.
pub struct ControlState {
    pub gateway: Arc<Gateway>,
    pub info: DaemonInfo,
    pub governed_cgroup: PathBuf,
    pub cgroup_mount: PathBuf,
    pub pin_dir: PathBuf,
}

impl ControlState {
    fn status(&self) -> StatusReport {
        let mut info = self.info.clone();
        info.connections = self.gateway.stats.snapshot();
        StatusReport {
            daemon: Some(info),
            governed_cgroup: self.governed_cgroup.display().to_string(),
            pinned_links: crate::ebpf::pinned_links(&self.pin_dir).len(),
            programs_attached: true,
            sessions: self.gateway.store.counts().ok(),
        }
    }

    fn answer(&self, req: Request) -> Response {
        let result = match req {
            Request::Status => serde_json::to_value(self.status()),
            Request::SessionsList { limit } => match self.gateway.store.list(limit) {
                Ok(list) => serde_json::to_value(list),
                Err(e) => {
                    return Response::Error {
                        message: e.to_string(),
                    }
                }
            },
            Request::SessionsShow { id } => match self.gateway.store.get(SessionId(id)) {
                Ok(Some(s)) => serde_json::to_value(s),
                Ok(None) => {
                    return Response::Error {
                        message: format!("no session with id {id}"),
                    }
                }
                Err(e) => {
                    return Response::Error {
                        message: e.to_string(),
                    }
                }
            },
        };
        match result {
            Ok(result) => Response::Ok { result },
            Err(e) => Response::Error {
                message: e.to_string(),
            },
        }
    }
}

/// Why a peer may not use the socket, or `None` when it may.
pub fn refusal(
    uid: u32,
    gid: u32,
    pid: Option<u32>,
    admin_gid: Option<u32>,
    mount: &Path,
    governed: &Path,
) -> Option<String> {
    if let Some(pid) = pid {
        match cgroup::pid_is_governed(pid, mount, governed) {
            Ok(false) => {}
            Ok(true) => {
                return Some("permission denied: the caller runs in the governed cgroup".into())
            }
            Err(_) => {
                return Some(
                    "permission denied: cannot tell which cgroup the caller runs in".into(),
                )
            }
        }
    } else {
        return Some("permission denied: the caller's process is unknown".into());
    }
    if uid == 0 {
        return None;
    }
    let in_group = admin_gid
        .is_some_and(|g| g == gid || pid.is_some_and(|p| supplementary_groups(p).contains(&g)));
    if in_group {
        None
    } else {
        Some(format!(
            "permission denied: root or the `{ADMIN_GROUP}` group only"
        ))
    }
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

pub fn admin_gid() -> Option<u32> {
    gid_from_group_file(&std::fs::read_to_string("/etc/group").ok()?, ADMIN_GROUP)
}

/// Binds the socket: mode 0660, group `bulkhead` when it exists.
pub fn bind(path: &Path) -> io::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
    if let Some(gid) = admin_gid() {
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
        tokio::spawn(async move {
            if let Err(e) = connection(stream, &state).await {
                debug!(error = %e, "control connection ended");
            }
        });
    }
}

async fn connection(stream: UnixStream, state: &ControlState) -> io::Result<()> {
    let cred = stream.peer_cred()?;
    let pid = cred.pid().and_then(|p| u32::try_from(p).ok());
    let (r, mut w) = stream.into_split();
    if let Some(message) = refusal(
        cred.uid(),
        cred.gid(),
        pid,
        admin_gid(),
        &state.cgroup_mount,
        &state.governed_cgroup,
    ) {
        warn!(uid = cred.uid(), pid = ?pid, "control request refused: {message}");
        return write_response(&mut w, &Response::Error { message }).await;
    }
    let mut lines = BufReader::new(r.take(MAX_REQUEST)).lines();
    while let Some(line) = lines.next_line().await? {
        let response = match serde_json::from_str::<Request>(&line) {
            Ok(req) => state.answer(req),
            Err(e) => Response::Error {
                message: format!("bad request: {e}"),
            },
        };
        write_response(&mut w, &response).await?;
    }
    Ok(())
}

use tokio::io::AsyncReadExt as _;

async fn write_response(
    w: &mut tokio::net::unix::OwnedWriteHalf,
    response: &Response,
) -> io::Result<()> {
    let mut line = serde_json::to_vec(response).map_err(io::Error::other)?;
    line.push(b'\n');
    w.write_all(&line).await
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("the daemon is not running (no control socket at {0})")]
    NotRunning(PathBuf),
    #[error("control socket {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{0}")]
    Refused(String),
    #[error("unexpected answer from the daemon: {0}")]
    Protocol(String),
}

/// One request to the daemon (blocking; the CLI has nothing else to do meanwhile).
pub fn call(path: &Path, req: &Request) -> Result<serde_json::Value, ClientError> {
    use std::io::{BufRead as _, Write as _};
    let io_err = |source| ClientError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut stream = match std::os::unix::net::UnixStream::connect(path) {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Err(ClientError::NotRunning(path.to_path_buf()))
        }
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
            return Err(ClientError::Refused(format!(
                "permission denied on {}: root or the `{ADMIN_GROUP}` group only",
                path.display()
            )))
        }
        Err(e) => return Err(io_err(e)),
    };
    let mut line = serde_json::to_vec(req).map_err(|e| ClientError::Protocol(e.to_string()))?;
    line.push(b'\n');
    stream.write_all(&line).map_err(io_err)?;
    let mut answer = String::new();
    std::io::BufReader::new(&stream)
        .read_line(&mut answer)
        .map_err(io_err)?;
    match serde_json::from_str::<Response>(&answer) {
        Ok(Response::Ok { result }) => Ok(result),
        Ok(Response::Error { message }) => Err(ClientError::Refused(message)),
        Err(e) => Err(ClientError::Protocol(format!("{e}: {answer:?}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_admin_group() {
        let groups = "root:x:0:\nbulkhead:x:998:alice,bob\nstaff:x:50:\n";
        assert_eq!(gid_from_group_file(groups, "bulkhead"), Some(998));
        assert_eq!(gid_from_group_file(groups, "nobody"), None);
        assert_eq!(gid_from_group_file("bulkhead:x\n", "bulkhead"), None);
    }

    #[test]
    fn requests_round_trip_as_json_lines() {
        let r: Request = serde_json::from_str(r#"{"op":"sessions_list","limit":5}"#).unwrap();
        assert!(matches!(r, Request::SessionsList { limit: 5 }));
        assert!(serde_json::from_str::<Request>(r#"{"op":"approve"}"#).is_err());
        let text = serde_json::to_string(&Response::Error {
            message: "x".into(),
        })
        .unwrap();
        assert_eq!(text, r#"{"status":"error","message":"x"}"#);
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
        );
        assert!(r.is_some());
    }

    #[test]
    fn root_outside_the_governed_cgroup_is_allowed_and_others_are_not() {
        let me = std::process::id();
        let mount =
            crate::cgroup::cgroup2_mount().unwrap_or_else(|_| PathBuf::from("/sys/fs/cgroup"));
        let governed = mount.join("bulkhead-unit-test-never-created");
        assert_eq!(refusal(0, 0, Some(me), None, &mount, &governed), None);
        let denied = refusal(1000, 1000, Some(me), None, &mount, &governed).unwrap();
        assert!(denied.contains("`bulkhead` group"), "{denied}");
        assert_eq!(
            refusal(1000, 998, Some(me), Some(998), &mount, &governed),
            None
        );
    }
}
