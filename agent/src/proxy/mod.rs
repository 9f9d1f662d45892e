//! The gateway's accept loop and the session pipeline every protocol shares.
//!
//! Every redirected connection goes through the same steps, in [`handle`]: identify (the
//! kernel's record and `/proc`), resolve the target (a configured one, or the destination's
//! address for one no target names), open the session, decide the connection itself (identity
//! gates; a `tcp` target's rules and default), then hand the per-connection context
//! ([`session::Conn`]) to the protocol's `serve`. Nothing reaches the target before the
//! connection is decided and the decision recorded. A protocol folder (`postgres`, `tcp`)
//! exports `serve(&Conn, TcpStream) -> SessionEnd` and `refuse(&Conn, TcpStream, message)`,
//! and decides its requests with [`session::Conn::decide`].

pub mod http;
pub mod postgres;
pub mod session;
mod splice;
pub mod ssh;
pub mod tcp;

use std::{
    net::SocketAddr,
    sync::{atomic::Ordering, Arc},
    time::Duration,
};

use tokio::{
    net::{TcpListener, TcpStream},
    sync::watch,
};

use self::session::Conn;
pub use self::session::{Gateway, Stats, StatsSnapshot, UPSTREAM_CONNECT_TIMEOUT};
use crate::{
    config::Unmatched,
    conn_log::{self, debug, error, info, warn},
    identity::ProcessIdentity,
    net::{from_kernel_bytes, ClientAddr, OrigDstAddr},
    protocol::Protocol,
    record::{now_micros, NewSession, Outcome, SessionEnd, SessionId},
};

/// What each protocol keeps for all its sessions (cancel keys, catalog caches), owned by the
/// accept loop and handed to that protocol's `serve` only: the shared pipeline knows none of it.
#[derive(Default)]
pub struct Protocols {
    pub postgres: postgres::Shared,
    pub http: http::Shared,
    pub ssh: ssh::Shared,
}

/// Accepts until `shutdown` turns true, then returns; running connections keep their tasks.
pub async fn serve(
    listener: TcpListener,
    gateway: Arc<Gateway>,
    protocols: Arc<Protocols>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = shutdown.changed() => return,
        };
        match accepted {
            Ok((stream, peer)) => {
                gateway.stats.accepted.fetch_add(1, Ordering::Relaxed);
                let gw = Arc::clone(&gateway);
                let protocols = Arc::clone(&protocols);
                tokio::spawn(async move { handle(&gw, &protocols, stream, peer).await });
            }
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

struct ActiveGuard<'a>(&'a Stats);

impl Drop for ActiveGuard<'_> {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One connection, start to finish: the session pipeline.
pub async fn handle(
    gw: &Gateway,
    protocols: &Protocols,
    client_stream: TcpStream,
    peer: SocketAddr,
) {
    gw.stats.active.fetch_add(1, Ordering::Relaxed);
    let _active = ActiveGuard(&gw.stats);
    let client = ClientAddr(SocketAddr::new(peer.ip().to_canonical(), peer.port()));

    // Identify: the kernel's record is the only source of the original destination.
    let Some(rec) = gw.orig_dst.take(client) else {
        gw.stats.refused.fetch_add(1, Ordering::Relaxed);
        warn!(%client, "connection without a redirect record (not from a governed connect); closing");
        record_refusal(
            gw,
            client,
            None,
            ProcessIdentity::default(),
            "no redirect record: the connection did not come through the kernel redirect",
        );
        return;
    };
    let destination = OrigDstAddr(SocketAddr::new(
        from_kernel_bytes(rec.dst_addr),
        rec.dst_port,
    ));
    let identity = gw.proc.identify(&rec);
    // Resolve: a configured target, or the destination's address for one no target names,
    // under the configuration in force now, kept to the session's end.
    let config = gw.config.current();
    let target = config.resolve(destination);
    let fields = conn_log::ConnFields::new(
        identity.pid,
        identity.comm.clone(),
        destination,
        target.name.to_string(),
    );

    let connection = async {
        if target.target.is_none() && config.capture.unmatched == Unmatched::Refuse {
            gw.stats.refused.fetch_add(1, Ordering::Relaxed);
            info!("destination matches no target; refused (capture.unmatched = \"refuse\")");
            record_refusal(
                gw,
                client,
                Some(destination),
                identity,
                "destination matches no configured target",
            );
            return;
        }

        // Record before act: no byte moves until the session is in the store.
        let id = match gw.store.open(NewSession {
            started_at_us: now_micros(),
            client,
            destination,
            target: target.target.map(|t| t.name.clone()),
            protocol: target.protocol,
            identity: identity.clone(),
        }) {
            Ok(id) => id,
            Err(e) => {
                error!(error = %e, "cannot record the session; closing the connection");
                return;
            }
        };
        conn_log::record_session(id.0);
        debug!("session opened");
        let conn = Conn {
            gw,
            client,
            destination,
            identity,
            session: id,
            target,
            memo: session::DecisionMemo::default(),
        };

        // Decide the connection itself, before the protocol reads or sends a byte.
        let decided = conn.decide_connect().await;
        let end = if let Some(reason) = decided.refusal {
            gw.stats.refused.fetch_add(1, Ordering::Relaxed);
            info!(rules = ?decided.decision.rules, "connection refused by policy");
            match conn.target.protocol {
                Protocol::Postgres => {
                    Box::pin(postgres::refuse(
                        &conn,
                        &protocols.postgres,
                        client_stream,
                        &reason,
                    ))
                    .await
                }
                Protocol::Ssh if conn.target.target.is_some() => ssh::refuse(client_stream, reason),
                Protocol::Http | Protocol::Kubernetes if conn.target.target.is_some() => {
                    Box::pin(http::refuse(
                        client_stream,
                        &reason,
                        &decided.decision.rules,
                    ))
                    .await
                }
                _ => tcp::refuse(client_stream, reason),
            }
        } else {
            serve_allowed(&conn, protocols, client_stream).await
        };
        // The record has every session's end; at `info` the journal keeps the daemon's own
        // events and refusals (a line per session cost about 6% of a short connection's CPU).
        debug!(
            outcome = end.outcome.label(),
            up = end.bytes_to_target,
            down = end.bytes_from_target,
            "session closed"
        );
        close(gw, id, end);
    };
    conn_log::in_conn(connection, fields).await;
}

/// An allowed connection, to its protocol's gateway.
async fn serve_allowed(
    conn: &Conn<'_>,
    protocols: &Protocols,
    client_stream: TcpStream,
) -> SessionEnd {
    // The kernel fast path, before the gateway sends a byte (`tcp` decides for itself: its
    // splice(2) reads only what came through TCP).
    if matches!(
        conn.target.protocol,
        Protocol::Postgres | Protocol::Ssh | Protocol::Http | Protocol::Kubernetes
    ) {
        conn.gw.orig_dst.fast_path(&client_stream);
    }
    // Each protocol's future boxed: held inline, the largest of them (several KiB) would size
    // every connection's task, and be copied whole into it at spawn, whatever it serves.
    match conn.target.protocol {
        Protocol::Postgres => {
            Box::pin(postgres::serve(conn, &protocols.postgres, client_stream)).await
        }
        Protocol::Ssh => Box::pin(ssh::serve(conn, &protocols.ssh, client_stream)).await,
        Protocol::Http | Protocol::Kubernetes => {
            Box::pin(http::serve(conn, &protocols.http, client_stream)).await
        }
        Protocol::Tcp => Box::pin(tcp::serve(conn, client_stream)).await,
        // Record categories only (never a configured target's protocol): refused.
        Protocol::Udp | Protocol::Socket | Protocol::Unix | Protocol::Dns => {
            tcp::refuse(client_stream, "not relayed".into())
        }
    }
}

fn close(gw: &Gateway, id: SessionId, end: SessionEnd) {
    if let Err(e) = gw.store.close(id, end) {
        error!(session = id.0, error = %e, "cannot record the end of the session");
    }
}

fn record_refusal(
    gw: &Gateway,
    client: ClientAddr,
    destination: Option<OrigDstAddr>,
    identity: ProcessIdentity,
    reason: &str,
) {
    let now = now_micros();
    let start = NewSession {
        started_at_us: now,
        client,
        destination: destination.unwrap_or(OrigDstAddr(SocketAddr::new(
            std::net::Ipv4Addr::UNSPECIFIED.into(),
            0,
        ))),
        target: None,
        protocol: Protocol::Tcp,
        identity,
    };
    let result = gw.store.open(start).and_then(|id| {
        gw.store.close(
            id,
            SessionEnd {
                ended_at_us: now,
                bytes_to_target: 0,
                bytes_from_target: 0,
                outcome: Outcome::Refused {
                    reason: reason.to_string(),
                },
            },
        )
    });
    if let Err(e) = result {
        error!(error = %e, "cannot record a refused connection");
    }
}

#[cfg(test)]
mod tests;
