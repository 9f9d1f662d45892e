//! The PostgreSQL gateway: accept → identify → decide → forward → record, per statement.
//!
//! The client is answered by the gateway itself at startup (it never authenticates to the
//! target and never sees the held password); the gateway logs in upstream, then relays frames,
//! deciding each simple Query and each Parse before it is forwarded.
//!
//! A denied statement is not answered by the gateway out of band, which could overtake the
//! target's answers to earlier pipelined messages. It is replaced, in place, by a statement
//! that cannot parse and carries a nonce (`BULKHEAD_DENIED_<n>`): the target rejects it at
//! parse time, executing nothing, and produces its ErrorResponse exactly where the denied
//! statement's answer belongs, with exactly the transaction effects a real error has (failed
//! transaction block, skip to Sync in extended mode). On the way back the gateway swaps that
//! error for SQLSTATE 42501 and the policy's message.

mod catalog;
pub mod codec;
mod columns;
mod copy_out;
pub mod settings;
mod startup;
mod upstream;

pub use self::catalog::Catalogs;

use std::{
    collections::{HashMap, VecDeque},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, PoisonError,
    },
    time::Instant,
};

use bytes::Bytes;
use tokio::{
    io::{AsyncWrite, AsyncWriteExt as _, BufWriter},
    net::TcpStream,
};
use tracing::{debug, info, warn};

use self::codec::{CodecError, FrameReader, Startup, StartupPacket};
use super::session::{Ask, Conn, Gateway};
use crate::{
    config::TargetKind,
    credentials::CredentialRef,
    net::OrigDstAddr,
    policy::{self, Action, PreparedStatements},
    record::{now_micros, EventKind, Outcome, RecordedVerdict, SessionEnd},
};

/// The prefix of the statement that stands in for a denied one.
const DENIED_MARK: &str = "BULKHEAD_DENIED_";

/// The PostgreSQL gateway's state shared by all its sessions.
#[derive(Default)]
pub struct Shared {
    /// Cancel keys handed to clients.
    pub cancels: CancelKeys,
    /// Column identities read from targets' catalogs, for column mask rules.
    pub catalogs: Catalogs,
}

/// Cancel keys the gateway handed to clients, mapped to the target's own.
#[derive(Default)]
pub struct CancelKeys {
    map: Mutex<HashMap<(i32, i32), (OrigDstAddr, i32, i32)>>,
}

impl CancelKeys {
    fn issue(&self, upstream: OrigDstAddr, key: (i32, i32)) -> (i32, i32) {
        let mut map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            let ours = (random_i32(), random_i32());
            if ours.0 > 0 && !map.contains_key(&ours) {
                map.insert(ours, (upstream, key.0, key.1));
                return ours;
            }
        }
    }

    fn lookup(&self, ours: (i32, i32)) -> Option<(OrigDstAddr, i32, i32)> {
        self.map
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&ours)
            .copied()
    }

    fn forget(&self, ours: (i32, i32)) {
        self.map
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&ours);
    }
}

fn random_i32() -> i32 {
    // A failing system RNG leaves a predictable key; cancel keys are not a security boundary
    // (the target's own key stays with the gateway), so fall back rather than refuse service.
    getrandom::u32().map_or_else(
        |_| i32::try_from(now_micros() & 0x7fff_ffff).unwrap_or(1),
        |v| (v >> 1) as i32,
    )
}

#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("client: {0}")]
    Client(CodecError),
    #[error("target: {0}")]
    Target(CodecError),
    #[error("client: unexpected message {0:?}")]
    UnexpectedFrontend(char),
}

/// The mask rules that apply to a statement's results (empty: none).
type Masks = Arc<[Arc<policy::MaskRule>]>;

/// What the server-side loop must do with answers, in the order the client sent requests.
enum Pending {
    /// A simple Query: completes at ReadyForQuery.
    Query {
        request: u64,
        started: Instant,
        tags: Vec<String>,
        error: Option<String>,
        masks: Masks,
    },
    /// An Execute: completes at CommandComplete / ErrorResponse / PortalSuspended / EmptyQuery.
    Execute {
        request: u64,
        started: Instant,
        masks: Masks,
    },
    /// A Sync: executes still queued at its ReadyForQuery were skipped after an error.
    Sync,
}

/// State shared by the two directions of one session.
struct SessionState {
    pending: Mutex<VecDeque<Pending>>,
    /// Nonce → the policy's message, for denied statements in flight.
    denied: Mutex<HashMap<u64, String>>,
    /// Which result columns are which, for column mask rules.
    columns: columns::Tracker,
    /// Results complete but not yet recorded: recorded after the answers are flushed to the
    /// client, off the statement's latency.
    finished: Mutex<Vec<EventKind>>,
}

/// Either leg's byte stream: a plain socket or TLS over it.
pub trait ByteStream: tokio::io::AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + AsyncWrite + Unpin + Send> ByteStream for T {}
pub type Stream = Box<dyn ByteStream>;

/// Sends a FATAL error the client can read (the connection ends after it); a client already
/// gone is not an error.
async fn send_fatal<W: AsyncWrite + Unpin>(w: &mut W, sqlstate: &str, message: &str) {
    let _ = w.write_all(&codec::fatal_response(sqlstate, message)).await;
    let _ = w.flush().await;
}

/// Ends a connection during startup with a FATAL error the client can read.
async fn refuse_startup(stream: &mut Stream, sqlstate: &str, message: &str) -> std::io::Result<()> {
    stream
        .write_all(&codec::fatal_response(
            sqlstate,
            &format!("bulkhead: {message}"),
        ))
        .await?;
    stream.flush().await
}

/// Answers an SSLRequest with `S` and runs the TLS handshake, presenting a leaf from the
/// local CA for the address the client dialled.
async fn accept_tls(
    gw: &Gateway,
    mut stream: Stream,
    dialled: OrigDstAddr,
) -> Result<Stream, String> {
    let ca = gw.tls.as_ref().ok_or("no local CA")?;
    let config = ca
        .server_config(dialled.0.ip(), &[])
        .map_err(|e| e.to_string())?;
    stream.write_all(b"S").await.map_err(|e| e.to_string())?;
    stream.flush().await.map_err(|e| e.to_string())?;
    let tls = tokio_rustls::TlsAcceptor::from(config)
        .accept(stream)
        .await
        .map_err(|e| e.to_string())?;
    Ok(Box::new(tls))
}

fn ended(up: u64, down: u64, outcome: Outcome) -> SessionEnd {
    SessionEnd {
        ended_at_us: now_micros(),
        bytes_to_target: up,
        bytes_from_target: down,
        outcome,
    }
}

/// The client's side after startup: its reader, what it asked for, and whether it took TLS.
struct Started {
    reader: FrameReader<Stream>,
    startup: Startup,
    tls: bool,
}

/// Startup: TLS is accepted with a certificate from the local CA for the address the client
/// dialled, GSS encryption is declined, a CancelRequest is mapped to the target's own key.
/// `Err` is how the session ended when no StartupMessage came.
async fn start(conn: &Conn<'_>, client: TcpStream) -> Result<Started, SessionEnd> {
    let _ = client.set_nodelay(true);
    let gw = conn.gw;
    let mut creader: FrameReader<Stream> =
        FrameReader::new(Box::new(client), "client", codec::MAX_FRONTEND);
    let mut tls = false;
    loop {
        let packet = match creader.startup().await {
            Ok(Some(p)) => p,
            Ok(None) => return Err(ended(0, 0, Outcome::Closed)),
            Err(e) => {
                let _ = refuse_startup(creader.get_mut(), "08P01", &e.to_string()).await;
                return Err(ended(
                    0,
                    0,
                    Outcome::Failed {
                        error: format!("client startup: {e}"),
                    },
                ));
            }
        };
        match codec::parse_startup(&packet) {
            Ok(StartupPacket::Ssl) if !tls && gw.tls.is_some() => {
                // Bytes after the SSLRequest would be read as if they came through TLS
                // (CVE-2021-23222): refuse.
                if creader.buffered() > 0 {
                    let _ =
                        refuse_startup(creader.get_mut(), "08P01", "data after SSLRequest").await;
                    return Err(ended(
                        0,
                        0,
                        Outcome::Failed {
                            error: "client sent data after SSLRequest".into(),
                        },
                    ));
                }
                match accept_tls(gw, creader.into_inner(), conn.destination).await {
                    Ok(stream) => {
                        creader = FrameReader::new(stream, "client", codec::MAX_FRONTEND);
                        tls = true;
                    }
                    Err(e) => {
                        return Err(ended(
                            0,
                            0,
                            Outcome::Failed {
                                error: format!("client TLS: {e}"),
                            },
                        ))
                    }
                }
            }
            Ok(StartupPacket::Ssl | StartupPacket::GssEnc) => {
                let w = creader.get_mut();
                if w.write_all(b"N").await.and(w.flush().await).is_err() {
                    return Err(ended(0, 0, Outcome::Closed));
                }
            }
            Ok(StartupPacket::Cancel { pid, secret }) => {
                return Err(ended(0, 0, cancel(conn, (pid, secret)).await));
            }
            Ok(StartupPacket::Startup(startup)) => {
                return Ok(Started {
                    reader: creader,
                    startup,
                    tls,
                })
            }
            Err(e) => {
                let _ = refuse_startup(creader.get_mut(), "08P01", &e.to_string()).await;
                return Err(ended(
                    0,
                    0,
                    Outcome::Failed {
                        error: format!("client startup: {e}"),
                    },
                ));
            }
        }
    }
}

/// Refuses a connection the policy denied, in the protocol: the client's startup is read (TLS
/// accepted as usual) and answered with FATAL 42501 and the policy's message. Nothing reaches
/// the target.
pub async fn refuse(conn: &Conn<'_>, client: TcpStream, message: &str) -> SessionEnd {
    let reason = message.to_string();
    if let Ok(mut started) = start(conn, client).await {
        let message = if message.starts_with("bulkhead:") {
            message.to_string()
        } else {
            format!("bulkhead: {message}")
        };
        send_fatal(started.reader.get_mut(), "42501", &message).await;
    }
    ended(0, 0, Outcome::Refused { reason })
}

/// Serves one PostgreSQL session on an accepted, identified connection that the policy let
/// through.
pub async fn serve(conn: &Conn<'_>, client: TcpStream) -> SessionEnd {
    let gw = conn.gw;
    let destination = conn.destination;
    let Some(target) = conn.target.target else {
        return ended(
            0,
            0,
            Outcome::Failed {
                error: "a PostgreSQL session needs a configured target".into(),
            },
        );
    };
    let end = ended;
    let mut down_bytes = 0u64;
    let Started {
        reader: creader,
        startup,
        tls,
    } = match start(conn, client).await {
        Ok(s) => s,
        Err(end) => return end,
    };
    // From here on each direction has its own half; the reader keeps what it buffered.
    let (mut creader, cw) = creader.map_io(tokio::io::split);
    let mut cwriter = BufWriter::with_capacity(64 * 1024, cw);

    let client_user = startup.get("user").unwrap_or("").to_string();
    let client_db = startup.get("database").unwrap_or(&client_user).to_string();
    let TargetKind::Postgres(pg) = &target.kind else {
        return end(
            0,
            0,
            Outcome::Failed {
                error: "not a PostgreSQL target".into(),
            },
        );
    };
    let record = |kind: EventKind| {
        conn.record(kind);
    };
    record(EventKind::Auth {
        side: "client".into(),
        user: Some(client_user.clone()),
        method: format!(
            "kernel identity (database {client_db}{})",
            if tls { ", TLS" } else { "" }
        ),
        ok: true,
    });

    // Startup parameters are settings the target applies at login: each is judged as the SET
    // it amounts to. Plain session state passes; anything else (a role, a setting that changes
    // how SQL is read, what cannot be classified) needs the policy's allow.
    if let Err(message) = judge_startup_settings(conn, &startup.params).await {
        send_fatal(&mut cwriter, "42501", &format!("bulkhead: {message}")).await;
        return end(0, 0, Outcome::Refused { reason: message });
    }

    // The held credentials go only to addresses the target names as sockets (or opts in).
    if let Some(message) = upstream::network_refusal(target, pg, destination) {
        record(EventKind::Error {
            message: message.clone(),
        });
        send_fatal(&mut cwriter, "28000", &format!("bulkhead: {message}")).await;
        return end(0, 0, Outcome::Refused { reason: message });
    }
    // Whom to log in as upstream: the target's `postgres.map`, else its defaults. A client the
    // map does not cover is refused (fail closed).
    let Some(login) = pg.login(target.credentials.as_ref(), &client_user, &client_db) else {
        let message = format!(
            "no upstream login is mapped for user \"{client_user}\" and database \"{client_db}\" on target {}",
            target.name
        );
        record(EventKind::Error {
            message: message.clone(),
        });
        send_fatal(&mut cwriter, "28000", &format!("bulkhead: {message}")).await;
        return end(0, 0, Outcome::Refused { reason: message });
    };
    let (user, database) = (login.user.clone(), login.database.clone());
    let password = match login
        .credentials
        .map(CredentialRef::read_secret)
        .transpose()
    {
        Ok(p) => p,
        Err(e) => {
            warn!(error = %e, "cannot read the target's credentials");
            send_fatal(
                &mut cwriter,
                "28000",
                "bulkhead: the gateway cannot read this target's credentials",
            )
            .await;
            return end(0, 0, Outcome::UpstreamFailed { error: e });
        }
    };
    let extra: Vec<(String, String)> = startup.params.clone();
    let up = match upstream::login(
        destination,
        pg,
        &user,
        &database,
        &extra,
        password.as_deref(),
    )
    .await
    {
        Ok(u) => u,
        Err(e) => {
            record(EventKind::Auth {
                side: "upstream".into(),
                user: Some(format!("{user}@{database}")),
                method: login_method(&e.recorded_method(), login.mapping),
                ok: false,
            });
            let message = format!("bulkhead: target {}: {e}", target.name);
            send_fatal(&mut cwriter, e.sqlstate(), &message).await;
            return end(0, 0, e.outcome(&target.name));
        }
    };
    record(EventKind::Auth {
        side: "upstream".into(),
        user: Some(format!("{user}@{database}")),
        method: login_method(
            &if up.tls {
                format!("{} over TLS", up.method)
            } else {
                up.method.to_string()
            },
            login.mapping,
        ),
        ok: true,
    });
    info!(user = %client_user, upstream_user = %user, database = %database, method = %up.method, "postgres session started");

    // The client's greeting: authenticated (by its kernel identity), the target's parameters,
    // a cancel key of the gateway's own, ready.
    let ours = up
        .backend_key
        .map(|k| gw.postgres.cancels.issue(destination, k));
    let mut greeting = Vec::with_capacity(up.greeting.len() + 3);
    greeting.push(codec::authentication_ok());
    greeting.extend(up.greeting.iter().cloned());
    if let Some((pid, secret)) = ours {
        greeting.push(codec::backend_key_data(pid, secret));
    }
    greeting.push(codec::ready_for_query(b'I'));
    for g in &greeting {
        down_bytes += g.len() as u64;
        if cwriter.write_all(g).await.is_err() {
            return end(0, down_bytes, Outcome::Closed);
        }
    }
    if cwriter.flush().await.is_err() {
        return end(0, down_bytes, Outcome::Closed);
    }

    let shared = SessionState {
        pending: Mutex::new(VecDeque::new()),
        denied: Mutex::new(HashMap::new()),
        finished: Mutex::new(Vec::new()),
        columns: columns::Tracker::new(
            columns::policy_has_column_rules(&conn.policy()),
            catalog::Login {
                addr: destination,
                pg: pg.clone(),
                user: user.clone(),
                database: database.clone(),
                password: password.clone(),
            },
        ),
    };
    let upstream::Upstream {
        reader: mut ureader,
        writer: uw,
        ..
    } = up;
    let mut uwriter = BufWriter::with_capacity(64 * 1024, uw);
    let up_count = AtomicU64::new(0);
    let down_count = AtomicU64::new(down_bytes);
    let ctx = Ctx {
        conn,
        gw,
        shared: &shared,
    };

    let result = {
        let client_side = ctx.client_to_target(&mut creader, &mut uwriter, &up_count);
        let target_side = ctx.target_to_client(&mut ureader, &mut cwriter, &down_count);
        tokio::pin!(client_side, target_side);
        tokio::select! {
            r = &mut client_side => {
                // The client is done and the target was told (Terminate): let its last
                // answers through.
                match tokio::time::timeout(std::time::Duration::from_secs(5), &mut target_side).await {
                    Ok(t) => r.and(t),
                    Err(_) => r,
                }
            }
            r = &mut target_side => r,
        }
    };
    ctx.record_finished();
    if let Err(e @ (SessionError::Client(_) | SessionError::UnexpectedFrontend(_))) = &result {
        // A malformed message ends this session only, with a protocol error the client can
        // read.
        send_fatal(&mut cwriter, "08P01", &format!("bulkhead: {e}")).await;
    }
    if let Some(k) = ours {
        gw.postgres.cancels.forget(k);
    }
    let up_bytes = up_count.load(Ordering::Relaxed);
    down_bytes = down_count.load(Ordering::Relaxed);
    let outcome = match result {
        Ok(()) => Outcome::Closed,
        Err(e) => {
            debug!(error = %e, "postgres session ended with an error");
            Outcome::Failed {
                error: e.to_string(),
            }
        }
    };
    end(up_bytes, down_bytes, outcome)
}

struct Ctx<'a> {
    conn: &'a Conn<'a>,
    gw: &'a Gateway,
    shared: &'a SessionState,
}

/// The gateway's verdict on one statement, as applied.
struct Applied {
    forward: bool,
    message: String,
    /// Masks for the results; none in observe mode, which never changes what flows.
    masks: Masks,
}

impl Ctx<'_> {
    fn record(&self, kind: EventKind) -> u64 {
        self.conn.record(kind)
    }

    /// Classifies `sql`, then decides it through the session pipeline (recorded before
    /// anything is forwarded; held for approval; observe mode), and says whether to forward it.
    async fn decide(
        &self,
        sql: &str,
        prepared: &mut PreparedStatements,
        statement: Option<&str>,
    ) -> (Applied, u64) {
        let policy = self.conn.policy();
        let classification = policy.cache().classify(sql, Some(prepared));
        self.shared
            .columns
            .decided(&self.gw.postgres.catalogs, &classification);
        for (name, what) in &classification.prepared {
            prepared.insert(name, Arc::clone(what));
        }
        if let Some(name) = statement.filter(|n| !n.is_empty()) {
            prepared.insert(name, Arc::clone(&classification));
        }
        let decided = self
            .conn
            .decide(
                &policy,
                Ask {
                    action: Action::SqlClassified(&classification),
                    text: sql,
                    class: classification.headline().map(|c| c.name().to_string()),
                },
            )
            .await;
        let decision = &decided.decision;
        // Observe mode never changes what flows: its masks are recorded, not applied.
        let masks: Masks = if decision.observe_only || decision.masks.is_empty() {
            Arc::from([])
        } else {
            decision.masks.iter().cloned().collect()
        };
        let applied = match decided.refusal {
            None => Applied {
                forward: true,
                message: String::new(),
                masks,
            },
            Some(message) => Applied {
                forward: false,
                message,
                masks: Arc::from([]),
            },
        };
        (applied, decided.request)
    }

    /// A stand-in that the target rejects at parse time, remembered with `message`.
    fn denied_standin(&self, message: String) -> String {
        // Every message the client sees from the gateway says it came from the gateway.
        let message = if message.starts_with("bulkhead:") {
            message
        } else {
            format!("bulkhead: {message}")
        };
        let nonce = getrandom::u64().unwrap_or_else(|_| now_micros());
        self.shared
            .denied
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(nonce, message);
        format!("{DENIED_MARK}{nonce}")
    }

    fn push(&self, p: Pending) {
        self.shared
            .pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push_back(p);
    }

    async fn client_to_target<R, W>(
        &self,
        reader: &mut FrameReader<R>,
        writer: &mut BufWriter<W>,
        count: &AtomicU64,
    ) -> Result<(), SessionError>
    where
        R: tokio::io::AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let mut prepared = PreparedStatements::default();
        // Portal → statement, so an Execute can be attributed to its Parse's request.
        let mut portals: HashMap<String, (u64, Masks)> = HashMap::new();
        let mut statements: HashMap<String, (u64, Masks)> = HashMap::new();
        loop {
            if !reader.has_frame() {
                writer
                    .flush()
                    .await
                    .map_err(|e| SessionError::Target(e.into()))?;
            }
            let Some(frame) = reader.next().await.map_err(SessionError::Client)? else {
                // The client went away without saying goodbye: end the target's session too.
                let x = codec::terminate();
                writer
                    .write_all(&x)
                    .await
                    .map_err(|e| SessionError::Target(e.into()))?;
                writer
                    .flush()
                    .await
                    .map_err(|e| SessionError::Target(e.into()))?;
                return Ok(());
            };
            let mut out: Bytes = frame.raw.clone();
            match frame.tag {
                b'Q' => {
                    let sql = codec::query_text(&frame.body).map_err(SessionError::Client)?;
                    let (applied, request) = self.decide(sql, &mut prepared, None).await;
                    if !applied.forward {
                        out = codec::query(&self.denied_standin(applied.message));
                    }
                    self.shared.columns.query(self.gw, sql, &applied.masks);
                    self.push(Pending::Query {
                        request,
                        started: Instant::now(),
                        tags: Vec::new(),
                        error: None,
                        masks: applied.masks,
                    });
                }
                b'P' => {
                    let (name, sql) =
                        codec::parse_message(&frame.body).map_err(SessionError::Client)?;
                    let name = name.to_string();
                    let (applied, request) = self.decide(sql, &mut prepared, Some(&name)).await;
                    if !applied.forward {
                        out = codec::parse(&name, &self.denied_standin(applied.message));
                    }
                    self.shared
                        .columns
                        .parse(self.gw, &name, sql, &applied.masks);
                    statements.insert(name, (request, applied.masks));
                }
                b'B' => {
                    let (portal, statement) =
                        codec::bind_names(&frame.body).map_err(SessionError::Client)?;
                    let entry = statements
                        .get(statement)
                        .cloned()
                        .unwrap_or_else(|| (0, Arc::from([])));
                    portals.insert(portal.to_string(), entry);
                }
                b'E' => {
                    let portal =
                        codec::execute_portal(&frame.body).map_err(SessionError::Client)?;
                    let (request, masks) = portals
                        .get(portal)
                        .cloned()
                        .unwrap_or_else(|| (0, Arc::from([])));
                    self.push(Pending::Execute {
                        request,
                        started: Instant::now(),
                        masks,
                    });
                }
                b'S' => self.push(Pending::Sync),
                b'C' => {
                    let (kind, name) =
                        codec::close_target(&frame.body).map_err(SessionError::Client)?;
                    if kind == b'S' {
                        prepared.remove(name);
                        statements.remove(name);
                    } else {
                        portals.remove(name);
                    }
                }
                b'F' => {
                    // Fastpath function calls name functions by OID: nothing to judge them by.
                    let request = self.record(EventKind::request(
                        "fastpath function call",
                        Some("unknown".into()),
                        RecordedVerdict::Deny,
                        Vec::new(),
                    ));
                    out = codec::query(&self.denied_standin(
                        "fastpath function calls are not allowed through the gateway".into(),
                    ));
                    self.shared.columns.query(self.gw, "", &Arc::from([]));
                    self.push(Pending::Query {
                        request,
                        started: Instant::now(),
                        tags: Vec::new(),
                        error: None,
                        masks: Arc::from([]),
                    });
                }
                b'D' | b'H' | b'd' | b'c' | b'f' => {}
                b'X' => {
                    writer
                        .write_all(&out)
                        .await
                        .map_err(|e| SessionError::Target(e.into()))?;
                    writer
                        .flush()
                        .await
                        .map_err(|e| SessionError::Target(e.into()))?;
                    count.fetch_add(out.len() as u64, Ordering::Relaxed);
                    return Ok(());
                }
                other => return Err(SessionError::UnexpectedFrontend(char::from(other))),
            }
            self.shared.columns.frontend(frame.tag, &frame.body);
            count.fetch_add(out.len() as u64, Ordering::Relaxed);
            writer
                .write_all(&out)
                .await
                .map_err(|e| SessionError::Target(e.into()))?;
        }
    }

    async fn target_to_client<R, W>(
        &self,
        reader: &mut FrameReader<R>,
        writer: &mut BufWriter<W>,
        count: &AtomicU64,
    ) -> Result<(), SessionError>
    where
        R: tokio::io::AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let mut results = columns::Results::new(
            &self.shared.columns,
            &self.gw.postgres.catalogs,
            self.gw.store.as_ref(),
            self.conn.session,
        );
        loop {
            if !reader.has_frame() {
                writer
                    .flush()
                    .await
                    .map_err(|e| SessionError::Client(e.into()))?;
                self.record_finished();
            }
            let Some(frame) = reader.next().await.map_err(SessionError::Target)? else {
                return Ok(());
            };
            results.observe(frame.tag, &frame.body, || self.front_masks().is_some());
            let mut out = frame.raw.clone();
            match frame.tag {
                b'E' => {
                    let fields = codec::error_fields(&frame.body);
                    let message = fields
                        .iter()
                        .find(|(c, _)| *c == b'M')
                        .map(|(_, m)| m.as_str())
                        .unwrap_or("");
                    let denied = self.take_denied(message);
                    let error = match &denied {
                        Some(policy_message) => {
                            out = codec::error_response("42501", policy_message);
                            format!("denied: {policy_message}")
                        }
                        None => message.to_string(),
                    };
                    self.complete_one(None, Some(error));
                }
                b'D' | b'd' => {
                    if let Some(masked) = self
                        .mask(&mut results, frame.tag, &frame.body)
                        .await
                        .map_err(SessionError::Target)?
                    {
                        out = masked;
                    }
                }
                b'C' => self.complete_one(Some(codec::command_tag(&frame.body).to_string()), None),
                b's' => self.complete_one(Some("portal suspended".into()), None),
                b'I' => self.complete_one(Some("empty query".into()), None),
                b'Z' => self.complete_sync(),
                _ => {}
            }
            count.fetch_add(out.len() as u64, Ordering::Relaxed);
            writer
                .write_all(&out)
                .await
                .map_err(|e| SessionError::Client(e.into()))?;
        }
    }

    /// The masks of the request whose answers are arriving, if it has any.
    fn front_masks(&self) -> Option<(columns::Front, Masks)> {
        let pending = self
            .shared
            .pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match pending.front() {
            Some(Pending::Query { masks, .. }) if !masks.is_empty() => {
                Some((columns::Front::Query, Arc::clone(masks)))
            }
            Some(Pending::Execute { masks, .. }) if !masks.is_empty() => {
                Some((columns::Front::Execute, Arc::clone(masks)))
            }
            _ => None,
        }
    }

    /// A DataRow or COPY OUT line with masked values, if the current statement has masks and
    /// anything matched: by column rule for the fields whose real column a rule names, by
    /// the value detectors for every other field, whatever its alias (`columns.rs`).
    async fn mask(
        &self,
        results: &mut columns::Results<'_>,
        tag: u8,
        body: &[u8],
    ) -> Result<Option<Bytes>, CodecError> {
        let Some((front, masks)) = self.front_masks() else {
            return Ok(None);
        };
        results.mask(front, &masks, tag, body).await
    }

    /// The policy message for a stand-in's parse error, if `message` is one.
    fn take_denied(&self, message: &str) -> Option<String> {
        let at = message.find(DENIED_MARK)?;
        let digits: String = message[at + DENIED_MARK.len()..]
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        let nonce: u64 = digits.parse().ok()?;
        self.shared
            .denied
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&nonce)
    }

    /// A CommandComplete / ErrorResponse / PortalSuspended / EmptyQuery answer.
    fn complete_one(&self, tag: Option<String>, error: Option<String>) {
        let mut pending = self
            .shared
            .pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match pending.front_mut() {
            Some(Pending::Query { tags, error: e, .. }) => {
                tags.extend(tag);
                if error.is_some() {
                    *e = error;
                }
            }
            Some(Pending::Execute { .. }) => {
                if let Some(Pending::Execute {
                    request, started, ..
                }) = pending.pop_front()
                {
                    drop(pending);
                    self.result(request, started, tag.into_iter().collect(), error);
                }
            }
            // Answers to Parse/Bind errors before any Execute, or outside any tracked request.
            Some(Pending::Sync) | None => {}
        }
    }

    /// ReadyForQuery: the front Query is done, or everything up to the Sync is.
    fn complete_sync(&self) {
        let mut done = Vec::new();
        {
            let mut pending = self
                .shared
                .pending
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            match pending.front() {
                Some(Pending::Query { .. }) => done.extend(pending.pop_front()),
                _ => {
                    while let Some(p) = pending.pop_front() {
                        if matches!(p, Pending::Sync) {
                            break;
                        }
                        done.push(p);
                    }
                }
            }
        }
        for p in done {
            match p {
                Pending::Query {
                    request,
                    started,
                    tags,
                    error,
                    ..
                } => self.result(request, started, tags, error),
                Pending::Execute {
                    request, started, ..
                } => {
                    self.result(
                        request,
                        started,
                        Vec::new(),
                        Some("not executed: an earlier message failed".into()),
                    );
                }
                Pending::Sync => {}
            }
        }
    }

    /// A request's result, recorded once its answers are on their way to the client.
    fn result(&self, request: u64, started: Instant, tags: Vec<String>, error: Option<String>) {
        let duration_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        let rows: u64 = tags
            .iter()
            .filter_map(|t| t.rsplit(' ').next()?.parse::<u64>().ok())
            .sum();
        let summary = match tags.as_slice() {
            [] => None,
            [one] => Some(format!("{one} ({rows} rows)")),
            many => Some(format!("{} ({rows} rows)", many.join("; "))),
        };
        self.shared
            .finished
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(EventKind::Response {
                request,
                duration_us,
                summary,
                error,
            });
    }

    /// Records the results completed so far.
    fn record_finished(&self) {
        let finished = std::mem::take(
            &mut *self
                .shared
                .finished
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        );
        for kind in finished {
            self.record(kind);
        }
    }
}

/// Judges the startup parameters as `SET` statements (see [`startup`]); the refusal message if
/// one is not allowed.
async fn judge_startup_settings(
    conn: &Conn<'_>,
    params: &[(String, String)],
) -> Result<(), String> {
    let statements = startup::settings(params).inspect_err(|e| {
        conn.record(EventKind::Error { message: e.clone() });
    })?;
    let policy = conn.policy();
    for text in statements {
        let classification = policy.cache().classify(&text, None);
        if classification.headline() == Some(policy::SqlClass::Session)
            && classification.classes.len() == 1
        {
            continue;
        }
        // An approval cannot be waited for during login: only an allow lets it through.
        let decided = conn
            .decide_at_once(
                &policy,
                Ask {
                    action: Action::SqlClassified(&classification),
                    text: &format!("startup parameter: {text}"),
                    class: classification.headline().map(|c| c.name().to_string()),
                },
            )
            .await;
        if let Some(why) = decided.refusal {
            return Err(format!(
                "startup setting `{text}` refused: {why} (a statement that needs approval must be run after connecting)"
            ));
        }
    }
    Ok(())
}

/// Maps a client's CancelRequest to the target's own key and forwards it.
async fn cancel(conn: &Conn<'_>, key: (i32, i32)) -> Outcome {
    let Some((addr, pid, secret)) = conn.gw.postgres.cancels.lookup(key) else {
        // Unknown keys are ignored, as PostgreSQL does: no oracle for guessing keys.
        return Outcome::Refused {
            reason: "cancel request with an unknown key".into(),
        };
    };
    conn.record(EventKind::request(
        "cancel request",
        Some("cancel".into()),
        RecordedVerdict::Allow,
        Vec::new(),
    ));
    match upstream::cancel(addr, pid, secret).await {
        Ok(()) => Outcome::Closed,
        Err(e) => Outcome::UpstreamFailed {
            error: e.to_string(),
        },
    }
}

/// The upstream login's method as recorded, naming the `postgres.map` entry that chose it.
fn login_method(method: &str, mapping: Option<usize>) -> String {
    match mapping {
        Some(i) => format!("{method}, postgres.map[{i}]"),
        None => method.to_string(),
    }
}
