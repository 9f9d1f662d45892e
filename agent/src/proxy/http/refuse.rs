//! A connection the policy refused before any request: plain HTTP gets the `403` JSON answer a
//! denied request gets (to every request on it, then the connection closes); TLS gets a fatal
//! `access_denied` alert before any handshake. The gateway mints no certificate for a
//! connection it refuses: a client that pins its server's certificate would report a
//! certificate error rather than the refusal, and nothing of the connection is judged past
//! its identity.

use std::{convert::Infallible, sync::Arc, time::Duration};

use hyper::{body::Incoming, service::service_fn, Request, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
};

use super::{json_answer, HEADER_TIMEOUT, MAX_HEAD_BYTES};
use crate::record::{now_micros, Outcome, SessionEnd};

/// A TLS record (content type 21, alert; version 3.3) holding a fatal (2) `access_denied` (49)
/// alert. Sent in the clear, as any alert before the handshake is.
const ACCESS_DENIED_ALERT: [u8; 7] = [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x31];

/// How long the gateway waits for a refused client to read its answer and close.
const LINGER: Duration = Duration::from_secs(2);

/// Answers a refused connection as its protocol can hear it; `message` is the policy's.
pub async fn refuse(mut client: TcpStream, message: &str, rules: &[String]) -> SessionEnd {
    let end = |reason: &str| SessionEnd {
        ended_at_us: now_micros(),
        bytes_to_target: 0,
        bytes_from_target: 0,
        outcome: Outcome::Refused {
            reason: reason.to_string(),
        },
    };
    let _ = client.set_nodelay(true);
    let mut first = [0u8; 1];
    match tokio::time::timeout(HEADER_TIMEOUT, client.peek(&mut first)).await {
        Ok(Ok(n)) if n > 0 => {}
        _ => return super::super::tcp::refuse(client, message.to_string()),
    }
    if first[0] == 0x16 {
        // Read the ClientHello first: closing on unread bytes would reset the connection,
        // and the client could lose the alert.
        let mut hello = vec![0u8; 16 * 1024];
        let _ = tokio::time::timeout(LINGER, client.read(&mut hello)).await;
        let _ = client.write_all(&ACCESS_DENIED_ALERT).await;
        let _ = client.shutdown().await;
        let _ = tokio::time::timeout(LINGER, async {
            while matches!(client.read(&mut hello).await, Ok(n) if n > 0) {}
        })
        .await;
        return end(message);
    }
    let body = Arc::new(serde_json::json!({
        "error": "bulkhead: denied",
        "message": message,
        "rule": rules.first(),
        "rules": rules,
    }));
    let service = service_fn(move |_req: Request<Incoming>| {
        let body = Arc::clone(&body);
        async move {
            let mut resp = json_answer(StatusCode::FORBIDDEN, &body);
            resp.headers_mut().insert(
                hyper::header::CONNECTION,
                hyper::header::HeaderValue::from_static("close"),
            );
            Ok::<_, Infallible>(resp)
        }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .max_buf_size(MAX_HEAD_BYTES)
        .keep_alive(false);
    let served = builder.serve_connection(TokioIo::new(client), service);
    let _ = tokio::time::timeout(HEADER_TIMEOUT + LINGER, served).await;
    end(message)
}
