//! Logging in to the target with the held credentials.
//!
//! The governed client never authenticates to the target and never sees the password: the
//! gateway answers the client's startup itself and logs in upstream with SCRAM-SHA-256
//! (postgres-protocol's implementation, which also verifies the server's signature), md5 or
//! cleartext, whichever the server asks for among the methods the target's `postgres.auth`
//! allows ([`Authenticator`], pure). A server that asks for another gets nothing derived from
//! the password: the gateway hangs up. The held credentials go only to the addresses the
//! target names as sockets ([`network_refusal`]).

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
    config::{Target, TargetAddress},
    net::OrigDstAddr,
    proxy::postgres::settings::{AuthMethod, PostgresTarget, UpstreamTls},
    record::Outcome,
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
    #[error(
        "the server asked for {}, which the target's postgres.auth ({}) does not allow; the \
         gateway sent nothing derived from the password (to allow it, add \"{asked}\" to \
         postgres.auth)",
        describe(*asked),
        names(allowed)
    )]
    NotAllowed {
        asked: AuthMethod,
        allowed: Vec<AuthMethod>,
    },
    #[error("SCRAM exchange failed: {0}")]
    Scram(std::io::Error),
    #[error("the target ended the SCRAM exchange without proving that it knows the password")]
    ScramIncomplete,
    #[error("the target asked the gateway to authenticate a second time")]
    AuthAgain,
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

impl UpstreamError {
    /// The upstream `auth` event's method for a login that failed this way.
    pub fn recorded_method(&self) -> String {
        match self {
            UpstreamError::NotAllowed { asked, .. } => {
                format!("{asked} (refused: not in postgres.auth)")
            }
            _ => "login".into(),
        }
    }

    /// The SQLSTATE the client's FATAL carries.
    pub fn sqlstate(&self) -> &'static str {
        match self {
            UpstreamError::NotAllowed { .. } => "28000",
            _ => "08006",
        }
    }

    /// How the session ended: refused when the gateway would not log in, else failed.
    pub fn outcome(&self, target: &str) -> Outcome {
        match self {
            UpstreamError::NotAllowed { .. } => Outcome::Refused {
                reason: format!("target {target}: {self}"),
            },
            UpstreamError::Connect(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                Outcome::upstream_connect_failed(format_args!("target {target}"), e)
            }
            _ => Outcome::UpstreamFailed {
                error: self.to_string(),
            },
        }
    }
}

fn describe(method: AuthMethod) -> &'static str {
    match method {
        AuthMethod::ScramSha256 => "SCRAM-SHA-256 (\"scram-sha-256\")",
        AuthMethod::Md5 => "md5 authentication (\"md5\")",
        AuthMethod::Password => "the password in cleartext (\"password\")",
        AuthMethod::None => "no authentication at all (\"none\")",
    }
}

fn names(methods: &[AuthMethod]) -> String {
    methods
        .iter()
        .map(|m| format!("\"{m}\""))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Why the gateway will not log in to `target` at `dst`, if it will not: the held credentials
/// go only to the addresses the admin named as `IP:PORT`. A destination inside one of the
/// target's networks could be any host there (another server, one a tool set up to collect
/// logins), so it is logged in to only when the target opts in (`postgres.login_to_network`).
pub fn network_refusal(target: &Target, pg: &PostgresTarget, dst: OrigDstAddr) -> Option<String> {
    if pg.login_to_network {
        return None;
    }
    let named = |a: &&TargetAddress| matches!(a, TargetAddress::Socket(_)) && a.matches(dst);
    if target.addresses.iter().any(|a| named(&a)) {
        return None;
    }
    let network = target
        .addresses
        .iter()
        .find_map(|a| match a {
            TargetAddress::Network(n) if a.matches(dst) => Some(n.to_string()),
            _ => None,
        })
        .unwrap_or_else(|| "a network".into());
    Some(format!(
        "target {}: {} is in its network {network} but is not one of its IP:PORT addresses, \
         and the gateway logs in with the target's credentials only at those (add this server \
         to the target's addresses, or set postgres.login_to_network = true)",
        target.name,
        crate::config::unmatched_name(dst),
    ))
}

/// What a target's Authentication message asks of the gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthRequest {
    /// AuthenticationOk: logged in.
    Ok,
    /// AuthenticationCleartextPassword.
    Cleartext,
    /// AuthenticationMD5Password, with the salt.
    Md5([u8; 4]),
    /// AuthenticationSASL, with the mechanisms offered.
    Sasl(Vec<String>),
    SaslContinue(Bytes),
    SaslFinal(Bytes),
    /// A method the gateway does not implement (Kerberos, GSSAPI, SSPI...), by its code.
    Other(i32),
}

impl AuthRequest {
    pub fn parse(body: &[u8]) -> Result<Self, CodecError> {
        let mut b = body;
        if b.len() < 4 {
            return Err(CodecError::Malformed {
                what: "Authentication",
            });
        }
        Ok(match b.get_i32() {
            0 => AuthRequest::Ok,
            3 => AuthRequest::Cleartext,
            5 => {
                let salt = b.get(..4).ok_or(CodecError::Malformed {
                    what: "AuthenticationMD5Password",
                })?;
                AuthRequest::Md5([salt[0], salt[1], salt[2], salt[3]])
            }
            10 => AuthRequest::Sasl(sasl_mechanisms(b)),
            11 => AuthRequest::SaslContinue(Bytes::copy_from_slice(b)),
            12 => AuthRequest::SaslFinal(Bytes::copy_from_slice(b)),
            other => AuthRequest::Other(other),
        })
    }

    /// The method an opening request asks for; `None` for continuations and the unsupported.
    fn method(&self) -> Option<AuthMethod> {
        match self {
            AuthRequest::Ok => Some(AuthMethod::None),
            AuthRequest::Cleartext => Some(AuthMethod::Password),
            AuthRequest::Md5(_) => Some(AuthMethod::Md5),
            AuthRequest::Sasl(m) if m.iter().any(|m| m == sasl::SCRAM_SHA_256) => {
                Some(AuthMethod::ScramSha256)
            }
            _ => None,
        }
    }
}

/// What the gateway does after one Authentication request.
#[derive(Debug)]
pub enum AuthStep {
    /// Send this answer.
    Send(BytesMut),
    /// Nothing to send; the target speaks next.
    Wait,
    /// Logged in, with this method.
    LoggedIn(AuthMethod),
}

enum AuthState {
    /// No request yet.
    Start,
    /// Answered a password request; the next is the verdict.
    Answered(AuthMethod),
    /// In a SCRAM exchange, the server's signature not verified yet.
    Scram(Box<sasl::ScramSha256>),
    /// The server proved it knows the password.
    ScramVerified,
    /// AuthenticationOk came.
    LoggedIn,
}

/// The gateway's side of the login exchange, without I/O: fed the target's Authentication
/// requests in order, it answers each, or says why it will not. Whether a request may be
/// answered is decided before anything is derived from the password.
pub struct Authenticator<'a> {
    allowed: &'a [AuthMethod],
    user: &'a str,
    password: Option<&'a str>,
    state: AuthState,
}

impl<'a> Authenticator<'a> {
    pub fn new(allowed: &'a [AuthMethod], user: &'a str, password: Option<&'a str>) -> Self {
        Self {
            allowed,
            user,
            password,
            state: AuthState::Start,
        }
    }

    pub fn step(&mut self, request: &AuthRequest) -> Result<AuthStep, UpstreamError> {
        match (request, &mut self.state) {
            (_, AuthState::LoggedIn) => Err(UpstreamError::AuthAgain),
            (AuthRequest::Ok, AuthState::Start) => {
                self.permit(AuthMethod::None)?;
                self.state = AuthState::LoggedIn;
                Ok(AuthStep::LoggedIn(AuthMethod::None))
            }
            (AuthRequest::Ok, AuthState::Answered(method)) => {
                let method = *method;
                self.state = AuthState::LoggedIn;
                Ok(AuthStep::LoggedIn(method))
            }
            (AuthRequest::Ok, AuthState::ScramVerified) => {
                self.state = AuthState::LoggedIn;
                Ok(AuthStep::LoggedIn(AuthMethod::ScramSha256))
            }
            // Without the server's signature, a server that does not know the password could
            // pass for the target (and keep the proof to guess the password from).
            (AuthRequest::Ok, AuthState::Scram(_)) => Err(UpstreamError::ScramIncomplete),
            (AuthRequest::SaslContinue(data), AuthState::Scram(scram)) => {
                scram.update(data).map_err(UpstreamError::Scram)?;
                let mut out = BytesMut::new();
                frontend::sasl_response(scram.message(), &mut out)
                    .map_err(UpstreamError::Connect)?;
                Ok(AuthStep::Send(out))
            }
            (AuthRequest::SaslFinal(data), AuthState::Scram(scram)) => {
                scram.finish(data).map_err(UpstreamError::Scram)?;
                self.state = AuthState::ScramVerified;
                Ok(AuthStep::Wait)
            }
            (AuthRequest::SaslContinue(_) | AuthRequest::SaslFinal(_), _) => {
                Err(UpstreamError::Unexpected('R'))
            }
            (AuthRequest::Other(code), _) => Err(UpstreamError::Unsupported(match code {
                2 => "Kerberos V5 authentication".into(),
                7 => "GSSAPI authentication".into(),
                9 => "SSPI authentication".into(),
                other => format!("authentication method {other}"),
            })),
            (AuthRequest::Sasl(mechanisms), AuthState::Start) if request.method().is_none() => Err(
                UpstreamError::Unsupported(format!("SASL {}", mechanisms.join(", "))),
            ),
            (
                AuthRequest::Cleartext | AuthRequest::Md5(_) | AuthRequest::Sasl(_),
                AuthState::Start,
            ) => self.open(request),
            (AuthRequest::Cleartext | AuthRequest::Md5(_) | AuthRequest::Sasl(_), _) => {
                Err(UpstreamError::AuthAgain)
            }
        }
    }

    fn permit(&self, asked: AuthMethod) -> Result<(), UpstreamError> {
        if self.allowed.contains(&asked) {
            Ok(())
        } else {
            Err(UpstreamError::NotAllowed {
                asked,
                allowed: self.allowed.to_vec(),
            })
        }
    }

    /// Answers a request for a password (cleartext, md5, SCRAM), if its method is allowed.
    fn open(&mut self, request: &AuthRequest) -> Result<AuthStep, UpstreamError> {
        let method = request.method().ok_or(UpstreamError::Unexpected('R'))?;
        self.permit(method)?;
        let password = self.password.ok_or(UpstreamError::NoPassword)?;
        let mut out = BytesMut::new();
        match request {
            AuthRequest::Cleartext => {
                frontend::password_message(password.as_bytes(), &mut out)
                    .map_err(UpstreamError::Connect)?;
            }
            AuthRequest::Md5(salt) => {
                let hash = md5_hash(self.user.as_bytes(), password.as_bytes(), *salt);
                frontend::password_message(hash.as_bytes(), &mut out)
                    .map_err(UpstreamError::Connect)?;
            }
            _ => {
                let scram = sasl::ScramSha256::new(
                    password.as_bytes(),
                    sasl::ChannelBinding::unsupported(),
                );
                frontend::sasl_initial_response(sasl::SCRAM_SHA_256, scram.message(), &mut out)
                    .map_err(UpstreamError::Connect)?;
                self.state = AuthState::Scram(Box::new(scram));
                return Ok(AuthStep::Send(out));
            }
        }
        self.state = AuthState::Answered(method);
        Ok(AuthStep::Send(out))
    }
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
    /// How the gateway authenticated.
    pub method: AuthMethod,
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

    let mut auth = Authenticator::new(&pg.auth, user, password);
    let mut method = None;
    let mut greeting = Vec::new();
    let mut backend_key = None;
    loop {
        let Frame { tag, body, raw } = reader.next().await?.ok_or(UpstreamError::Closed)?;
        match tag {
            b'R' => match auth.step(&AuthRequest::parse(&body)?)? {
                AuthStep::Send(out) => writer
                    .write_all(&out)
                    .await
                    .map_err(UpstreamError::Connect)?,
                AuthStep::Wait => {}
                AuthStep::LoggedIn(m) => method = Some(m),
            },
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
                // Ready before AuthenticationOk: the target skipped authentication.
                let method = method.ok_or(UpstreamError::Unexpected('Z'))?;
                return Ok(Upstream {
                    reader,
                    writer,
                    tls,
                    greeting,
                    backend_key,
                    method,
                });
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

#[cfg(test)]
mod tests;
