//! The `approvals_*` requests of the control socket.
//!
//! The approver is always the socket's peer as `SO_PEERCRED` names it (uid, and the user name
//! from `/etc/passwd`), never anything the request claims. The socket has already refused
//! governed processes, even root ones (`crate::control::refusal`), so a governed tool can never
//! approve its own request.

use std::{collections::HashSet, io, time::Duration};

use tokio::{
    io::{AsyncWrite, AsyncWriteExt as _},
    sync::{broadcast, watch},
};

use super::{Request, Response};
use crate::approval::{ApprovalBroker, Approver, Notice};

/// Answers an approvals request from `approver`; `None` when `req` is not one (or is
/// `approvals_watch`, which streams: see [`watch`]).
pub fn answer(broker: &ApprovalBroker, req: &Request, approver: &Approver) -> Option<Response> {
    let result = match req {
        Request::ApprovalsList => to_value(&broker.list_pending()),
        Request::ApprovalsApprove {
            id,
            reason,
            for_secs,
        } => broker
            .approve(
                *id,
                approver.clone(),
                reason.clone(),
                for_secs.map(Duration::from_secs),
            )
            .map_err(|e| e.to_string())
            .and_then(|d| to_value(&d)),
        Request::ApprovalsDeny { id, reason } => broker
            .deny(*id, approver.clone(), reason.clone())
            .map_err(|e| e.to_string())
            .and_then(|d| to_value(&d)),
        Request::ApprovalsGrants => to_value(&broker.grants()),
        Request::ApprovalsRevoke { id } => broker
            .revoke(*id, approver.clone())
            .map_err(|e| e.to_string())
            .and_then(|g| to_value(&g)),
        _ => return None,
    };
    Some(match result {
        Ok(result) => Response::Ok { result },
        Err(message) => Response::Error { message },
    })
}

fn to_value<T: serde::Serialize>(value: &T) -> Result<serde_json::Value, String> {
    serde_json::to_value(value).map_err(|e| e.to_string())
}

/// `approvals_watch`: an `ok` line, then one `ok` line per [`Notice`] (what is pending now
/// first, as `requested` notices), until the client hangs up or the daemon stops (`end`).
pub async fn watch<W: AsyncWrite + Unpin>(
    broker: &ApprovalBroker,
    w: &mut W,
    shutdown: &mut watch::Receiver<bool>,
) -> io::Result<()> {
    // Subscribe before listing, so nothing falls between the two; skip what the list had.
    let mut notices = broker.subscribe();
    let pending = broker.list_pending();
    let listed: HashSet<u64> = pending.iter().map(|p| p.id).collect();
    write(
        w,
        &Response::Ok {
            result: serde_json::Value::Null,
        },
    )
    .await?;
    for approval in pending {
        write_notice(w, &Notice::Requested { approval }).await?;
    }
    loop {
        let notice = tokio::select! {
            n = notices.recv() => n,
            _ = shutdown.changed() => return write(w, &Response::End).await,
        };
        match notice {
            Ok(Notice::Requested { approval }) if listed.contains(&approval.id) => {}
            Ok(notice) => write_notice(w, &notice).await?,
            Err(broadcast::error::RecvError::Lagged(n)) => {
                let message =
                    format!("watch fell behind; {n} notices skipped (see approvals list)");
                write(w, &Response::Error { message }).await?;
            }
            Err(broadcast::error::RecvError::Closed) => return write(w, &Response::End).await,
        }
    }
}

async fn write_notice<W: AsyncWrite + Unpin>(w: &mut W, notice: &Notice) -> io::Result<()> {
    let result = serde_json::to_value(notice).map_err(io::Error::other)?;
    write(w, &Response::Ok { result }).await
}

async fn write<W: AsyncWrite + Unpin>(w: &mut W, response: &Response) -> io::Result<()> {
    let mut line = serde_json::to_vec(response).map_err(io::Error::other)?;
    line.push(b'\n');
    w.write_all(&line).await
}

#[cfg(test)]
pub(crate) mod tests {
    use std::{path::PathBuf, sync::Arc};

    use tokio::{
        io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader},
        net::UnixStream,
    };

    use super::*;
    use crate::{
        approval::{ApprovalIdentity, ApprovalOutcome, ApprovalRequest},
        config::Config,
        control::{ControlState, DaemonInfo},
        protocol::Protocol,
        proxy::StatsSnapshot,
        record::{EventKind, Retention, SessionId, SessionStore, SledStore},
    };

    pub(crate) fn broker() -> (Arc<ApprovalBroker>, Arc<dyn SessionStore>) {
        let store: Arc<dyn SessionStore> = Arc::new(SledStore::temporary().unwrap());
        let config = Config::embedded_default();
        (
            Arc::new(ApprovalBroker::new(Arc::clone(&store), config.approvals)),
            store,
        )
    }

    fn request() -> ApprovalRequest {
        ApprovalRequest {
            session: SessionId(1),
            identity: ApprovalIdentity {
                uid: 2000,
                user: None,
                exe: Some("/usr/bin/psql".into()),
                comm: "psql".into(),
            },
            target: "orders-db".into(),
            protocol: Protocol::Postgres,
            text: "DROP TABLE orders".into(),
            rule: "ddl".into(),
            what: crate::approval::RequestDetails::default(),
            timeout: std::time::Duration::from_mins(5),
        }
    }

    /// Holds a request in a task and returns its id once pending.
    pub(crate) async fn held(
        broker: &Arc<ApprovalBroker>,
    ) -> (u64, tokio::task::JoinHandle<ApprovalOutcome>) {
        let mut notices = broker.subscribe();
        let b = Arc::clone(broker);
        let task = tokio::spawn(async move { b.request(request()).await });
        match notices.recv().await.unwrap() {
            Notice::Requested { approval } => (approval.id, task),
            other => panic!("expected a pending request, got {other:?}"),
        }
    }

    fn approvers(store: &dyn SessionStore) -> Vec<(String, Option<u32>, Option<String>)> {
        store
            .events(SessionId(1))
            .unwrap()
            .into_iter()
            .filter_map(|e| match e.kind {
                EventKind::Approval {
                    state,
                    by_uid,
                    by_user,
                    ..
                } => Some((state, by_uid, by_user)),
                _ => None,
            })
            .collect()
    }

    #[tokio::test]
    async fn the_approver_is_the_peer_not_what_the_request_claims() {
        let (broker, store) = broker();
        let (id, task) = held(&broker).await;
        let peer = Approver {
            uid: 4242,
            user: Some("carol".into()),
        };
        let line = format!(
            r#"{{"op":"approvals_approve","id":{id},"reason":"ok","for_secs":60,"by_uid":0,"by_user":"root","by":{{"uid":0}}}}"#
        );
        let req: Request = serde_json::from_str(&line).unwrap();
        let Some(Response::Ok { result }) = answer(&broker, &req, &peer) else {
            panic!("approve failed");
        };
        assert_eq!(result["by"]["uid"], 4242);
        assert_eq!(result["grant"]["by"]["user"], "carol");
        let ApprovalOutcome::Approved { by, grant, .. } = task.await.unwrap() else {
            panic!("not approved");
        };
        assert_eq!((by, grant), (peer.clone(), Some(id)));
        assert_eq!(
            approvers(store.as_ref()).last().cloned(),
            Some(("approved".into(), Some(4242), Some("carol".into())))
        );

        // Grants are listed and revoked as the peer too.
        let Some(Response::Ok { result }) = answer(&broker, &Request::ApprovalsGrants, &peer)
        else {
            panic!("grants failed");
        };
        assert_eq!(result.as_array().map(Vec::len), Some(1));
        let revoke: Request = serde_json::from_str(&format!(
            r#"{{"op":"approvals_revoke","id":{id},"by_uid":0}}"#
        ))
        .unwrap();
        assert!(matches!(
            answer(&broker, &revoke, &peer),
            Some(Response::Ok { .. })
        ));
        assert_eq!(
            approvers(store.as_ref()).last().cloned(),
            Some(("revoked".into(), Some(4242), Some("carol".into())))
        );
    }

    #[tokio::test]
    async fn unknown_ids_and_other_requests() {
        let (broker, _store) = broker();
        let peer = Approver { uid: 0, user: None };
        for req in [
            Request::ApprovalsApprove {
                id: 77,
                reason: None,
                for_secs: None,
            },
            Request::ApprovalsDeny {
                id: 77,
                reason: None,
            },
            Request::ApprovalsRevoke { id: 77 },
        ] {
            let Some(Response::Error { message }) = answer(&broker, &req, &peer) else {
                panic!("{req:?} must fail");
            };
            assert!(message.contains("77"), "{message}");
        }
        let Some(Response::Ok { result }) = answer(&broker, &Request::ApprovalsList, &peer) else {
            panic!("list failed");
        };
        assert_eq!(result, serde_json::json!([]));
        assert!(answer(&broker, &Request::Status, &peer).is_none());
        assert!(answer(&broker, &Request::ApprovalsWatch, &peer).is_none());
        let r: Request = serde_json::from_str(r#"{"op":"approvals_deny","id":3}"#).unwrap();
        assert!(matches!(
            r,
            Request::ApprovalsDeny {
                id: 3,
                reason: None
            }
        ));
    }

    async fn next_response<R: tokio::io::AsyncBufRead + Unpin>(
        lines: &mut tokio::io::Lines<R>,
    ) -> Response {
        let line = lines.next_line().await.unwrap().expect("a response line");
        serde_json::from_str(&line).unwrap()
    }

    /// The group name for `gid` in `/etc/group` text.
    fn group_name(text: &str, gid: u32) -> Option<String> {
        text.lines().find_map(|l| {
            let mut f = l.split(':');
            let name = f.next()?;
            f.next()?;
            (f.next()?.parse::<u32>().ok()? == gid).then(|| name.to_string())
        })
    }

    /// A control server on `dir/control.sock` answering from `broker`, reachable by this test
    /// process whoever runs it (its own primary group is the admin group).
    pub(crate) fn serve_for_test(
        broker: &Arc<ApprovalBroker>,
        store: &Arc<dyn SessionStore>,
        dir: &std::path::Path,
    ) -> (PathBuf, tokio::sync::watch::Sender<bool>) {
        // SAFETY: getgid has no preconditions.
        let gid = unsafe { libc::getgid() };
        let admin_group = std::fs::read_to_string("/etc/group")
            .ok()
            .and_then(|t| group_name(&t, gid))
            .unwrap_or_else(|| "bulkhead".into());
        let mount =
            crate::cgroup::cgroup2_mount().unwrap_or_else(|_| PathBuf::from("/sys/fs/cgroup"));
        let state = Arc::new(ControlState {
            store: Arc::clone(store),
            stats: Arc::default(),
            policy: crate::policy::PolicyHandle::new("/nonexistent"),
            info: DaemonInfo {
                pid: std::process::id(),
                started_at_us: 0,
                config: "test".into(),
                mode: "fail-closed".into(),
                listeners: Vec::new(),
                connections: StatsSnapshot::default(),
                targets: Vec::new(),
                warnings: Vec::new(),
                config_changed: false,
                restart_needed: Vec::new(),
                containment: crate::control::Containment::default(),
            },
            config_file: None,
            reloaded: std::sync::Mutex::default(),
            governed_cgroup: mount.join("bulkhead-unit-test-never-created"),
            governed_uids: Vec::new(),
            cgroup_mount: mount,
            pin_dir: dir.join("pins"),
            admin_group: admin_group.clone(),
            retention: Retention::default(),
            approvals: Arc::clone(broker),
        });
        let path = dir.join("control.sock");
        let listener = crate::control::bind(&path, &admin_group).unwrap();
        let (stop, stopped) = tokio::sync::watch::channel(false);
        tokio::spawn(crate::control::serve(listener, state, stopped));
        (path, stop)
    }

    /// Through the real socket: the approver is whoever `SO_PEERCRED` says connected (this
    /// test process), and `approvals_watch` streams what is pending, then what comes.
    #[tokio::test]
    async fn over_the_socket_the_approver_comes_from_peer_credentials() {
        // SAFETY: getuid has no preconditions.
        let uid = unsafe { libc::getuid() };
        let dir = tempfile::tempdir().unwrap();
        let (broker, store) = broker();
        let (path, stop) = serve_for_test(&broker, &store, dir.path());

        let (first, first_task) = held(&broker).await;
        let watcher = UnixStream::connect(&path).await.unwrap();
        let (r, mut w) = watcher.into_split();
        let mut watch_lines = BufReader::new(r).lines();
        w.write_all(b"{\"op\":\"approvals_watch\"}\n")
            .await
            .unwrap();
        assert!(
            matches!(next_response(&mut watch_lines).await, Response::Ok { result } if result.is_null())
        );
        let Response::Ok { result } = next_response(&mut watch_lines).await else {
            panic!("expected the pending request");
        };
        assert_eq!(result["kind"], "requested");
        assert_eq!(result["approval"]["id"], first);

        let admin = UnixStream::connect(&path).await.unwrap();
        let (r, mut w) = admin.into_split();
        let mut lines = BufReader::new(r).lines();
        let line = format!(
            r#"{{"op":"approvals_deny","id":{first},"reason":"no","by_uid":31337,"by_user":"mallory"}}"#
        );
        w.write_all(format!("{line}\n").as_bytes()).await.unwrap();
        let answer = next_response(&mut lines).await;
        let Response::Ok { result } = answer else {
            panic!("deny failed: {answer:?}");
        };
        assert_eq!(result["by"]["uid"], uid);
        let expected_user = std::fs::read_to_string("/etc/passwd")
            .ok()
            .and_then(|t| crate::identity::user_from_passwd(&t, uid));
        assert_eq!(
            result["by"]["user"].as_str().map(str::to_string),
            expected_user
        );
        assert!(matches!(
            first_task.await.unwrap(),
            ApprovalOutcome::Denied { by, .. } if by.uid == uid
        ));
        assert_eq!(
            approvers(store.as_ref()).last().cloned(),
            Some(("denied".into(), Some(uid), expected_user))
        );

        let Response::Ok { result } = next_response(&mut watch_lines).await else {
            panic!("expected the decision");
        };
        assert_eq!(
            (result["kind"].as_str(), result["state"].as_str()),
            (Some("decided"), Some("denied"))
        );
        let (second, second_task) = held(&broker).await;
        let Response::Ok { result } = next_response(&mut watch_lines).await else {
            panic!("expected the new request");
        };
        assert_eq!(result["approval"]["id"], second);
        second_task.abort();
        let _ = stop.send(true);
        assert!(matches!(
            next_response(&mut watch_lines).await,
            Response::Ok { .. } | Response::End
        ));
    }
}
