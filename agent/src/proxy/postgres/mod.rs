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
//!
//! - [`login`]: the client's startup, the upstream login and the greeting; [`cancel`]: cancel
//!   keys.
//! - [`relay`]: the two relay loops of a logged-in session, which decide statements through
//!   the session pipeline ([`Conn::decide`]).
//! - [`state`]: what is pending and what each answer completes, as plain code.
//! - [`columns`], [`copy_out`], [`catalog`]: masking result data.

mod cancel;
mod catalog;
pub mod codec;
mod columns;
mod copy_out;
mod login;
mod relay;
pub mod settings;
mod startup;
mod state;
mod upstream;

pub use self::{cancel::CancelKeys, catalog::Catalogs};

/// For the fuzz target `pg_state` (`agent/fuzz`): random message sequences, read from `data`,
/// between a client and a model of PostgreSQL through the session model; panics where a row
/// would go out unmasked, a denied statement would run or the gateway would lose track.
#[cfg(feature = "fuzzing")]
pub fn fuzz_state_sequences(data: &[u8]) {
    state::sim::check(&state::sim::ops_from_bytes(data));
}

use tokio::{
    io::{AsyncWrite, AsyncWriteExt as _},
    net::TcpStream,
};

use self::codec::CodecError;
use super::session::Conn;
use crate::{
    config::TargetKind,
    record::{now_micros, Outcome, SessionEnd},
};

/// The PostgreSQL gateway's state shared by all its sessions.
#[derive(Default)]
pub struct Shared {
    /// Cancel keys handed to clients.
    pub cancels: CancelKeys,
    /// Column identities read from targets' catalogs, for column mask rules.
    pub catalogs: Catalogs,
}

#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("client: {0}")]
    Client(CodecError),
    #[error("target: {0}")]
    Target(CodecError),
    #[error("client: unexpected message {0:?}")]
    UnexpectedFrontend(char),
    /// A message the gateway does not let through where it came, because it could not follow
    /// what the server does with it.
    #[error("client: {0}")]
    Unsupported(&'static str),
    /// A per-session cap was reached (statements, portals, messages in flight).
    #[error("session limit: {0}")]
    Limit(&'static str),
    /// The target answered with a message that does not fit what was asked: the gateway can
    /// no longer tell which statement a result belongs to.
    #[error("target: answer {0:?} out of step with the requests; the gateway lost track")]
    OutOfStep(char),
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

fn ended(up: u64, down: u64, outcome: Outcome) -> SessionEnd {
    SessionEnd {
        ended_at_us: now_micros(),
        bytes_to_target: up,
        bytes_from_target: down,
        outcome,
    }
}

/// Refuses a connection the policy denied, in the protocol: the client's startup is read (TLS
/// accepted as usual) and answered with FATAL 42501 and the policy's message. Nothing reaches
/// the target.
pub async fn refuse(
    conn: &Conn<'_>,
    shared: &Shared,
    client: TcpStream,
    message: &str,
) -> SessionEnd {
    let reason = message.to_string();
    if let Ok(mut started) = login::start(conn, shared, client).await {
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
pub async fn serve(conn: &Conn<'_>, shared: &Shared, client: TcpStream) -> SessionEnd {
    let Some(target) = conn.target.target else {
        return ended(
            0,
            0,
            Outcome::Failed {
                error: "a PostgreSQL session needs a configured target".into(),
            },
        );
    };
    let TargetKind::Postgres(pg) = &target.kind else {
        return ended(
            0,
            0,
            Outcome::Failed {
                error: "not a PostgreSQL target".into(),
            },
        );
    };
    let started = match login::start(conn, shared, client).await {
        Ok(s) => s,
        Err(end) => return end,
    };
    let session = match login::log_in(conn, shared, target, pg, started).await {
        Ok(s) => s,
        Err(end) => return end,
    };
    let upstream::Upstream { reader, writer, .. } = session.upstream;
    let end = relay::Relay::new(conn, &shared.catalogs, session.login)
        .run(
            relay::Leg::new(session.client, writer),
            relay::Leg {
                from: reader,
                to: session.to_client,
            },
            session.greeted,
        )
        .await;
    if let Some(k) = session.cancel_key {
        shared.cancels.forget(k);
    }
    end
}
