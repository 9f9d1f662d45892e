//! Opaque TCP: connect to the original destination and move bytes both ways.
//!
//! Bytes move with `splice(2)` ([`super::splice`]); [`relay`] is the copying fallback and the
//! relay for streams that are not plain sockets. Half-closes are passed on (a client's
//! `shutdown(SHUT_WR)` becomes the target's EOF and the target's answer still flows back).
//! Byte counts survive errors, so the record says how far a failed session got.

use std::io;

use tokio::{
    io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _},
    net::TcpStream,
};

use super::session::{Conn, UPSTREAM_CONNECT_TIMEOUT};
use crate::{
    net::OrigDstAddr,
    record::{now_micros, Outcome, SessionEnd},
};

/// Per-direction buffer. Large enough that a bulk transfer over loopback is not syscall-bound.
const BUFFER: usize = 256 * 1024;

/// Serves an allowed connection: connects to the original destination and relays until both
/// directions are done. Opaque bytes carry no requests to judge; the connection was decided.
pub async fn serve(conn: &Conn<'_>, client: TcpStream) -> SessionEnd {
    // With the kernel fast path the client's bytes may arrive in its socket's sk_msg queue,
    // which splice(2) does not read: relay by copy then.
    let fast_path = conn.gw.orig_dst.fast_path(&client);
    forward(client, conn.destination, fast_path).await
}

/// Refuses a connection: reset at once (`SO_LINGER` 0), so the client sees the refusal on its
/// first read or write instead of a clean end of stream it could take for an empty answer.
pub fn refuse(client: TcpStream, reason: String) -> SessionEnd {
    refuse_with(client, Outcome::Refused { reason })
}

/// Ends a connection whose target could not be reached with a reset, as [`refuse`] does: the
/// client's connect already succeeded (the gateway accepted it), so the nearest it can get to
/// the target's refusal is `ECONNRESET` on its first read or write, never a clean end of stream
/// it could take for an empty answer.
fn refuse_with(client: TcpStream, outcome: Outcome) -> SessionEnd {
    if let Err(e) = client.set_zero_linger() {
        crate::conn_log::debug!(error = %e, "cannot set SO_LINGER; closing without a reset");
    }
    drop(client);
    ended(0, 0, outcome)
}

/// Connects to `destination` and relays until both directions are done.
async fn forward(client: TcpStream, destination: OrigDstAddr, fast_path: bool) -> SessionEnd {
    let upstream =
        match tokio::time::timeout(UPSTREAM_CONNECT_TIMEOUT, TcpStream::connect(destination.0))
            .await
        {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                return refuse_with(client, Outcome::upstream_connect_failed(destination, &e))
            }
            Err(_) => {
                return refuse_with(
                    client,
                    Outcome::UpstreamFailed {
                        error: format!("no answer within {}s", UPSTREAM_CONNECT_TIMEOUT.as_secs()),
                    },
                )
            }
        };
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let (up, down, result) = if fast_path {
        relay(client.into_split(), upstream.into_split()).await
    } else {
        match super::splice::relay(&client, &upstream).await {
            Ok(done) => done,
            Err(e) => {
                crate::conn_log::warn!(error = %e, "splice unavailable; relaying by copy");
                relay(client.into_split(), upstream.into_split()).await
            }
        }
    };
    let outcome = match result {
        Ok(()) => Outcome::Closed,
        Err(e) => Outcome::Failed {
            error: e.to_string(),
        },
    };
    ended(up, down, outcome)
}

fn ended(up: u64, down: u64, outcome: Outcome) -> SessionEnd {
    SessionEnd {
        ended_at_us: now_micros(),
        bytes_to_target: up,
        bytes_from_target: down,
        outcome,
    }
}

/// Relays between the halves of `client` and `upstream`; returns bytes client→upstream,
/// upstream→client, and the first error. Generic so it is tested over in-memory pipes.
pub async fn relay<CR, CW, UR, UW>(
    client: (CR, CW),
    upstream: (UR, UW),
) -> (u64, u64, io::Result<()>)
where
    CR: AsyncRead + Unpin,
    CW: AsyncWrite + Unpin,
    UR: AsyncRead + Unpin,
    UW: AsyncWrite + Unpin,
{
    let (mut client_r, mut client_w) = client;
    let (mut up_r, mut up_w) = upstream;
    let mut sent = 0u64;
    let mut received = 0u64;
    let result = tokio::try_join!(
        pump(&mut client_r, &mut up_w, &mut sent),
        pump(&mut up_r, &mut client_w, &mut received),
    );
    (sent, received, result.map(|_| ()))
}

async fn pump<R, W>(reader: &mut R, writer: &mut W, count: &mut u64) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; BUFFER];
    loop {
        let n = reader.read(&mut buf).await?;
        if n == 0 {
            // Pass the half-close on; the other direction keeps going.
            return match writer.shutdown().await {
                Err(e) if e.kind() != io::ErrorKind::NotConnected => Err(e),
                _ => Ok(()),
            };
        }
        writer.write_all(&buf[..n]).await?;
        *count += n as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::duplex;

    #[tokio::test]
    async fn relays_both_ways_and_passes_half_close_on() {
        let (client_app, client_gw) = duplex(64);
        let (up_gw, up_app) = duplex(64);
        let relay = tokio::spawn(relay(tokio::io::split(client_gw), tokio::io::split(up_gw)));

        let server = tokio::spawn(async move {
            let mut up_app = up_app;
            let mut got = Vec::new();
            up_app.read_to_end(&mut got).await.unwrap();
            up_app.write_all(b"response after EOF").await.unwrap();
            up_app.shutdown().await.unwrap();
            got
        });
        let mut client_app = client_app;
        let request = vec![7u8; 10_000];
        client_app.write_all(&request).await.unwrap();
        client_app.shutdown().await.unwrap();
        let mut back = Vec::new();
        client_app.read_to_end(&mut back).await.unwrap();

        assert_eq!(server.await.unwrap(), request);
        assert_eq!(back, b"response after EOF");
        let (up, down, result) = relay.await.unwrap();
        result.unwrap();
        assert_eq!((up, down), (10_000, 18));
    }
}
