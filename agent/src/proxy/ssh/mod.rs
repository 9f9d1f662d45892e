//! The SSH gateway: accept → identify → decide → forward → record, per channel request.
//!
//! The governed client is answered by the gateway itself (russh server) with a host
//! certificate from the gateway's SSH CA ([`ca`]); it is authenticated by its kernel identity
//! (the connection was already decided by policy), whatever it offers (`none`, any key, any
//! password: nothing is looked at or passed on). The gateway connects to the target itself,
//! verifies its host key against the target's `known_hosts` before the client may log in, and
//! logs in with the held credential as the configured or mapped user ([`upstream`]).
//!
//! Each session channel's request is judged before anything of it reaches the target
//! ([`channel`]): `exec` by its command line (`Action::SshExec`), a shell as a whole
//! (`Action::SshShell`); `env`, agent, X11 and port forwarding are refused unless a rule
//! names them ([`tunnel`]); subsystems other than sftp are refused; all are recorded. A denied command gets the policy's message on stderr and exit status
//! [`DENIED_EXIT_STATUS`].

pub mod ca;
mod channel;
pub mod pool;
mod server;
pub mod settings;
pub mod sftp;
mod sftp_relay;
mod tap;
pub mod trust;
mod tunnel;
mod upstream;

use std::{
    collections::{HashMap, HashSet},
    future::Future,
    pin::Pin,
    sync::{
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use crate::conn_log::{debug, info, warn};
use futures::stream::{FuturesUnordered, StreamExt as _};
use tokio::{
    net::TcpStream,
    sync::{mpsc, watch},
};

use self::{
    ca::SshCa,
    server::{ClientSide, FromClient},
    upstream::{FromTarget, HostKeyOutcome, Upstream},
};
use super::session::Conn;
use crate::{
    config::TargetKind,
    record::{now_micros, EventKind, Outcome, RecordedVerdict, SessionEnd},
};

/// How long a client has to log in (OpenSSH's `LoginGraceTime` is 120 s).
const LOGIN_GRACE: Duration = Duration::from_mins(2);

/// The exit status of a command the policy denied (as a shell's "found but cannot run").
pub const DENIED_EXIT_STATUS: u32 = 126;

/// The SSH gateway's state shared by all its sessions.
#[derive(Default)]
pub struct Shared {
    /// `None` when the CA could not be loaded or created: SSH sessions are refused.
    pub ca: Option<Arc<SshCa>>,
    /// Warm upstream connections ([`pool`]).
    pub pool: pool::Pool,
}

impl Shared {
    /// Loads (or creates, on first start) the SSH CA under `state_dir` and writes what
    /// governed OpenSSH clients trust it by under `run_dir` ([`trust::write`]); a failure is
    /// logged and SSH sessions are then refused.
    pub fn load(state_dir: &std::path::Path, run_dir: &std::path::Path) -> Self {
        match SshCa::load_or_create(&ca::dir(state_dir)) {
            Ok(ca) => {
                info!(ca = %ca.ca_fingerprint(), "SSH CA ready");
                if let Err(e) = trust::write(run_dir, &ca.known_hosts_line()) {
                    warn!(error = %e, "cannot write the SSH client trust files; `bulkhead run` clients will not trust the gateway's host certificate");
                }
                Self {
                    ca: Some(Arc::new(ca)),
                    pool: pool::Pool::default(),
                }
            }
            Err(e) => {
                warn!(error = %e, "no SSH CA: SSH targets are refused");
                Self {
                    ca: None,
                    pool: pool::Pool::default(),
                }
            }
        }
    }
}

fn ended(up: u64, down: u64, outcome: Outcome) -> SessionEnd {
    SessionEnd {
        ended_at_us: now_micros(),
        bytes_to_target: up,
        bytes_from_target: down,
        outcome,
    }
}

/// Refuses a connection the policy denied: closed before the SSH handshake (an SSH client
/// reports the connection closed by the remote host).
pub fn refuse(client: TcpStream, reason: String) -> SessionEnd {
    drop(client);
    ended(0, 0, Outcome::Refused { reason })
}

fn server_config(ca: &SshCa) -> Arc<russh::server::Config> {
    Arc::new(russh::server::Config {
        keys: vec![ca.host_key.clone()],
        certificates: vec![ca.host_certificate.clone()],
        methods: server::methods(),
        auth_rejection_time: Duration::from_millis(0),
        auth_rejection_time_initial: Some(Duration::from_millis(0)),
        max_auth_attempts: 6,
        inactivity_timeout: None,
        keepalive_interval: Some(Duration::from_secs(30)),
        keepalive_max: 3,
        nodelay: true,
        ..russh::server::Config::default()
    })
}

/// What every channel of a logged-in session shares.
pub struct Ctx<'c, 'g> {
    pub conn: &'c Conn<'g>,
    pub client: russh::server::Handle,
    pub upstream: &'c russh::client::Handle<upstream::TargetSide>,
    pub record_input: bool,
    pub bytes_up: AtomicU64,
    pub bytes_down: AtomicU64,
    /// Allowed `env` variables per session channel, sent upstream before its request.
    pub env: Mutex<HashMap<russh::ChannelId, Vec<(String, String)>>>,
    /// Session channels whose agent forwarding was allowed.
    pub agent: Mutex<HashSet<russh::ChannelId>>,
    /// The target agreed to forward the agent: its agent channels are relayed to the client.
    pub agent_upstream: AtomicBool,
    /// Session channels whose X11 forwarding was allowed, with the client's request.
    pub x11: Mutex<HashMap<russh::ChannelId, server::X11Request>>,
    /// The target agreed to forward X11: its X11 channels are relayed to the client.
    pub x11_upstream: AtomicBool,
    /// Listens on the target (`ssh -R`, as asked: address, bound port), with the rules that
    /// allowed them.
    pub listens: Mutex<HashMap<(String, u32), Vec<String>>>,
}

impl<'c, 'g> Ctx<'c, 'g> {
    fn new(
        conn: &'c Conn<'g>,
        client: russh::server::Handle,
        upstream: &'c russh::client::Handle<upstream::TargetSide>,
        record_input: bool,
    ) -> Self {
        Self {
            conn,
            client,
            upstream,
            record_input,
            bytes_up: AtomicU64::new(0),
            bytes_down: AtomicU64::new(0),
            env: Mutex::default(),
            agent: Mutex::default(),
            agent_upstream: AtomicBool::new(false),
            x11: Mutex::default(),
            x11_upstream: AtomicBool::new(false),
            listens: Mutex::default(),
        }
    }
}

/// A channel's task, polled by the session task.
type ChannelTask<'a> = Pin<Box<dyn Future<Output = ()> + Send + 'a>>;

/// Serves one SSH session on an accepted, identified connection that the policy let through.
pub async fn serve(conn: &Conn<'_>, shared: &Shared, client: TcpStream) -> SessionEnd {
    let failed = |error: &str| {
        ended(
            0,
            0,
            Outcome::Failed {
                error: error.into(),
            },
        )
    };
    let Some(target) = conn.target.target else {
        return failed("an SSH session needs a configured target");
    };
    let TargetKind::Ssh(ssh) = &target.kind else {
        return failed("not an SSH target");
    };
    let Some(ca) = shared.ca.as_deref() else {
        return failed("the gateway has no SSH CA (see the daemon's log)");
    };
    let _ = client.set_nodelay(true);
    let started = Instant::now();
    let addr = conn.destination.0;

    // A warm connection waiting for this target means the session needs no connection of its
    // own before the client logs in (it takes one for the client's login then).
    let warm = ssh.pool > 0 && shared.pool.has_warm(&target.name, addr, ssh);
    let (banner_tx, banner_rx) = watch::channel(None);
    let (to_session, mut from_client) = mpsc::channel(8);
    let open_channels = Arc::new(AtomicUsize::new(0));
    let handler = ClientSide {
        to_session,
        banner: banner_rx,
        open_channels: Arc::clone(&open_channels),
    };
    // Otherwise the target's connection, key exchange and host key check run while the
    // client's key exchange does.
    let (fresh, running) = tokio::join!(
        connect_unless_warm(conn, &target.name, ssh, warm, &banner_tx, started),
        russh::server::run_stream(server_config(ca), client, handler)
    );
    let running = match running {
        Ok(r) => r,
        Err(e) => {
            if let Some((u, _)) = fresh.upstream {
                pool::drop_connection(u);
            }
            return failed(&format!("client: SSH handshake: {e}"));
        }
    };
    let client_handle = running.handle();
    tokio::pin!(running);

    let (upstream, mut from_target) = match authenticate(
        conn,
        shared,
        ssh,
        target,
        running.as_mut(),
        &mut from_client,
        fresh,
    )
    .await
    {
        Ok(u) => u,
        Err(end) => {
            // The client's side runs in russh's own task: end it too.
            let _ = client_handle
                .disconnect(
                    russh::Disconnect::ByApplication,
                    "bulkhead: session ended".into(),
                    String::new(),
                )
                .await;
            return end;
        }
    };
    debug!(ms = started.elapsed().as_millis(), "SSH: client logged in");

    let ctx = Ctx::new(conn, client_handle, &upstream.handle, ssh.record_input);
    let mut channels: FuturesUnordered<ChannelTask<'_>> = FuturesUnordered::new();
    let end = loop {
        tokio::select! {
            end = &mut running => break end,
            event = from_client.recv() => {
                if let Some(event) = event {
                    on_client(&ctx, &mut channels, event).await;
                }
            },
            Some(event) = from_target.recv() => on_target(&ctx, &mut channels, &open_channels, event),
            Some(()) = channels.next(), if !channels.is_empty() => {
                open_channels.fetch_sub(1, Ordering::AcqRel);
            }
        }
    };
    drop(channels);
    finish(&ctx, &upstream, &mut from_client, end).await
}

/// Records what the client's handler refused last, disconnects the target and says how the
/// session ended.
async fn finish(
    ctx: &Ctx<'_, '_>,
    upstream: &Upstream,
    from_client: &mut mpsc::Receiver<FromClient>,
    end: Result<(), russh::Error>,
) -> SessionEnd {
    let conn = ctx.conn;
    // The handler queues what it refused before it reads the client's next message, so a
    // refusal the client disconnected right after is waiting here: record it too.
    while let Ok(event) = from_client.try_recv() {
        if let FromClient::Refused(what) = event {
            record_refused(conn, &what);
        }
    }
    let _ = upstream
        .handle
        .disconnect(russh::Disconnect::ByApplication, "", "")
        .await;
    let outcome = match end {
        Ok(()) => Outcome::Closed,
        Err(e) => Outcome::Failed {
            error: format!("client: {e}"),
        },
    };
    ended(
        ctx.bytes_up.load(Ordering::Relaxed),
        ctx.bytes_down.load(Ordering::Relaxed),
        outcome,
    )
}

/// What the client's handler hands over once the client is logged in.
async fn on_client<'a>(
    ctx: &'a Ctx<'_, '_>,
    channels: &mut FuturesUnordered<ChannelTask<'a>>,
    event: FromClient,
) {
    match event {
        FromClient::Session(ch) => channels.push(Box::pin(channel::serve(ctx, ch))),
        FromClient::DirectTcpip {
            channel,
            host,
            port,
            originator,
            reply,
        } => channels.push(Box::pin(tunnel::direct(
            ctx, channel, host, port, originator, reply,
        ))),
        // The handler waits for these answers (in order with the client's next requests), so
        // they are decided here at once; none can be held.
        FromClient::Env {
            channel,
            name,
            value,
            reply,
        } => {
            let _ = reply.send(tunnel::env(ctx, channel, &name, value).await);
        }
        FromClient::Agent { channel, reply } => {
            let _ = reply.send(tunnel::agent(ctx, channel).await);
        }
        FromClient::X11 {
            channel,
            request,
            reply,
        } => {
            let _ = reply.send(tunnel::x11(ctx, channel, request).await);
        }
        FromClient::RemoteForward {
            address,
            port,
            reply,
        } => {
            let _ = reply.send(tunnel::remote_forward(ctx, &address, port).await);
        }
        FromClient::CancelRemoteForward {
            address,
            port,
            reply,
        } => {
            let _ = reply.send(tunnel::cancel_remote_forward(ctx, &address, port).await);
        }
        FromClient::Refused(what) => record_refused(ctx.conn, &what),
        FromClient::Auth { reply, .. } => {
            let _ = reply.send(false);
        }
    }
}

/// A channel the target opens (for an allowed `-R` or `-A`), counted with the client's.
fn on_target<'a>(
    ctx: &'a Ctx<'_, '_>,
    channels: &mut FuturesUnordered<ChannelTask<'a>>,
    open_channels: &AtomicUsize,
    event: FromTarget,
) {
    if open_channels.fetch_add(1, Ordering::AcqRel) >= server::MAX_CHANNELS {
        // Dropping the event rejects the target's channel.
        open_channels.fetch_sub(1, Ordering::AcqRel);
        record_refused(
            ctx.conn,
            &format!(
                "target channel beyond {} open at once",
                server::MAX_CHANNELS
            ),
        );
        return;
    }
    channels.push(match event {
        FromTarget::Forwarded {
            channel,
            listen,
            originator,
            reply,
        } => Box::pin(tunnel::forwarded(ctx, channel, listen, originator, reply)),
        FromTarget::Agent { channel, reply } => {
            Box::pin(tunnel::agent_channel(ctx, channel, reply))
        }
        FromTarget::X11 {
            channel,
            originator,
            reply,
        } => Box::pin(tunnel::x11_channel(ctx, channel, originator, reply)),
    });
}

/// Connects to the target and verifies its host key: the connection, or why not (recorded).
async fn connect_target(
    conn: &Conn<'_>,
    name: &str,
    ssh: &settings::SshTarget,
    to_session: mpsc::Sender<FromTarget>,
) -> (Option<Upstream>, Option<String>) {
    match upstream::connect(name, ssh, conn.destination.0, to_session).await {
        Ok(u) => {
            record_pinned(conn, &u);
            (Some(u), None)
        }
        Err((message, _)) => {
            warn!(%message, "target not verified");
            conn.record(EventKind::Error {
                message: message.clone(),
            });
            (None, Some(message))
        }
    }
}

/// The session's own connection to the target, unless a warm one is waiting (`warm`); the
/// client's login waits for its outcome on `banner` (a key that does not verify refuses it,
/// with the reason as its authentication banner).
async fn connect_unless_warm(
    conn: &Conn<'_>,
    name: &str,
    ssh: &settings::SshTarget,
    warm: bool,
    banner: &watch::Sender<Option<Result<(), String>>>,
    started: Instant,
) -> Fresh {
    if warm {
        banner.send_replace(Some(Ok(())));
        return Fresh::default();
    }
    let (to_session, from_target) = mpsc::channel(8);
    let (upstream, refusal) = connect_target(conn, name, ssh, to_session).await;
    debug!(
        ms = started.elapsed().as_millis(),
        ok = upstream.is_some(),
        "SSH: target connected and verified"
    );
    banner.send_replace(Some(refusal.clone().map_or(Ok(()), Err)));
    Fresh {
        upstream: upstream.map(|u| (u, from_target)),
        refusal,
    }
}

/// The session's own connection to the target, made while the client's key exchange ran:
/// none when a warm one was waiting. `refusal`: why every login is refused.
#[derive(Default)]
struct Fresh {
    upstream: Option<(Upstream, mpsc::Receiver<FromTarget>)>,
    refusal: Option<String>,
}

/// Authentication: the client is logged in when the gateway is, upstream, for its user. `Err`
/// is how the session ended when the client never was.
async fn authenticate(
    conn: &Conn<'_>,
    shared: &Shared,
    ssh: &settings::SshTarget,
    target: &crate::config::Target,
    mut running: std::pin::Pin<&mut russh::server::RunningSession<ClientSide>>,
    from_client: &mut mpsc::Receiver<FromClient>,
    mut fresh: Fresh,
) -> Result<(Upstream, mpsc::Receiver<FromTarget>), SessionEnd> {
    let deadline = tokio::time::sleep(LOGIN_GRACE);
    tokio::pin!(deadline);
    let result = loop {
        tokio::select! {
            () = &mut deadline => {
                break Err(ended(0, 0, Outcome::Failed {
                    error: format!("client: not logged in within {LOGIN_GRACE:?}"),
                }));
            }
            end = &mut running => {
                let outcome = match (end, fresh.refusal.take()) {
                    (_, Some(reason)) => Outcome::Refused { reason },
                    (Ok(()), None) => Outcome::Closed,
                    (Err(e), None) => Outcome::Failed { error: format!("client: {e}") },
                };
                break Err(ended(0, 0, outcome));
            }
            event = from_client.recv() => match event {
                Some(FromClient::Auth { user, method, reply }) => {
                    let logged_in = log_in(conn, shared, ssh, target, &mut fresh, &user, method).await;
                    let _ = reply.send(logged_in.is_some());
                    if let Some(u) = logged_in {
                        break Ok(u);
                    }
                }
                Some(FromClient::Refused(what)) => record_refused(conn, &what),
                // Nothing else comes before a login (a reply dropped is a refusal).
                Some(_) | None => {}
            }
        }
    };
    // A connection of the session's own that a warm one made unnecessary.
    if let Some((u, _)) = fresh.upstream.take() {
        pool::drop_connection(u);
    }
    result
}

/// The client asks to log in as `user`: the gateway logs in upstream with the held credential
/// of the login the target maps `user` to, or takes a warm connection logged in so. Recorded
/// either way; a failure refuses the client.
async fn log_in(
    conn: &Conn<'_>,
    shared: &Shared,
    ssh: &settings::SshTarget,
    target: &crate::config::Target,
    fresh: &mut Fresh,
    user: &str,
    method: &'static str,
) -> Option<(Upstream, mpsc::Receiver<FromTarget>)> {
    if fresh.refusal.is_some() {
        return None;
    }
    conn.record(EventKind::Auth {
        side: "client".into(),
        user: Some(user.into()),
        method: format!("{method} (accepted by identity; nothing passed upstream)"),
        ok: true,
    });
    let Some(login) = ssh.login(target.credentials.as_ref(), user) else {
        let reason = format!(
            "no login of target {} for client user {user:?}",
            target.name
        );
        conn.record(EventKind::Auth {
            side: "target".into(),
            user: None,
            method: reason.clone(),
            ok: false,
        });
        fresh.refusal = Some(reason);
        return None;
    };
    let how = match login.credential {
        settings::SshCredential::Key(_) => "publickey (held key)",
        settings::SshCredential::Password(_) => "password (held)",
    };
    let key =
        (ssh.pool > 0).then(|| pool::PoolKey::new(&target.name, conn.destination.0, ssh, &login));
    if let Some(taken) = key.as_ref().and_then(|k| shared.pool.take(k)) {
        record_pinned(conn, &taken.upstream);
        conn.record(EventKind::Auth {
            side: "target".into(),
            user: Some(login.user.clone()),
            method: format!(
                "{how}; {POOLED} (logged in {} ms before)",
                taken.age.as_millis()
            ),
            ok: true,
        });
        return Some((taken.upstream, taken.from_target));
    }
    let (mut upstream, from_target) = if let Some(u) = fresh.upstream.take() {
        u
    } else {
        // A warm connection was expected and was not there (taken, closed or stale).
        let (to_session, from_target) = mpsc::channel(8);
        let (upstream, refusal) = connect_target(conn, &target.name, ssh, to_session).await;
        let Some(u) = upstream else {
            fresh.refusal = refusal;
            return None;
        };
        (u, from_target)
    };
    match upstream::log_in(&mut upstream, &login).await {
        Ok(()) => {
            conn.record(EventKind::Auth {
                side: "target".into(),
                user: Some(login.user.clone()),
                method: how.into(),
                ok: true,
            });
            // The key is used: keep one warm for the next session.
            if let Some(k) = key {
                shared.pool.fill(k);
            }
            Some((upstream, from_target))
        }
        Err(e) => {
            warn!(error = %e, "upstream login failed");
            conn.record(EventKind::Auth {
                side: "target".into(),
                user: Some(login.user.clone()),
                method: format!("{how}: {e}"),
                ok: false,
            });
            fresh.refusal = Some(e);
            None
        }
    }
}

/// How the record names a login made on a warm connection.
pub const POOLED: &str = "warm pooled connection";

/// Records a host key pinned on first use by this connection.
fn record_pinned(conn: &Conn<'_>, upstream: &Upstream) {
    if let HostKeyOutcome::Learned { fingerprint } = &upstream.outcome {
        conn.record(EventKind::Auth {
            side: "target".into(),
            user: None,
            method: format!("host key pinned on first use: {fingerprint}"),
            ok: true,
        });
    }
}

/// A tunnel or request refused by the gateway, recorded as a denied request.
fn record_refused(conn: &Conn<'_>, what: &str) {
    info!(what, "refused");
    conn.record(EventKind::request(
        what,
        Some("forward".into()),
        RecordedVerdict::Deny,
        vec![REFUSED_RULE.into()],
    ));
}

/// The rule named for what the SSH gateway refuses by itself (unix-socket forwarding, channels
/// it did not ask for, subsystems other than sftp).
pub const REFUSED_RULE: &str = "ssh:gateway:refused";
