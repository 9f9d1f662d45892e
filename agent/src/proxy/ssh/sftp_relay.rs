//! An sftp channel: every client request framed and judged before it is forwarded (paths by
//! `Action::Sftp`), a refused one answered `SSH_FX_PERMISSION_DENIED` in its place; the
//! server's answers followed to know which handle is which file, so each transfer is recorded
//! with its path, direction and size when the handle is closed.

use std::{
    collections::HashMap,
    sync::{atomic::Ordering, Mutex, PoisonError},
};

use crate::conn_log::{debug, warn};
use russh::{client, server, ChannelMsg, ChannelReadHalf, ChannelWriteHalf};

use super::{
    sftp::{self, Answer, Framer, HandleOp, Request},
    Ctx,
};
use crate::{policy::Action, proxy::session::Ask, record::EventKind};

/// Requests in flight and handles open at once, per channel.
const MAX_PENDING: usize = 1024;
const MAX_HANDLES: usize = 256;

struct OpenFile {
    path: String,
    write: bool,
    dir: bool,
    /// The judged request's event, for the transfer's record.
    event: u64,
    bytes: u64,
}

#[derive(Default)]
struct State {
    /// Open requests by id, until the server answers with a handle.
    opening: HashMap<u32, OpenFile>,
    handles: HashMap<Vec<u8>, OpenFile>,
    /// Read requests by id, to count the data answered.
    reading: HashMap<u32, Vec<u8>>,
}

/// Relays an sftp channel until the target closes it; a summary for the record.
pub async fn relay(
    ctx: &Ctx<'_, '_>,
    from_client: ChannelReadHalf,
    to_client: &ChannelWriteHalf<server::Msg>,
    from_up: ChannelReadHalf,
    to_up: &ChannelWriteHalf<client::Msg>,
) -> String {
    let state = Mutex::new(State::default());
    let upward = requests(ctx, &state, from_client, to_client, to_up);
    let downward = answers(ctx, &state, from_up, to_client);
    tokio::pin!(upward, downward);
    let summary = tokio::select! {
        s = &mut downward => s,
        s = &mut upward => {
            let _ = to_up.close().await;
            let _ = tokio::time::timeout(std::time::Duration::from_secs(5), &mut downward).await;
            s
        }
    };
    // Handles the client never closed: recorded as they stand.
    let left: Vec<OpenFile> = state
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .handles
        .drain()
        .map(|(_, f)| f)
        .collect();
    for f in left {
        record_transfer(ctx, &f, "not closed");
    }
    summary
}

fn record_transfer(ctx: &Ctx<'_, '_>, f: &OpenFile, how: &str) {
    let what = match (f.dir, f.write) {
        (true, _) => "listed".to_string(),
        (false, true) => format!("wrote {} bytes", f.bytes),
        (false, false) => format!("read {} bytes", f.bytes),
    };
    ctx.conn.record(EventKind::Response {
        request: f.event,
        duration_us: 0,
        summary: Some(format!(
            "{what} {}{how}",
            crate::text::terminal_safe(&f.path)
        )),
        error: None,
        masked_rows: None,
        mask_rules: Vec::new(),
    });
}

/// Judges one operation; the recorded event's id and the refusal, if refused.
async fn judge(
    ctx: &Ctx<'_, '_>,
    op: &str,
    write: bool,
    paths: &[String],
) -> (u64, Option<String>) {
    let policy = ctx.conn.policy();
    let text = format!("sftp {op} {}", paths.join(" "));
    let mut first = 0;
    // Every path must be allowed (a rename reads as a write to both).
    for path in paths {
        let d = ctx
            .conn
            .decide(
                &policy,
                Ask {
                    action: Action::Sftp { write, path },
                    text: &text,
                    class: Some(if write { "sftp-write" } else { "sftp-read" }.into()),
                    on_hold: None,
                    params: &[],
                },
            )
            .await;
        if first == 0 {
            first = d.request;
        }
        if let Some(r) = d.refusal {
            return (first, Some(r));
        }
    }
    (first, None)
}

async fn requests(
    ctx: &Ctx<'_, '_>,
    state: &Mutex<State>,
    mut from_client: ChannelReadHalf,
    to_client: &ChannelWriteHalf<server::Msg>,
    to_up: &ChannelWriteHalf<client::Msg>,
) -> String {
    let mut framer = Framer::default();
    while let Some(msg) = from_client.wait().await {
        let data = match msg {
            ChannelMsg::Data { data } => data,
            ChannelMsg::Eof => {
                let _ = to_up.eof().await;
                continue;
            }
            ChannelMsg::Close => return "closed by the client".into(),
            other => {
                debug!(?other, "not relayed on an sftp channel");
                continue;
            }
        };
        let packets = match framer.push(&data) {
            Ok(p) => p,
            Err(e) => {
                warn!(error = %e, "sftp from the client; closing the channel");
                ctx.conn.record(EventKind::Error {
                    message: format!("client: {e}"),
                });
                return format!("client: {e}");
            }
        };
        for packet in packets {
            let request = match sftp::parse_request(&packet) {
                Ok(r) => r,
                Err(e) => {
                    ctx.conn.record(EventKind::Error {
                        message: format!("client: {e}"),
                    });
                    return format!("client: {e}");
                }
            };
            let refused = admit(ctx, state, request).await.err();
            let sent = match refused {
                None => {
                    ctx.bytes_up
                        .fetch_add(packet.len() as u64, Ordering::Relaxed);
                    to_up.data_bytes(packet).await
                }
                Some((id, message)) => {
                    to_client
                        .data_bytes(sftp::permission_denied(id, &message))
                        .await
                }
            };
            if sent.is_err() {
                return "closed".into();
            }
        }
    }
    "closed by the client".into()
}

/// Whether a request may go to the target: `Err((id, message))` to refuse it.
async fn admit(
    ctx: &Ctx<'_, '_>,
    state: &Mutex<State>,
    request: Request,
) -> Result<(), (u32, String)> {
    let lock = || state.lock().unwrap_or_else(PoisonError::into_inner);
    match request {
        Request::Init | Request::Harmless { .. } => Ok(()),
        Request::Unjudgeable { id, why } => {
            ctx.conn.record(EventKind::request(
                &format!("sftp: {why}"),
                Some("sftp".into()),
                crate::record::RecordedVerdict::Deny,
                vec![super::REFUSED_RULE.into()],
            ));
            Err((id, format!("bulkhead: {why}")))
        }
        Request::Open {
            id,
            path,
            write,
            dir,
        } => {
            let op = match (dir, write) {
                (true, _) => "opendir",
                (false, true) => "open-write",
                (false, false) => "open-read",
            };
            let (event, refusal) = judge(ctx, op, write, std::slice::from_ref(&path)).await;
            if let Some(r) = refusal {
                return Err((id, r));
            }
            let mut s = lock();
            if s.opening.len() >= MAX_PENDING {
                return Err((id, "bulkhead: too many requests in flight".into()));
            }
            s.opening.insert(
                id,
                OpenFile {
                    path,
                    write,
                    dir,
                    event,
                    bytes: 0,
                },
            );
            Ok(())
        }
        Request::Paths {
            id,
            op,
            write,
            paths,
        } => match judge(ctx, op, write, &paths).await {
            (_, Some(r)) => Err((id, r)),
            (_, None) => Ok(()),
        },
        Request::Handle { id, handle, op } => {
            let mut s = lock();
            match op {
                HandleOp::Write(n) => {
                    if let Some(f) = s.handles.get_mut(&handle) {
                        f.bytes = f.bytes.saturating_add(n);
                    }
                }
                HandleOp::Read => {
                    if s.reading.len() < MAX_PENDING {
                        s.reading.insert(id, handle);
                    }
                }
                HandleOp::Close => {
                    if let Some(f) = s.handles.remove(&handle) {
                        drop(s);
                        record_transfer(ctx, &f, "");
                    }
                }
                HandleOp::Other => {}
            }
            Ok(())
        }
    }
}

async fn answers(
    ctx: &Ctx<'_, '_>,
    state: &Mutex<State>,
    mut from_up: ChannelReadHalf,
    to_client: &ChannelWriteHalf<server::Msg>,
) -> String {
    let mut framer = Framer::default();
    let mut summary = "closed without an exit status".to_string();
    while let Some(msg) = from_up.wait().await {
        let sent = match msg {
            ChannelMsg::Data { data } => {
                ctx.bytes_down
                    .fetch_add(data.len() as u64, Ordering::Relaxed);
                match framer.push(&data) {
                    Ok(packets) => follow(state, &packets),
                    Err(e) => {
                        ctx.conn.record(EventKind::Error {
                            message: format!("target: {e}"),
                        });
                        return format!("target: {e}");
                    }
                }
                to_client.data_bytes(data).await
            }
            ChannelMsg::ExtendedData { data, ext } => {
                to_client.extended_data_bytes(ext, data).await
            }
            ChannelMsg::Eof => to_client.eof().await,
            ChannelMsg::ExitStatus { exit_status } => {
                summary = format!("exit {exit_status}");
                to_client.exit_status(exit_status).await
            }
            ChannelMsg::Close => break,
            _ => Ok(()),
        };
        if sent.is_err() {
            break;
        }
    }
    summary
}

/// Follows the server's answers: handles given for opens, data for reads.
fn follow(state: &Mutex<State>, packets: &[Vec<u8>]) {
    let mut s = state.lock().unwrap_or_else(PoisonError::into_inner);
    for p in packets {
        match sftp::parse_answer(p) {
            Ok(Answer::Handle { id, handle }) => {
                if let Some(f) = s.opening.remove(&id) {
                    if s.handles.len() < MAX_HANDLES {
                        s.handles.insert(handle, f);
                    }
                }
            }
            Ok(Answer::Data { id, len }) => {
                if let Some(h) = s.reading.remove(&id) {
                    if let Some(f) = s.handles.get_mut(&h) {
                        f.bytes = f.bytes.saturating_add(len);
                    }
                }
            }
            Ok(Answer::Other { id: Some(id) }) => {
                s.opening.remove(&id);
                s.reading.remove(&id);
            }
            Ok(Answer::Other { id: None }) | Err(_) => {}
        }
    }
}
