//! Forwarding a rule allows: `env` variables and agent forwarding for a session channel,
//! direct-tcpip channels (`ssh -L`, `-D`, `-W`, `-J`) opened on the target, listens on the
//! target (`ssh -R`) whose connections come back to the client, and the target's agent
//! channels relayed to the client's agent. Each is judged by the policy's `ssh` section
//! (`Action::SshForward`, `Action::SshEnv`) and recorded, and each tunnel's bytes and close too.
//!
//! Nothing here opens a socket on the host: a direct-tcpip channel is opened by the target
//! (it reaches what the target reaches), and what the target sends back (`-R`, `-A`) goes to
//! the governed client over its own SSH session, so anything the client then connects to
//! locally is a new, captured connection of the governed process.

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        PoisonError,
    },
    time::Instant,
};

use crate::conn_log::{debug, info};
use russh::{
    client, server, Channel, ChannelId, ChannelMsg, ChannelOpenFailure, ChannelReadHalf,
    ChannelWriteHalf,
};

use super::Ctx;
use crate::{
    policy::{Action, SshForward},
    proxy::session::Ask,
    record::{EventKind, RecordedVerdict},
    text::terminal_safe,
};

/// The record's class for every forwarding request.
pub const FORWARD_CLASS: &str = "forward";
/// Variables kept per session channel, and listens per connection.
const MAX_ENV: usize = 64;
const MAX_LISTENS: usize = 16;

fn host_port(host: &str, port: u32) -> String {
    format!("{}:{port}", terminal_safe(host))
}

/// Judges a request that cannot be held (the client waits for the answer in order with its
/// other requests): approve refuses it. Whether it is allowed, and the rules behind that.
async fn judge_at_once(ctx: &Ctx<'_, '_>, action: Action<'_>, text: &str) -> (bool, Vec<String>) {
    let policy = ctx.conn.policy();
    let d = ctx
        .conn
        .decide_at_once(
            &policy,
            Ask {
                action,
                text,
                class: Some(FORWARD_CLASS.into()),
                on_hold: None,
                params: &[],
            },
        )
        .await;
    if let Some(r) = &d.refusal {
        info!(request = %text, refusal = %r, "ssh forwarding refused");
    }
    (d.forward(), d.decision.rules)
}

/// An `env` request on session channel `channel`: kept for its request upstream if allowed.
pub async fn env(ctx: &Ctx<'_, '_>, channel: ChannelId, name: &str, value: String) -> bool {
    let text = format!("env {}", terminal_safe(name));
    let (allowed, _) = judge_at_once(ctx, Action::SshEnv { name }, &text).await;
    if !allowed {
        return false;
    }
    let mut env = ctx.env.lock().unwrap_or_else(PoisonError::into_inner);
    if env.len() >= super::server::MAX_CHANNELS && !env.contains_key(&channel) {
        return false;
    }
    let vars = env.entry(channel).or_default();
    if vars.len() >= MAX_ENV {
        return false;
    }
    vars.push((name.to_string(), value));
    true
}

/// Agent or X11 forwarding, which name no host: whether the policy allows it (recorded).
async fn judge_forwarding(ctx: &Ctx<'_, '_>, kind: SshForward, text: &str) -> bool {
    let action = Action::SshForward {
        kind,
        host: "",
        port: 0,
    };
    judge_at_once(ctx, action, text).await.0
}

/// An agent forwarding request on session channel `channel`: asked of the target with the
/// channel's request if allowed.
pub async fn agent(ctx: &Ctx<'_, '_>, channel: ChannelId) -> bool {
    if !judge_forwarding(ctx, SshForward::Agent, "agent forwarding").await {
        return false;
    }
    let mut agent = ctx.agent.lock().unwrap_or_else(PoisonError::into_inner);
    agent.contains(&channel) || (agent.len() < super::server::MAX_CHANNELS && agent.insert(channel))
}

/// `ssh -X` / `-Y` on session channel `channel`: kept for its request upstream if allowed.
pub async fn x11(
    ctx: &Ctx<'_, '_>,
    channel: ChannelId,
    request: super::server::X11Request,
) -> bool {
    if !judge_forwarding(ctx, SshForward::X11, "x11 forwarding").await {
        return false;
    }
    let mut x11 = ctx.x11.lock().unwrap_or_else(PoisonError::into_inner);
    if x11.len() >= super::server::MAX_CHANNELS && !x11.contains_key(&channel) {
        return false;
    }
    x11.insert(channel, request);
    true
}

/// `ssh -R address:port`: asked of the target if allowed; the port it listens on.
pub async fn remote_forward(ctx: &Ctx<'_, '_>, address: &str, port: u32) -> Option<u32> {
    let text = format!("tcpip-forward {}", host_port(address, port));
    if ctx
        .listens
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .len()
        >= MAX_LISTENS
    {
        record_refused(ctx, &format!("{text} beyond {MAX_LISTENS} listens"));
        return None;
    }
    let action = Action::SshForward {
        kind: SshForward::Remote,
        host: address,
        port,
    };
    let (allowed, rules) = judge_at_once(ctx, action, &text).await;
    if !allowed {
        return None;
    }
    match ctx.upstream.tcpip_forward(address, port).await {
        Ok(bound) => {
            let bound = if port == 0 { bound } else { port };
            ctx.listens
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert((address.to_string(), bound), rules);
            Some(bound)
        }
        Err(e) => {
            ctx.conn.record(EventKind::Error {
                message: format!("target: {text}: {e}"),
            });
            None
        }
    }
}

/// `ssh -O cancel -R` (`cancel-tcpip-forward`): only a listen this session made is cancelled
/// on the target; recorded either way.
pub async fn cancel_remote_forward(ctx: &Ctx<'_, '_>, address: &str, port: u32) -> bool {
    let text = format!("cancel-tcpip-forward {}", host_port(address, port));
    let rules = ctx
        .listens
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .remove(&(address.to_string(), port));
    let Some(rules) = rules else {
        record_refused(ctx, &format!("{text}: no such listen"));
        return false;
    };
    ctx.conn.record(EventKind::request(
        &text,
        Some(FORWARD_CLASS.into()),
        RecordedVerdict::Allow,
        rules,
    ));
    match ctx.upstream.cancel_tcpip_forward(address, port).await {
        Ok(()) => true,
        Err(e) => {
            ctx.conn.record(EventKind::Error {
                message: format!("target: {text}: {e}"),
            });
            false
        }
    }
}

fn record_refused(ctx: &Ctx<'_, '_>, what: &str) {
    ctx.conn.record(EventKind::request(
        what,
        Some(FORWARD_CLASS.into()),
        RecordedVerdict::Deny,
        vec![super::REFUSED_RULE.into()],
    ));
}

/// A direct-tcpip channel: judged (an approve rule holds it, the client waiting for the
/// channel to open), then opened on the target and relayed.
pub async fn direct(
    ctx: &Ctx<'_, '_>,
    channel: Channel<server::Msg>,
    host: String,
    port: u32,
    originator: (String, u32),
    reply: server::ChannelOpenHandle,
) {
    let text = format!("direct-tcpip {}", host_port(&host, port));
    let policy = ctx.conn.policy();
    let d = ctx
        .conn
        .decide(
            &policy,
            Ask {
                action: Action::SshForward {
                    kind: SshForward::Local,
                    host: &host,
                    port,
                },
                text: &text,
                class: Some(FORWARD_CLASS.into()),
                on_hold: None,
                params: &[],
            },
        )
        .await;
    if let Some(r) = &d.refusal {
        info!(request = %text, refusal = %r, "ssh forwarding refused");
        reply
            .reject(ChannelOpenFailure::AdministrativelyProhibited)
            .await;
        return;
    }
    let started = Instant::now();
    let up = match ctx
        .upstream
        .channel_open_direct_tcpip(host, port, originator.0, originator.1)
        .await
    {
        Ok(up) => up,
        Err(e) => {
            reply.reject(ChannelOpenFailure::ConnectFailed).await;
            record_end(ctx, d.request, started, None, Some(format!("target: {e}")));
            return;
        }
    };
    reply.accept().await;
    let bytes = relay(ctx, channel, up).await;
    record_end(ctx, d.request, started, Some(bytes), None);
}

/// A connection the target accepted on an allowed listen (`ssh -R`): relayed to the client.
pub async fn forwarded(
    ctx: &Ctx<'_, '_>,
    up: Channel<client::Msg>,
    listen: (String, u32),
    originator: (String, u32),
    reply: client::ChannelOpenHandle,
) {
    let text = format!(
        "forwarded-tcpip {} from {}",
        host_port(&listen.0, listen.1),
        host_port(&originator.0, originator.1)
    );
    let rules = ctx
        .listens
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .get(&listen)
        .cloned();
    let Some(rules) = rules else {
        // Not a listen the gateway asked for.
        reply
            .reject(ChannelOpenFailure::AdministrativelyProhibited)
            .await;
        record_refused(ctx, &text);
        return;
    };
    let request = ctx.conn.record(EventKind::request(
        &text,
        Some(FORWARD_CLASS.into()),
        RecordedVerdict::Allow,
        rules,
    ));
    let started = Instant::now();
    match ctx
        .client
        .channel_open_forwarded_tcpip(listen.0, listen.1, originator.0, originator.1)
        .await
    {
        Ok(client) => {
            reply.accept().await;
            let bytes = relay(ctx, client, up).await;
            record_end(ctx, request, started, Some(bytes), None);
        }
        Err(e) => {
            reply.reject(ChannelOpenFailure::ConnectFailed).await;
            record_end(ctx, request, started, None, Some(format!("client: {e}")));
        }
    }
}

/// An agent channel the target opened: relayed to the client's agent when agent forwarding
/// was allowed and asked of the target on this connection.
pub async fn agent_channel(
    ctx: &Ctx<'_, '_>,
    up: Channel<client::Msg>,
    reply: client::ChannelOpenHandle,
) {
    let asked = ctx.agent_upstream.load(Ordering::Acquire);
    let open = ctx.client.channel_open_agent();
    to_client(
        ctx,
        up,
        reply,
        ("auth-agent channel", "ssh:agent-forwarding-allowed"),
        asked,
        open,
    )
    .await;
}

/// An X11 channel the target opened: relayed to the client's display when X11 forwarding was
/// allowed and asked of the target on this connection.
pub async fn x11_channel(
    ctx: &Ctx<'_, '_>,
    up: Channel<client::Msg>,
    originator: (String, u32),
    reply: client::ChannelOpenHandle,
) {
    let asked = ctx.x11_upstream.load(Ordering::Acquire);
    let open = ctx.client.channel_open_x11(originator.0, originator.1);
    to_client(
        ctx,
        up,
        reply,
        ("x11 channel", "ssh:x11-forwarding-allowed"),
        asked,
        open,
    )
    .await;
}

/// A channel the target opened toward a service on the client's side (its agent, its
/// display): refused unless the gateway `asked` for it on this connection, else opened toward
/// the client by `open` and relayed; recorded as (`text`, `rule`).
async fn to_client(
    ctx: &Ctx<'_, '_>,
    up: Channel<client::Msg>,
    reply: client::ChannelOpenHandle,
    (text, rule): (&str, &str),
    asked: bool,
    open: impl std::future::Future<Output = Result<Channel<server::Msg>, russh::Error>>,
) {
    if !asked {
        reply
            .reject(ChannelOpenFailure::AdministrativelyProhibited)
            .await;
        record_refused(ctx, text);
        return;
    }
    let request = ctx.conn.record(EventKind::request(
        text,
        Some(FORWARD_CLASS.into()),
        RecordedVerdict::Allow,
        vec![rule.into()],
    ));
    let started = Instant::now();
    match open.await {
        Ok(client) => {
            reply.accept().await;
            let bytes = relay(ctx, client, up).await;
            record_end(ctx, request, started, Some(bytes), None);
        }
        Err(e) => {
            reply.reject(ChannelOpenFailure::ConnectFailed).await;
            record_end(ctx, request, started, None, Some(format!("client: {e}")));
        }
    }
}

fn record_end(
    ctx: &Ctx<'_, '_>,
    request: u64,
    started: Instant,
    bytes: Option<(u64, u64)>,
    error: Option<String>,
) {
    ctx.conn.record(EventKind::Response {
        request,
        duration_us: u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
        summary: bytes.map(|(up, down)| format!("{up} bytes to target, {down} from target")),
        error,
        masked_rows: None,
        mask_rules: Vec::new(),
    });
}

/// Relays a tunnel both ways until either side closes it: (bytes to the target, bytes from it).
/// A side that sent CLOSE takes nothing more, and everything it sent before was passed on in
/// order, so the first close ends both directions.
async fn relay(
    ctx: &Ctx<'_, '_>,
    client: Channel<server::Msg>,
    up: Channel<client::Msg>,
) -> (u64, u64) {
    let (from_client, to_client) = client.split();
    let (from_up, to_up) = up.split();
    let (up_bytes, down_bytes) = (AtomicU64::new(0), AtomicU64::new(0));
    tokio::select! {
        () = pump(from_client, &to_up, [&up_bytes, &ctx.bytes_up]) => {}
        () = pump(from_up, &to_client, [&down_bytes, &ctx.bytes_down]) => {}
    }
    let _ = to_client.close().await;
    let _ = to_up.close().await;
    (up_bytes.into_inner(), down_bytes.into_inner())
}

/// One direction: data and EOF passed on (the buffers themselves, no copy) until the channel
/// closes, the bytes counted as they pass (the tunnel's, and the session's: a session that
/// ends with the tunnel open still counts them).
async fn pump<S>(mut from: ChannelReadHalf, to: &ChannelWriteHalf<S>, counts: [&AtomicU64; 2])
where
    S: From<(ChannelId, ChannelMsg)> + Send + Sync + 'static,
{
    while let Some(msg) = from.wait().await {
        let sent = match msg {
            ChannelMsg::Data { data } => {
                for c in counts {
                    c.fetch_add(data.len() as u64, Ordering::Relaxed);
                }
                to.data_bytes(data).await
            }
            ChannelMsg::Eof => to.eof().await,
            ChannelMsg::Close => break,
            other => {
                debug!(?other, "not relayed on a tunnel");
                Ok(())
            }
        };
        if sent.is_err() {
            break;
        }
    }
}
