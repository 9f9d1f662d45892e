//! A session's login: the client's startup (TLS from the local CA, GSS encryption declined,
//! CancelRequest), its startup parameters judged as the `SET` statements they amount to, the
//! gateway's own login upstream with the held credentials, and the client's greeting.

use crate::conn_log::{info, warn};
use bytes::Bytes;
use tokio::{
    io::{AsyncWrite, AsyncWriteExt as _, BufWriter, ReadHalf, WriteHalf},
    net::TcpStream,
};

use super::{
    cancel::{self, CancelKey, CancelKeys},
    catalog,
    codec::{self, FrameReader, Startup, StartupPacket},
    ended, relay, send_fatal,
    settings::PostgresTarget,
    startup, upstream, Shared, Stream,
};
use crate::{
    config::Target,
    credentials::CredentialRef,
    net::OrigDstAddr,
    policy::{self, Action},
    proxy::session::{Ask, Conn, Gateway},
    record::{EventKind, Outcome, SessionEnd},
};

/// The client's side after startup: its reader, what it asked for, and whether it took TLS.
pub struct Started {
    pub reader: FrameReader<Stream>,
    pub startup: Startup,
    pub tls: bool,
}

/// Startup: TLS is accepted with a certificate from the local CA for the address the client
/// dialled, GSS encryption is declined, a CancelRequest is mapped to the target's own key.
/// `Err` is how the session ended when no StartupMessage came.
pub async fn start(
    conn: &Conn<'_>,
    shared: &Shared,
    client: TcpStream,
) -> Result<Started, SessionEnd> {
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
                return Err(ended(
                    0,
                    0,
                    cancel::cancel(conn, &shared.cancels, (pid, secret)).await,
                ));
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

/// A logged-in session, ready to relay.
pub struct LoggedIn {
    /// The client's side, split: the reader keeps what it buffered.
    pub client: FrameReader<ReadHalf<Stream>>,
    pub to_client: BufWriter<WriteHalf<Stream>>,
    pub upstream: upstream::Upstream,
    /// How the session logged in upstream (side connections log in the same way).
    pub login: catalog::Login,
    /// The cancel key the client was given, to forget when the session ends.
    pub cancel_key: Option<CancelKey>,
    /// Bytes of the greeting sent to the client.
    pub greeted: u64,
}

/// Logs in upstream as the target's configuration says for the client's `started` startup
/// and greets the client. `Err` is how the session ended when it could not.
pub async fn log_in(
    conn: &Conn<'_>,
    shared: &Shared,
    target: &Target,
    pg: &PostgresTarget,
    started: Started,
) -> Result<LoggedIn, SessionEnd> {
    // From here on each direction has its own half; the reader keeps what it buffered.
    let (client, to_client) = started.reader.map_io(tokio::io::split);
    let mut to_client = BufWriter::with_capacity(relay::WRITE_BUFFER, to_client);
    let (upstream, login) = upstream_login(
        conn,
        target,
        pg,
        &started.startup,
        started.tls,
        &mut to_client,
    )
    .await?;
    let (cancel_key, greeted) = greet(
        conn,
        &shared.cancels,
        &mut to_client,
        &upstream.greeting,
        upstream.backend_key,
    )
    .await?;
    Ok(LoggedIn {
        client,
        to_client,
        upstream,
        login,
        cancel_key,
        greeted,
    })
}

/// Judges the client's startup and logs in upstream as the target's `postgres.map` (else its
/// defaults) says; refusals and failures are told to the client on `cwriter`.
async fn upstream_login<W: AsyncWrite + Unpin>(
    conn: &Conn<'_>,
    target: &Target,
    pg: &PostgresTarget,
    startup: &Startup,
    tls: bool,
    cwriter: &mut W,
) -> Result<(upstream::Upstream, catalog::Login), SessionEnd> {
    let destination = conn.destination;
    let end = |up: u64, down: u64, outcome: Outcome| Err(ended(up, down, outcome));
    let client_user = startup.get("user").unwrap_or("").to_string();
    let client_db = startup.get("database").unwrap_or(&client_user).to_string();
    conn.record(EventKind::Auth {
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
        send_fatal(cwriter, "42501", &format!("bulkhead: {message}")).await;
        return end(0, 0, Outcome::Refused { reason: message });
    }

    // The held credentials go only to addresses the target names as sockets (or opts in).
    if let Some(message) = upstream::network_refusal(target, pg, destination) {
        return Err(refuse_login(conn, cwriter, message).await);
    }
    // Whom to log in as upstream: the target's `postgres.map`, else its defaults. A client the
    // map does not cover is refused (fail closed).
    let Some(login) = pg.login(target.credentials.as_ref(), &client_user, &client_db) else {
        let message = format!(
            "no upstream login is mapped for user \"{client_user}\" and database \"{client_db}\" on target {}",
            target.name
        );
        return Err(refuse_login(conn, cwriter, message).await);
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
                cwriter,
                "28000",
                "bulkhead: the gateway cannot read this target's credentials",
            )
            .await;
            return end(0, 0, Outcome::UpstreamFailed { error: e });
        }
    };
    // A session whose rules allow nothing that writes is opened read-only at the server, which
    // then refuses what the gateway cannot see (a view or a default calling a volatile
    // function); turning it off is judged as a write (`policy/sql_settings.rs`). The client's
    // own values of it are dropped; startup parameters are applied after `options`, in order.
    let read_only = !conn
        .policy()
        .may_write(conn.target.policy_ref(), &conn.identity);
    let mut extra: Vec<(String, String)> = startup.params.clone();
    if read_only {
        extra.retain(|(k, _)| {
            !k.eq_ignore_ascii_case("default_transaction_read_only")
                && !k.eq_ignore_ascii_case("transaction_read_only")
        });
        extra.push(("default_transaction_read_only".into(), "on".into()));
    }
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
            conn.record(EventKind::Auth {
                side: "upstream".into(),
                user: Some(format!("{user}@{database}")),
                method: login_method(&e.recorded_method(), login.mapping),
                ok: false,
            });
            let message = format!("bulkhead: target {}: {e}", target.name);
            send_fatal(cwriter, e.sqlstate(), &message).await;
            return end(0, 0, e.outcome(&target.name));
        }
    };
    conn.record(EventKind::Auth {
        side: "upstream".into(),
        user: Some(format!("{user}@{database}")),
        method: login_method(
            &format!(
                "{}{}{}",
                up.method,
                if up.tls { " over TLS" } else { "" },
                if read_only {
                    ", read-only (server-enforced: the rules allow no writes)"
                } else {
                    ""
                }
            ),
            login.mapping,
        ),
        ok: true,
    });
    info!(user = %client_user, upstream_user = %user, database = %database, method = %up.method, "postgres session started");
    let login = catalog::Login {
        addr: destination,
        pg: pg.clone(),
        user,
        database,
        password,
    };
    Ok((up, login))
}

/// Refuses a client's login before the gateway logs in upstream: an `error` event, then
/// FATAL 28000 with `message`; the session's outcome is `refused`.
async fn refuse_login<W: AsyncWrite + Unpin>(
    conn: &Conn<'_>,
    cwriter: &mut W,
    message: String,
) -> SessionEnd {
    conn.record(EventKind::Error {
        message: message.clone(),
    });
    send_fatal(cwriter, "28000", &format!("bulkhead: {message}")).await;
    ended(0, 0, Outcome::Refused { reason: message })
}

/// The client's greeting: authenticated (by its kernel identity), the target's parameters
/// (its ParameterStatus frames), a cancel key of the gateway's own for the target's, ready.
/// Returns the key and the bytes sent.
async fn greet<W: AsyncWrite + Unpin>(
    conn: &Conn<'_>,
    cancels: &CancelKeys,
    to_client: &mut W,
    parameters: &[Bytes],
    backend_key: Option<CancelKey>,
) -> Result<(Option<CancelKey>, u64), SessionEnd> {
    let ours = backend_key.map(|k| cancels.issue(conn.destination, k));
    let mut greeting = Vec::with_capacity(parameters.len() + 3);
    greeting.push(codec::authentication_ok());
    greeting.extend(parameters.iter().cloned());
    if let Some((pid, secret)) = ours {
        greeting.push(codec::backend_key_data(pid, secret));
    }
    greeting.push(codec::ready_for_query(b'I'));
    let mut sent = 0u64;
    let written: std::io::Result<()> = async {
        for g in &greeting {
            sent += g.len() as u64;
            to_client.write_all(g).await?;
        }
        to_client.flush().await
    }
    .await;
    if written.is_err() {
        if let Some(k) = ours {
            cancels.forget(k);
        }
        return Err(ended(0, sent, Outcome::Closed));
    }
    Ok((ours, sent))
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
                    class: classification.headline().map(|c| c.name().into()),
                    on_hold: None,
                    params: &[],
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

/// The upstream login's method as recorded, naming the `postgres.map` entry that chose it.
fn login_method(method: &str, mapping: Option<usize>) -> String {
    match mapping {
        Some(i) => format!("{method}, postgres.map[{i}]"),
        None => method.to_string(),
    }
}
