//! One session channel: its requests judged, then relayed to a channel of the gateway's own
//! on the target.
//!
//! Before the channel's one `exec` or `shell` request, a `pty-req` is kept (and replayed
//! upstream once the request is allowed), and so are the `env` variables, the agent and the
//! X11 forwarding the policy allowed (judged for the handler, [`super::tunnel`]); subsystems
//! other than sftp are refused and recorded. Nothing reaches the target before
//! the request is allowed: the upstream channel is opened only then, and the command sent is
//! exactly the bytes judged.

use std::{
    sync::{atomic::Ordering, PoisonError},
    time::Instant,
};

use crate::conn_log::{debug, info};
use russh::{
    client, server, Channel, ChannelId, ChannelMsg, ChannelReadHalf, ChannelWriteHalf, Pty, Sig,
};

use super::{record_refused, tap::Utf8Tap, Ctx, DENIED_EXIT_STATUS};
use crate::{
    policy::Action,
    proxy::session::Ask,
    record::{EventKind, MAX_EVENT_TEXT},
};

/// What the client asked a pty for.
struct PtyRequest {
    term: String,
    size: (u32, u32, u32, u32),
    modes: Vec<(Pty, u32)>,
}

/// What the channel runs.
enum Run {
    Exec(Vec<u8>),
    Shell,
    /// The sftp subsystem: each file operation is judged (`sftp_relay`).
    Sftp,
}

/// Serves one session channel to its end.
pub async fn serve(ctx: &Ctx<'_, '_>, chan: Channel<server::Msg>) {
    let id = chan.id();
    serve_channel(ctx, chan).await;
    // What was allowed for it and not used (a request refused, or none made).
    ctx.env
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .remove(&id);
    ctx.agent
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .remove(&id);
    ctx.x11
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .remove(&id);
}

async fn serve_channel(ctx: &Ctx<'_, '_>, mut chan: Channel<server::Msg>) {
    let id = chan.id();
    let mut pty: Option<PtyRequest> = None;
    let run = loop {
        let Some(msg) = chan.wait().await else {
            return;
        };
        match msg {
            ChannelMsg::RequestPty {
                term,
                col_width,
                row_height,
                pix_width,
                pix_height,
                terminal_modes,
                ..
            } => {
                pty = Some(PtyRequest {
                    term,
                    size: (col_width, row_height, pix_width, pix_height),
                    modes: terminal_modes,
                });
            }
            ChannelMsg::WindowChange {
                col_width,
                row_height,
                pix_width,
                pix_height,
            } => {
                if let Some(p) = pty.as_mut() {
                    p.size = (col_width, row_height, pix_width, pix_height);
                }
            }
            // The session task judged these for the handler (tunnel.rs), which answered them.
            ChannelMsg::SetEnv { .. }
            | ChannelMsg::AgentForward { .. }
            | ChannelMsg::RequestX11 { .. } => {}
            ChannelMsg::RequestSubsystem { name, .. } if name == "sftp" => break Run::Sftp,
            ChannelMsg::RequestSubsystem { name, .. } => {
                record_refused(
                    ctx.conn,
                    &format!("subsystem {}", crate::text::terminal_safe(&name)),
                );
                let _ = ctx.client.channel_failure(id).await;
            }
            ChannelMsg::Exec { command, .. } => break Run::Exec(command),
            ChannelMsg::RequestShell { .. } => break Run::Shell,
            ChannelMsg::Eof | ChannelMsg::Close => {
                let _ = ctx.client.close(id).await;
                return;
            }
            other => debug!(?other, "ignored before the channel's request"),
        }
    };

    let (text, refusal) = decide(ctx, id, &run, pty.is_some()).await;
    let started = Instant::now();
    let env = ctx
        .env
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .remove(&id)
        .unwrap_or_default();
    let agent = ctx
        .agent
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .remove(&id);
    let x11 = ctx
        .x11
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .remove(&id);
    if let Some(message) = refusal {
        deny(ctx, id, &message, pty.is_some()).await;
        drop(chan);
        return;
    }
    let Some(up) = open_upstream(ctx, id, &run, pty.as_ref(), &env, agent, x11).await else {
        return;
    };
    let summary = if matches!(run, Run::Sftp) {
        let (from_client, to_client) = chan.split();
        let (from_up, to_up) = up.split();
        let s = super::sftp_relay::relay(ctx, from_client, &to_client, from_up, &to_up).await;
        let _ = to_client.close().await;
        let _ = to_up.close().await;
        s
    } else {
        relay(ctx, chan, up, pty.is_some()).await
    };
    ctx.conn.record(EventKind::Response {
        request: text,
        duration_us: u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
        summary: Some(summary),
        error: None,
        masked_rows: None,
        mask_rules: Vec::new(),
    });
}

/// Judges the channel's request; the recorded request's id, and the refusal message unless it
/// may run.
async fn decide(ctx: &Ctx<'_, '_>, id: ChannelId, run: &Run, pty: bool) -> (u64, Option<String>) {
    let policy = ctx.conn.policy();
    let client = ctx.client.clone();
    let newline = if pty { "\r\n" } else { "\n" };
    let tell = move |approval: u64| {
        let client = client.clone();
        let note = format!(
            "bulkhead: waiting for an admin's approval ({approval}): bulkhead approvals approve {approval}{newline}"
        );
        tokio::spawn(async move {
            let _ = client.extended_data(id, 1, note.into_bytes()).await;
        });
    };
    let (action, text, class, unjudgeable) = match run {
        Run::Sftp => {
            // The subsystem grants nothing by itself: each operation is judged.
            let request = ctx.conn.record(EventKind::request(
                "subsystem sftp",
                Some("sftp".into()),
                crate::record::RecordedVerdict::Allow,
                vec!["ssh:sftp:each-operation-judged".into()],
            ));
            return (request, None);
        }
        Run::Shell => (Action::SshShell, "shell".to_string(), "shell", None),
        Run::Exec(command) => match std::str::from_utf8(command) {
            Ok(c) if !c.contains('\0') => {
                (Action::SshExec { command: c }, c.to_string(), "exec", None)
            }
            Ok(_) => (
                Action::SshExec { command: "" },
                String::from_utf8_lossy(command).into_owned(),
                "exec",
                Some("the command contains a NUL byte (the remote shell would cut it there)"),
            ),
            Err(_) => (
                Action::SshExec { command: "" },
                String::from_utf8_lossy(command).into_owned(),
                "exec",
                Some("the command is not UTF-8"),
            ),
        },
    };
    if let Some(why) = unjudgeable {
        // Judged as what it is: a command that cannot be read as the remote shell reads it.
        let mut decision = policy.evaluate(&crate::policy::Request {
            target: ctx.conn.target.policy_ref(),
            identity: &ctx.conn.identity,
            action: Action::SshExec { command: "$" },
        });
        if decision.verdict == crate::policy::Verdict::Allow && !decision.observe_only {
            decision.verdict = crate::policy::Verdict::Deny;
            decision.decided = crate::policy::Verdict::Deny;
        }
        decision.message = Some(format!("bulkhead: {why}"));
        let d = ctx.conn.apply(decision, &text, Some(class.into())).await;
        return (d.request, d.refusal);
    }
    let d = ctx
        .conn
        .decide(
            &policy,
            Ask {
                action,
                text: &text,
                class: Some(class.into()),
                on_hold: Some(&tell),
                params: &[],
            },
        )
        .await;
    if let Some(r) = &d.refusal {
        info!(command = %text, refusal = %r, "ssh request refused");
    }
    (d.request, d.refusal)
}

/// The client is told why on stderr, and the command "exits" with [`DENIED_EXIT_STATUS`].
async fn deny(ctx: &Ctx<'_, '_>, id: ChannelId, message: &str, pty: bool) {
    let newline = if pty { "\r\n" } else { "\n" };
    let message = if message.starts_with("bulkhead:") {
        message.to_string()
    } else {
        format!("bulkhead: {message}")
    };
    let c = &ctx.client;
    let _ = c.channel_success(id).await;
    let _ = c
        .extended_data(id, 1, format!("{message}{newline}").into_bytes())
        .await;
    let _ = c.exit_status_request(id, DENIED_EXIT_STATUS).await;
    let _ = c.eof(id).await;
    let _ = c.close(id).await;
}

/// Opens the gateway's channel on the target and sends the pty request (if any) and the
/// allowed request, answering the client as the target answers. `None` when it failed (the
/// client was told and its channel closed).
async fn open_upstream(
    ctx: &Ctx<'_, '_>,
    id: ChannelId,
    run: &Run,
    pty: Option<&PtyRequest>,
    env: &[(String, String)],
    agent: bool,
    x11: Option<super::server::X11Request>,
) -> Option<Channel<client::Msg>> {
    let fail = |why: String| async move {
        let c = &ctx.client;
        let _ = c.channel_failure(id).await;
        let _ = c.close(id).await;
        ctx.conn.record(EventKind::Error { message: why });
    };
    let mut up = match ctx.upstream.channel_open_session().await {
        Ok(c) => c,
        Err(e) => {
            fail(format!("target: cannot open a channel: {e}")).await;
            return None;
        }
    };
    // What the client sent and the policy allowed, before the request as OpenSSH sends it
    // (sshd applies variables only to a command or shell started after them).
    for (name, value) in env {
        if up
            .set_env(false, name.as_str(), value.as_str())
            .await
            .is_err()
        {
            fail("target: cannot pass an environment variable".into()).await;
            return None;
        }
    }
    if agent {
        if up.agent_forward(true).await.is_ok() && answered(&mut up).await {
            ctx.agent_upstream.store(true, Ordering::Release);
        } else {
            debug!("the target refused agent forwarding");
        }
    }
    if let Some(x) = x11 {
        let asked = up
            .request_x11(true, x.single_connection, x.protocol, x.cookie, x.screen)
            .await;
        if asked.is_ok() && answered(&mut up).await {
            ctx.x11_upstream.store(true, Ordering::Release);
        } else {
            debug!("the target refused X11 forwarding");
        }
    }
    if let Some(p) = pty {
        let (cols, rows, pw, ph) = p.size;
        if up
            .request_pty(true, &p.term, cols, rows, pw, ph, &p.modes)
            .await
            .is_err()
            || !answered(&mut up).await
        {
            debug!("the target refused the pty; going on without");
        }
    }
    let sent = match run {
        Run::Exec(command) => up.exec(true, command.clone()).await,
        Run::Shell => up.request_shell(true).await,
        Run::Sftp => up.request_subsystem(true, "sftp").await,
    };
    if sent.is_err() || !answered(&mut up).await {
        fail("target: the request failed".into()).await;
        return None;
    }
    let _ = ctx.client.channel_success(id).await;
    Some(up)
}

/// Waits for the target's answer to a request sent with want_reply.
async fn answered(up: &mut Channel<client::Msg>) -> bool {
    loop {
        match up.wait().await {
            Some(ChannelMsg::Success) => return true,
            Some(ChannelMsg::Failure | ChannelMsg::Close) | None => return false,
            Some(other) => debug!(?other, "before the target's answer"),
        }
    }
}

/// Relays both directions until the target closes the channel; a summary for the record
/// (`exit 0`, `signal TERM`).
async fn relay(
    ctx: &Ctx<'_, '_>,
    client: Channel<server::Msg>,
    up: Channel<client::Msg>,
    terminal: bool,
) -> String {
    let id = client.id();
    let (from_client, to_client) = client.split();
    let (from_up, to_up) = up.split();
    let upward = client_to_target(ctx, from_client, &to_up, terminal);
    let downward = target_to_client(ctx, id, from_up, &to_client, terminal);
    tokio::pin!(upward, downward);
    let summary = tokio::select! {
        summary = &mut downward => summary,
        () = &mut upward => {
            // The client closed: the target is told and its answer still awaited (briefly).
            let _ = to_up.close().await;
            tokio::time::timeout(std::time::Duration::from_secs(5), &mut downward)
                .await
                .unwrap_or_else(|_| "closed by the client".into())
        }
    };
    let _ = to_client.close().await;
    let _ = to_up.close().await;
    summary
}

async fn client_to_target(
    ctx: &Ctx<'_, '_>,
    mut from_client: ChannelReadHalf,
    to_up: &ChannelWriteHalf<client::Msg>,
    terminal: bool,
) {
    let mut tap = Utf8Tap::default();
    let record = terminal && ctx.record_input;
    while let Some(msg) = from_client.wait().await {
        let sent = match msg {
            ChannelMsg::Data { data } => {
                ctx.bytes_up.fetch_add(data.len() as u64, Ordering::Relaxed);
                if record {
                    record_terminal(ctx, &tap.push(&data), false);
                }
                to_up.data_bytes(data).await
            }
            ChannelMsg::ExtendedData { data, ext } => {
                ctx.bytes_up.fetch_add(data.len() as u64, Ordering::Relaxed);
                to_up.extended_data_bytes(ext, data).await
            }
            ChannelMsg::Eof => to_up.eof().await,
            ChannelMsg::WindowChange {
                col_width,
                row_height,
                pix_width,
                pix_height,
            } => {
                to_up
                    .window_change(col_width, row_height, pix_width, pix_height)
                    .await
            }
            ChannelMsg::Signal { signal } => to_up.signal(signal).await,
            ChannelMsg::Close => return,
            other => {
                debug!(?other, "not relayed after the channel's request");
                Ok(())
            }
        };
        if sent.is_err() {
            return;
        }
    }
}

async fn target_to_client(
    ctx: &Ctx<'_, '_>,
    id: ChannelId,
    mut from_up: ChannelReadHalf,
    to_client: &ChannelWriteHalf<server::Msg>,
    terminal: bool,
) -> String {
    let mut tap = Utf8Tap::default();
    let mut summary = "closed without an exit status".to_string();
    while let Some(msg) = from_up.wait().await {
        let sent = match msg {
            ChannelMsg::Data { data } => {
                ctx.bytes_down
                    .fetch_add(data.len() as u64, Ordering::Relaxed);
                if terminal {
                    record_terminal(ctx, &tap.push(&data), true);
                }
                to_client.data_bytes(data).await
            }
            ChannelMsg::ExtendedData { data, ext } => {
                ctx.bytes_down
                    .fetch_add(data.len() as u64, Ordering::Relaxed);
                to_client.extended_data_bytes(ext, data).await
            }
            ChannelMsg::Eof => to_client.eof().await,
            ChannelMsg::ExitStatus { exit_status } => {
                summary = format!("exit {exit_status}");
                to_client.exit_status(exit_status).await
            }
            ChannelMsg::ExitSignal {
                signal_name,
                core_dumped,
                error_message,
                lang_tag,
            } => {
                summary = format!("signal {}", signal_label(&signal_name));
                ctx.client
                    .exit_signal_request(id, signal_name, core_dumped, error_message, lang_tag)
                    .await
                    .map_err(|()| russh::Error::SendError)
            }
            ChannelMsg::Close => break,
            other => {
                debug!(?other, "from the target, not relayed");
                Ok(())
            }
        };
        if sent.is_err() {
            break;
        }
    }
    summary
}

fn signal_label(s: &Sig) -> String {
    match s {
        Sig::Custom(name) => crate::text::terminal_safe(name),
        other => format!("{other:?}"),
    }
}

/// Appends terminal text as events of at most [`MAX_EVENT_TEXT`] bytes each.
fn record_terminal(ctx: &Ctx<'_, '_>, text: &str, output: bool) {
    let mut rest = text;
    while !rest.is_empty() {
        let mut cut = rest.len().min(MAX_EVENT_TEXT);
        while !rest.is_char_boundary(cut) {
            cut -= 1;
        }
        let (piece, tail) = rest.split_at(cut);
        rest = tail;
        let data = piece.to_string();
        ctx.conn.record(if output {
            EventKind::TerminalOutput { data }
        } else {
            EventKind::TerminalInput { data }
        });
    }
}
