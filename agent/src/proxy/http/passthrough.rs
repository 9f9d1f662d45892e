//! TLS pass-through by server name: the client's ClientHello is read (not answered), the
//! connection is decided by the name it asks for, and then the bytes are relayed untouched,
//! the hello first. The gateway cannot see inside, so the connection is judged as the request
//! `CONNECT <server name> /`: rules that name the host (and no method or path) decide it. A
//! hello without a server name cannot be judged: the target's `on_unknown`.

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
};

use super::{ended, failed, HEADER_TIMEOUT};
use crate::{
    policy::Action,
    proxy::{
        session::{Ask, Conn, UPSTREAM_CONNECT_TIMEOUT},
        tcp,
    },
    record::{Outcome, SessionEnd},
};

/// The most the gateway reads looking for a complete ClientHello.
const MAX_HELLO: usize = 16 * 1024;

/// What a client's first bytes say.
#[derive(Debug, PartialEq, Eq)]
pub enum Hello {
    /// Not complete yet.
    Partial,
    /// A ClientHello, and the server name it asks for.
    Complete(Option<String>),
    /// Not a TLS ClientHello.
    Bad(String),
}

/// Reads `bytes` as the start of a TLS connection (rustls parses; nothing is answered).
pub fn read_hello(bytes: &[u8]) -> Hello {
    let mut acceptor = rustls::server::Acceptor::default();
    let mut input = bytes;
    while !input.is_empty() {
        if let Err(e) = acceptor.read_tls(&mut input) {
            return Hello::Bad(e.to_string());
        }
    }
    match acceptor.accept() {
        Ok(Some(accepted)) => {
            Hello::Complete(accepted.client_hello().server_name().map(str::to_string))
        }
        Ok(None) => Hello::Partial,
        Err((e, _)) => Hello::Bad(e.to_string()),
    }
}

pub async fn serve(conn: &Conn<'_>, mut client: TcpStream) -> SessionEnd {
    let mut hello = Vec::with_capacity(1024);
    let deadline = tokio::time::Instant::now() + HEADER_TIMEOUT;
    let server_name = loop {
        match read_hello(&hello) {
            Hello::Complete(name) => break name,
            Hello::Bad(e) => return failed(format!("client TLS: {e}")),
            Hello::Partial if hello.len() >= MAX_HELLO => {
                return failed("client TLS: ClientHello too large")
            }
            Hello::Partial => {}
        }
        let mut chunk = [0u8; 4096];
        let room = (MAX_HELLO - hello.len()).min(chunk.len());
        match tokio::time::timeout_at(deadline, client.read(&mut chunk[..room])).await {
            Ok(Ok(0)) => return failed("client TLS: closed during the ClientHello"),
            Ok(Ok(n)) => hello.extend_from_slice(&chunk[..n]),
            Ok(Err(e)) => return failed(format!("client: {e}")),
            Err(_) => return failed("client TLS: no complete ClientHello in time"),
        }
    };
    let policy = conn.policy();
    let (action, text) = match &server_name {
        Some(name) => (
            Action::Http {
                method: "CONNECT",
                host: name,
                path: "/",
            },
            format!("TLS pass-through to {name}"),
        ),
        None => (
            Action::Unknown {
                why: "a TLS ClientHello without a server name",
            },
            "TLS pass-through without a server name".to_string(),
        ),
    };
    let decided = conn
        .decide(
            &policy,
            Ask {
                action,
                text: &text,
                class: Some("tls".into()),
                on_hold: None,
                params: &[],
            },
        )
        .await;
    if let Some(reason) = decided.refusal {
        return tcp::refuse(client, reason);
    }
    let upstream = match connect(conn).await {
        Ok(s) => s,
        Err(end) => return end,
    };
    let _ = upstream.set_nodelay(true);
    let (up_r, mut up_w) = upstream.into_split();
    if let Err(e) = up_w.write_all(&hello).await {
        return ended(
            &super::Totals::default(),
            Outcome::UpstreamFailed {
                error: e.to_string(),
            },
        );
    }
    let (sent, received, result) = tcp::relay(client.into_split(), (up_r, up_w)).await;
    let totals = super::Totals::default();
    totals.up.store(
        sent + hello.len() as u64,
        std::sync::atomic::Ordering::Relaxed,
    );
    totals
        .down
        .store(received, std::sync::atomic::Ordering::Relaxed);
    ended(
        &totals,
        match result {
            Ok(()) => Outcome::Closed,
            Err(e) => Outcome::Failed {
                error: e.to_string(),
            },
        },
    )
}

async fn connect(conn: &Conn<'_>) -> Result<TcpStream, SessionEnd> {
    let error = match tokio::time::timeout(
        UPSTREAM_CONNECT_TIMEOUT,
        TcpStream::connect(conn.destination.0),
    )
    .await
    {
        Ok(Ok(s)) => return Ok(s),
        Ok(Err(e)) => e.to_string(),
        Err(_) => "no answer in time".into(),
    };
    Err(ended(
        &super::Totals::default(),
        Outcome::UpstreamFailed { error },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A ClientHello as rustls's own client writes it, for `name`.
    fn client_hello(name: &str) -> Vec<u8> {
        let roots = rustls::RootCertStore::empty();
        let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        let mut client = rustls::ClientConnection::new(
            std::sync::Arc::new(config),
            name.to_string().try_into().unwrap(),
        )
        .unwrap();
        let mut out = Vec::new();
        client.write_tls(&mut out).unwrap();
        out
    }

    #[test]
    fn the_server_name_is_read_from_a_hello_in_pieces_and_bad_hellos_are_refused() {
        let hello = client_hello("api.example.com");
        assert_eq!(
            read_hello(&hello),
            Hello::Complete(Some("api.example.com".into()))
        );
        assert_eq!(read_hello(&hello[..10]), Hello::Partial);
        assert_eq!(read_hello(&[]), Hello::Partial);
        // An IP address is sent without a server name.
        assert_eq!(read_hello(&client_hello("10.0.0.5")), Hello::Complete(None));
        assert!(matches!(
            read_hello(b"GET / HTTP/1.1\r\n\r\n"),
            Hello::Bad(_)
        ));
        let mut garbage = hello.clone();
        garbage[5] = 0x02; // a ServerHello where a ClientHello belongs
        assert!(matches!(read_hello(&garbage), Hello::Bad(_)));
    }
}
