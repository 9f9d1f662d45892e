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
            b'S' | b'N' => greeting.push(raw),
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
mod tests {
    use super::*;
    use crate::config::TargetKind;

    const PASSWORD: &str = "held-secret";

    /// One request to a fresh login as `app` holding [`PASSWORD`], `allowed` methods.
    fn first_step(
        allowed: &[AuthMethod],
        request: &AuthRequest,
    ) -> Result<AuthStep, UpstreamError> {
        Authenticator::new(allowed, "app", Some(PASSWORD)).step(request)
    }

    fn sasl(mechanisms: &[&str]) -> AuthRequest {
        AuthRequest::Sasl(mechanisms.iter().map(ToString::to_string).collect())
    }

    #[test]
    fn a_request_is_answered_only_when_its_method_is_allowed() {
        use AuthMethod::{Md5, None as NoAuth, Password, ScramSha256};
        let default = PostgresTarget::default().auth;
        assert_eq!(default, [ScramSha256]);
        let scram = sasl(&["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"]);
        // (request, allowed, the method it asks for, answered?)
        let cases: &[(AuthRequest, &[AuthMethod], AuthMethod, bool)] = &[
            (AuthRequest::Cleartext, &default, Password, false),
            (AuthRequest::Cleartext, &[ScramSha256, Md5], Password, false),
            (AuthRequest::Cleartext, &[Password], Password, true),
            (AuthRequest::Md5(*b"salt"), &default, Md5, false),
            (AuthRequest::Md5(*b"salt"), &[Password], Md5, false),
            (AuthRequest::Md5(*b"salt"), &[ScramSha256, Md5], Md5, true),
            (AuthRequest::Ok, &default, NoAuth, false),
            (
                AuthRequest::Ok,
                &[ScramSha256, Md5, Password],
                NoAuth,
                false,
            ),
            (AuthRequest::Ok, &[NoAuth], NoAuth, true),
            (scram.clone(), &default, ScramSha256, true),
            (scram.clone(), &[Md5, Password, NoAuth], ScramSha256, false),
        ];
        for (request, allowed, asked, answered) in cases {
            let step = first_step(allowed, request);
            match step {
                Ok(AuthStep::Send(out)) if *answered => {
                    let carries_password = out
                        .windows(PASSWORD.len())
                        .any(|w| w == PASSWORD.as_bytes());
                    assert_eq!(carries_password, *asked == Password, "{request:?}: {out:?}");
                }
                Ok(AuthStep::LoggedIn(m)) if *answered => assert_eq!(m, *asked),
                Err(UpstreamError::NotAllowed {
                    asked: a,
                    allowed: al,
                }) if !answered => {
                    assert_eq!((a, al.as_slice()), (*asked, *allowed), "{request:?}");
                }
                other => panic!("{request:?} under {allowed:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn a_refusal_names_what_the_server_asked_for_what_is_allowed_and_the_key() {
        let e = first_step(&[AuthMethod::ScramSha256], &AuthRequest::Md5(*b"salt")).unwrap_err();
        assert_eq!(
            e.to_string(),
            "the server asked for md5 authentication (\"md5\"), which the target's postgres.auth \
             (\"scram-sha-256\") does not allow; the gateway sent nothing derived from the \
             password (to allow it, add \"md5\" to postgres.auth)"
        );
        assert_eq!(e.recorded_method(), "md5 (refused: not in postgres.auth)");
        assert_eq!(e.sqlstate(), "28000");
        assert_eq!(
            e.outcome("db"),
            Outcome::Refused {
                reason: format!("target db: {e}")
            }
        );
        let e = first_step(&[AuthMethod::Md5, AuthMethod::Password], &AuthRequest::Ok).unwrap_err();
        assert!(
            e.to_string()
                .contains("no authentication at all (\"none\")")
                && e.to_string().contains("(\"md5\", \"password\")"),
            "{e}"
        );
    }

    #[test]
    fn methods_the_gateway_lacks_are_unsupported_whatever_is_allowed() {
        let all = AuthMethod::ALL;
        for (request, named) in [
            (sasl(&["SCRAM-SHA-256-PLUS"]), "SASL SCRAM-SHA-256-PLUS"),
            (AuthRequest::Other(7), "GSSAPI"),
            (AuthRequest::Other(9), "SSPI"),
            (AuthRequest::Other(2), "Kerberos"),
            (AuthRequest::Other(6), "authentication method 6"),
        ] {
            match first_step(&all, &request) {
                Err(UpstreamError::Unsupported(m)) => assert!(m.contains(named), "{m}"),
                other => panic!("{request:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn an_allowed_method_needs_a_held_password_and_md5_does_not_send_it() {
        let mut auth = Authenticator::new(&[AuthMethod::Md5], "app", None);
        assert!(matches!(
            auth.step(&AuthRequest::Md5(*b"salt")),
            Err(UpstreamError::NoPassword)
        ));
        let mut auth = Authenticator::new(&[AuthMethod::Md5], "app", Some(PASSWORD));
        let Ok(AuthStep::Send(out)) = auth.step(&AuthRequest::Md5(*b"salt")) else {
            panic!("md5 allowed")
        };
        let hash = md5_hash(b"app", PASSWORD.as_bytes(), *b"salt");
        assert!(out.ends_with(format!("{hash}\0").as_bytes()), "{out:?}");
        assert!(matches!(
            auth.step(&AuthRequest::Ok),
            Ok(AuthStep::LoggedIn(AuthMethod::Md5))
        ));
    }

    #[test]
    fn one_method_per_login_and_nothing_after_authentication_ok() {
        let all = AuthMethod::ALL;
        let mut auth = Authenticator::new(&all, "app", Some(PASSWORD));
        assert!(matches!(
            auth.step(&AuthRequest::Md5(*b"salt")),
            Ok(AuthStep::Send(_))
        ));
        // Answered with a hash, then asked for the password itself: no.
        assert!(matches!(
            auth.step(&AuthRequest::Cleartext),
            Err(UpstreamError::AuthAgain)
        ));
        let mut auth = Authenticator::new(&all, "app", Some(PASSWORD));
        assert!(matches!(
            auth.step(&AuthRequest::Ok),
            Ok(AuthStep::LoggedIn(AuthMethod::None))
        ));
        assert!(matches!(
            auth.step(&AuthRequest::Cleartext),
            Err(UpstreamError::AuthAgain)
        ));
        let mut auth = Authenticator::new(&all, "app", Some(PASSWORD));
        assert!(matches!(
            auth.step(&AuthRequest::SaslFinal(Bytes::from_static(b"v=x"))),
            Err(UpstreamError::Unexpected('R'))
        ));
    }

    /// A server that starts SCRAM, takes the client's proof and then says AuthenticationOk
    /// without its signature has not shown it knows the password: refused, even where
    /// "none" is allowed.
    #[test]
    fn a_scram_exchange_must_end_with_the_servers_signature() {
        for allowed in [&[AuthMethod::ScramSha256][..], &AuthMethod::ALL] {
            let mut auth = Authenticator::new(allowed, "app", Some(PASSWORD));
            let Ok(AuthStep::Send(first)) = auth.step(&sasl(&["SCRAM-SHA-256"])) else {
                panic!("SCRAM is allowed")
            };
            let at = first
                .windows(2)
                .position(|w| w == b"r=")
                .expect("client nonce");
            let nonce = String::from_utf8(first[at + 2..].to_vec()).unwrap();
            let server_first = format!("r={nonce}impostor,s=c2FsdHNhbHQ=,i=4096");
            let Ok(AuthStep::Send(proof)) =
                auth.step(&AuthRequest::SaslContinue(Bytes::from(server_first)))
            else {
                panic!("the client's final message")
            };
            assert!(proof.windows(2).any(|w| w == b"p="), "{proof:?}");
            assert!(
                matches!(
                    auth.step(&AuthRequest::Ok),
                    Err(UpstreamError::ScramIncomplete)
                ),
                "{allowed:?}"
            );
        }
    }

    #[test]
    fn authentication_requests_parse_and_short_ones_are_malformed() {
        let msg = |code: i32, rest: &[u8]| [&code.to_be_bytes()[..], rest].concat();
        assert_eq!(AuthRequest::parse(&msg(0, b"")).unwrap(), AuthRequest::Ok);
        assert_eq!(
            AuthRequest::parse(&msg(3, b"")).unwrap(),
            AuthRequest::Cleartext
        );
        assert_eq!(
            AuthRequest::parse(&msg(5, b"abcd")).unwrap(),
            AuthRequest::Md5(*b"abcd")
        );
        assert_eq!(
            AuthRequest::parse(&msg(10, b"SCRAM-SHA-256-PLUS\0SCRAM-SHA-256\0\0")).unwrap(),
            sasl(&["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"])
        );
        assert_eq!(
            AuthRequest::parse(&msg(7, b"")).unwrap(),
            AuthRequest::Other(7)
        );
        assert!(AuthRequest::parse(&msg(5, b"abc")).is_err());
        assert!(AuthRequest::parse(b"\0\0").is_err());
    }

    fn target(addresses: &[&str], pg: PostgresTarget) -> Target {
        Target {
            name: "orders-db".into(),
            addresses: addresses.iter().map(|a| a.parse().unwrap()).collect(),
            credentials: None,
            kind: TargetKind::Postgres(pg),
        }
    }

    #[test]
    fn held_credentials_go_only_to_the_sockets_a_target_names() {
        let pg = PostgresTarget::default();
        let t = target(&["10.30.0.5:5432", "10.30.0.0/24"], pg.clone());
        let refusal = |t: &Target, pg: &PostgresTarget, dst: &str| {
            network_refusal(t, pg, OrigDstAddr(dst.parse().unwrap()))
        };
        assert_eq!(refusal(&t, &pg, "10.30.0.5:5432"), None);
        assert_eq!(refusal(&t, &pg, "[::ffff:10.30.0.5]:5432"), None);
        let message = refusal(&t, &pg, "10.30.0.7:5432").expect("another host in the network");
        for part in [
            "target orders-db: ",
            "10.30.0.7:5432",
            "10.30.0.0/24",
            "postgres.login_to_network = true",
        ] {
            assert!(message.contains(part), "{part:?} in {message}");
        }
        assert!(refusal(&t, &pg, "10.30.0.5:6432").is_some(), "another port");
        let opted = PostgresTarget {
            login_to_network: true,
            ..PostgresTarget::default()
        };
        let t = target(&["10.30.0.0/24"], opted.clone());
        assert_eq!(refusal(&t, &opted, "10.30.0.7:5432"), None);
    }
}
