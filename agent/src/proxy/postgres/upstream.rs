//! Logging in to the target with the held credentials.
//!
//! The governed client never authenticates to the target and never sees the password: the
//! gateway answers the client's startup itself and logs in upstream with SCRAM-SHA-256
//! (postgres-protocol's implementation, which also verifies the server's signature), md5 or
//! cleartext, whichever the server asks for.

use bytes::{Buf as _, Bytes, BytesMut};
use postgres_protocol::{
    authentication::{md5_hash, sasl},
    message::frontend,
};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _, ReadHalf, WriteHalf},
    net::TcpStream,
};

use super::{
    codec::{self, CodecError, Frame, FrameReader},
    Stream,
};
use crate::{
    net::OrigDstAddr,
    proxy::postgres::settings::{PostgresTarget, UpstreamTls},
};

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("cannot reach the target: {0}")]
    Connect(std::io::Error),
    #[error("the target asked for a password and the gateway holds none for this target")]
    NoPassword,
    #[error("the target refused the gateway's login: {0}")]
    Refused(String),
    #[error("the target asked for {0}, which the gateway does not support")]
    Unsupported(String),
    #[error("SCRAM exchange failed: {0}")]
    Scram(std::io::Error),
    #[error("the target closed the connection during login")]
    Closed,
    #[error("the target sent {0:?} during login")]
    Unexpected(char),
    #[error("the target refused TLS, which its configuration requires")]
    TlsRefused,
    #[error("TLS to the target: {0}")]
    Tls(String),
    #[error("the target's session would not read SQL as the gateway does: {0}")]
    Unjudgeable(String),
    #[error(transparent)]
    Codec(#[from] CodecError),
}

/// A logged-in upstream connection.
pub struct Upstream {
    pub reader: FrameReader<ReadHalf<Stream>>,
    pub writer: WriteHalf<Stream>,
    /// Whether the connection is TLS, verified against the configured CA.
    pub tls: bool,
    /// ParameterStatus and NoticeResponse frames to pass on to the client.
    pub greeting: Vec<Bytes>,
    /// The target's own cancel key.
    pub backend_key: Option<(i32, i32)>,
    /// How the gateway authenticated (`scram-sha-256`, `md5`, `password`, `trust`).
    pub method: &'static str,
}

/// Connects to `addr` and logs in as `user` to `database`, passing `extra` startup
/// parameters (application_name, client_encoding...).
pub async fn login(
    addr: OrigDstAddr,
    pg: &PostgresTarget,
    user: &str,
    database: &str,
    extra: &[(String, String)],
    password: Option<&str>,
) -> Result<Upstream, UpstreamError> {
    let stream = tokio::time::timeout(
        super::super::UPSTREAM_CONNECT_TIMEOUT,
        TcpStream::connect(addr.0),
    )
    .await
    .map_err(|_| UpstreamError::Connect(std::io::ErrorKind::TimedOut.into()))?
    .map_err(UpstreamError::Connect)?;
    let _ = stream.set_nodelay(true);
    let tls = pg.tls == UpstreamTls::VerifyFull;
    let stream: Stream = if tls {
        Box::new(start_tls(stream, addr, pg).await?)
    } else {
        Box::new(stream)
    };
    let (r, mut writer) = tokio::io::split(stream);
    let mut reader = FrameReader::new(r, "target", codec::MAX_BACKEND);

    let mut params: Vec<(&str, &str)> = vec![("user", user), ("database", database)];
    params.extend(
        extra
            .iter()
            .filter(|(k, _)| !matches!(k.as_str(), "user" | "database" | "replication"))
            .map(|(k, v)| (k.as_str(), v.as_str())),
    );
    let mut buf = BytesMut::new();
    frontend::startup_message(params.iter().copied(), &mut buf).map_err(UpstreamError::Connect)?;
    writer
        .write_all(&buf)
        .await
        .map_err(UpstreamError::Connect)?;

    let mut method = "trust";
    let mut scram: Option<sasl::ScramSha256> = None;
    let mut greeting = Vec::new();
    let mut backend_key = None;
    loop {
        let Frame { tag, body, raw } = reader.next().await?.ok_or(UpstreamError::Closed)?;
        match tag {
            b'R' => {
                let mut b = &body[..];
                if b.len() < 4 {
                    return Err(CodecError::Malformed {
                        what: "Authentication",
                    }
                    .into());
                }
                let code = b.get_i32();
                let mut out = BytesMut::new();
                match code {
                    0 => continue,
                    3 => {
                        method = "password";
                        let pw = password.ok_or(UpstreamError::NoPassword)?;
                        frontend::password_message(pw.as_bytes(), &mut out)
                            .map_err(UpstreamError::Connect)?;
                    }
                    5 => {
                        method = "md5";
                        let pw = password.ok_or(UpstreamError::NoPassword)?;
                        if b.len() < 4 {
                            return Err(CodecError::Malformed {
                                what: "AuthenticationMD5Password",
                            }
                            .into());
                        }
                        let salt = [b[0], b[1], b[2], b[3]];
                        let hash = md5_hash(user.as_bytes(), pw.as_bytes(), salt);
                        frontend::password_message(hash.as_bytes(), &mut out)
                            .map_err(UpstreamError::Connect)?;
                    }
                    10 => {
                        let mechanisms = sasl_mechanisms(b);
                        if !mechanisms.iter().any(|m| m == sasl::SCRAM_SHA_256) {
                            return Err(UpstreamError::Unsupported(format!(
                                "SASL {}",
                                mechanisms.join(", ")
                            )));
                        }
                        method = "scram-sha-256";
                        let pw = password.ok_or(UpstreamError::NoPassword)?;
                        let s = sasl::ScramSha256::new(
                            pw.as_bytes(),
                            sasl::ChannelBinding::unsupported(),
                        );
                        frontend::sasl_initial_response(sasl::SCRAM_SHA_256, s.message(), &mut out)
                            .map_err(UpstreamError::Connect)?;
                        scram = Some(s);
                    }
                    11 => {
                        let s = scram.as_mut().ok_or(UpstreamError::Unexpected('R'))?;
                        s.update(b).map_err(UpstreamError::Scram)?;
                        frontend::sasl_response(s.message(), &mut out)
                            .map_err(UpstreamError::Connect)?;
                    }
                    12 => {
                        // Verifies the server's signature: a target that does not know the
                        // password cannot pretend to be the database.
                        let s = scram.as_mut().ok_or(UpstreamError::Unexpected('R'))?;
                        s.finish(b).map_err(UpstreamError::Scram)?;
                        continue;
                    }
                    other => {
                        return Err(UpstreamError::Unsupported(format!(
                            "authentication method {other}"
                        )))
                    }
                }
                writer
                    .write_all(&out)
                    .await
                    .map_err(UpstreamError::Connect)?;
            }
            b'E' => {
                let message = codec::error_fields(&body)
                    .into_iter()
                    .find(|(c, _)| *c == b'M')
                    .map_or_else(|| "no message".to_string(), |(_, m)| m);
                return Err(UpstreamError::Refused(message));
            }
            b'K' => {
                let mut b = &body[..];
                if b.len() >= 8 {
                    backend_key = Some((b.get_i32(), b.get_i32()));
                }
            }
            b'S' => {
                judge_parameter_status(&body)?;
                greeting.push(raw);
            }
            b'N' => greeting.push(raw),
            b'Z' => {
                return Ok(Upstream {
                    reader,
                    writer,
                    tls,
                    greeting,
                    backend_key,
                    method,
                })
            }
            other => return Err(UpstreamError::Unexpected(char::from(other))),
        }
    }
}

/// A ParameterStatus of the login: what the role's or database's settings (or the server's
/// configuration) gave the session, which no statement or startup parameter of the client's
/// was there to judge. A session whose SQL the server would read differently from the gateway
/// (a client-only `client_encoding`, `standard_conforming_strings` off) is not served.
fn judge_parameter_status(body: &[u8]) -> Result<(), UpstreamError> {
    let mut b = body;
    if let Ok(name @ ("client_encoding" | "standard_conforming_strings")) =
        codec::take_cstr(&mut b, "ParameterStatus")
    {
        let value = codec::take_cstr(&mut b, "ParameterStatus")?;
        if let Some(why) = crate::policy::login_hazard(name, value) {
            return Err(UpstreamError::Unjudgeable(why));
        }
    }
    Ok(())
}

/// SSLRequest, then a verified TLS handshake: a target that will not speak TLS, or whose
/// certificate does not chain to the configured CA and name, is not logged in to.
async fn start_tls(
    mut stream: TcpStream,
    addr: OrigDstAddr,
    pg: &PostgresTarget,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, UpstreamError> {
    let mut buf = BytesMut::new();
    frontend::ssl_request(&mut buf);
    stream
        .write_all(&buf)
        .await
        .map_err(UpstreamError::Connect)?;
    let mut answer = [0u8; 1];
    stream
        .read_exact(&mut answer)
        .await
        .map_err(UpstreamError::Connect)?;
    if answer[0] != b'S' {
        return Err(UpstreamError::TlsRefused);
    }
    let ca = pg
        .ca
        .as_deref()
        .ok_or_else(|| UpstreamError::Tls("no CA configured".into()))?;
    let config = crate::tls::client_config(ca).map_err(|e| UpstreamError::Tls(e.to_string()))?;
    let name = match &pg.server_name {
        Some(n) => rustls_pki_types::ServerName::try_from(n.clone())
            .map_err(|e| UpstreamError::Tls(e.to_string()))?,
        None => rustls_pki_types::ServerName::IpAddress(addr.0.ip().into()),
    };
    tokio_rustls::TlsConnector::from(config)
        .connect(name, stream)
        .await
        .map_err(|e| UpstreamError::Tls(e.to_string()))
}

fn sasl_mechanisms(mut b: &[u8]) -> Vec<String> {
    let mut out = Vec::new();
    while let Ok(m) = codec::take_cstr(&mut b, "AuthenticationSASL") {
        if m.is_empty() {
            break;
        }
        out.push(m.to_string());
    }
    out
}

/// Sends a CancelRequest for the target's own key.
pub async fn cancel(addr: OrigDstAddr, pid: i32, secret: i32) -> std::io::Result<()> {
    let mut stream = tokio::time::timeout(
        super::super::UPSTREAM_CONNECT_TIMEOUT,
        TcpStream::connect(addr.0),
    )
    .await
    .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
    let mut buf = BytesMut::new();
    frontend::cancel_request(pid, secret, &mut buf);
    stream.write_all(&buf).await?;
    stream.shutdown().await
}
