//! The HTTP(S) gateway: accept → identify → decide → forward → record, per request.
//!
//! The client's connection is served by hyper (HTTP/1.1 or HTTP/2, plain or TLS terminated
//! with a leaf the local CA mints for the server name the client asked for, ALPN choosing the
//! version). Each request is read once ([`request::normalise`]: ambiguous ones are refused with
//! 400), judged ([`judge::Judgement`]: the one place an HTTP target and a Kubernetes target
//! differ) through [`Conn::decide`], and, when allowed, re-serialised by the gateway's own
//! client connection to the target ([`upstream`]) with the held credential headers set. The
//! target's answer streams back untouched in content ([`body`]), counted, and is recorded when
//! it ends. A denied request is answered 403 with a JSON body naming the rule and its message.
//!
//! hyper's service must be `'static`, and a [`Conn`] borrows the gateway: the service only
//! hands each request to this connection's own task, which decides and forwards it (several at
//! once for HTTP/2) and hands the answer back.

mod body;
mod framing;
mod headers;
pub mod judge;
mod lanes;
mod memo;
mod passthrough;
mod refuse;
pub mod request;
pub mod settings;
mod tunnel;
mod upstream;

use std::{
    convert::Infallible,
    future::Future as _,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    task::Poll,
    time::Duration,
};

use futures_util::{stream::FuturesUnordered, StreamExt as _};
use hyper::{
    body::Incoming,
    header::{self, HeaderValue},
    service::service_fn,
    Method, Request, Response, StatusCode,
};
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::conn::auto,
};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
    sync::{mpsc, oneshot},
    time::Instant,
};

use self::{
    body::{Finish, Meter, ProxyBody, Tap, Totals},
    headers::{forwarded_headers, injected_headers, strip_hop_by_hop, Injected},
    judge::{Flavor, Judgement},
    settings::{ClientTls, UpstreamScheme},
    upstream::{ClientConfigs, Upstream},
};
pub use self::{refuse::refuse, upstream::SYSTEM_ROOTS};
use super::session::Conn;
use crate::{
    config::TargetKind,
    record::{now_micros, EventKind, Outcome, RecordedVerdict, SessionEnd},
};

/// How long a client may take to send a request's head (and, on a new connection, its first
/// request or TLS hello): slow clients are closed.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest request head (HTTP/1.1 read buffer; HTTP/2 header list).
pub const MAX_HEAD_BYTES: usize = 64 * 1024;
/// The most header fields in one HTTP/1.1 request: hyper's own default, which its HTTP/1
/// builders keep when `max_headers` is not called. Calling it (even with 100) makes hyper fill
/// two 100-entry header arrays for every head it parses, both legs (docs/BENCHMARKS.md); the
/// limit is pinned by a test (`exactly_max_headers_fields_are_served_one_more_is_431`).
pub const MAX_HEADERS: usize = 100;
/// The most HTTP/2 streams in flight on one connection.
pub const MAX_STREAMS: u32 = 64;

/// How long a client may take to close its HTTP/2 connection after the idle GOAWAY.
const H2_GOAWAY_GRACE: Duration = Duration::from_secs(5);

/// The class requests are recorded with.
const HTTP_CLASS: &str = "http";

/// The HTTP gateway's state shared by all its sessions.
#[derive(Default)]
pub struct Shared {
    /// TLS client configurations toward targets (system roots read once).
    client_configs: ClientConfigs,
}

impl Shared {
    /// Drops the upstream TLS configurations built so far (see [`ClientConfigs::clear`]).
    pub fn forget_upstream_tls(&self) {
        self.client_configs.clear();
    }
}

fn ended(totals: &Totals, outcome: Outcome) -> SessionEnd {
    use std::sync::atomic::Ordering;
    SessionEnd {
        ended_at_us: now_micros(),
        bytes_to_target: totals.up.load(Ordering::Relaxed),
        bytes_from_target: totals.down.load(Ordering::Relaxed),
        outcome,
    }
}

fn failed(error: impl Into<String>) -> SessionEnd {
    ended(
        &Totals::default(),
        Outcome::Failed {
            error: error.into(),
        },
    )
}

/// Serves one HTTP(S) connection that the policy let through.
pub async fn serve(conn: &Conn<'_>, shared: &Shared, client: TcpStream) -> SessionEnd {
    let Some(target) = conn.target.target else {
        return failed("an HTTP session needs a configured target");
    };
    let (flavor, settings) = match &target.kind {
        TargetKind::Http(s) => (Flavor::Http, s),
        TargetKind::Kubernetes(s) => (Flavor::Kubernetes, s),
        _ => return failed("not an HTTP target"),
    };
    let _ = client.set_nodelay(true);
    let mut first = [0u8; 1];
    match tokio::time::timeout(HEADER_TIMEOUT, client.peek(&mut first)).await {
        Ok(Ok(n)) if n > 0 => {}
        Ok(Ok(_)) => return ended(&Totals::default(), Outcome::Closed),
        Ok(Err(e)) => return failed(format!("client: {e}")),
        Err(_) => {
            return failed(format!(
                "client: nothing sent within {}s",
                HEADER_TIMEOUT.as_secs()
            ))
        }
    }
    // A TLS record starts with 0x16 (handshake); no HTTP method does.
    let client_tls = first[0] == 0x16;
    if client_tls && settings.tls == ClientTls::Passthrough {
        return passthrough::serve(conn, client).await;
    }
    let upstream_tls = match settings.upstream {
        UpstreamScheme::Same => client_tls,
        UpstreamScheme::Http => false,
        UpstreamScheme::Https => true,
    };
    let tls_config = if upstream_tls {
        match shared.client_configs.get(&target.name, settings) {
            Ok(c) => Some(c),
            Err(e) => return failed(format!("TLS to the target: {e}")),
        }
    } else {
        None
    };
    let mut session = Session {
        conn,
        flavor,
        upstream: Upstream::new(conn.destination, tls_config, settings.h2c),
        injected: injected_headers(settings),
        totals: Arc::default(),
        tls: client_tls,
        server_name: None,
        tunnels: std::sync::Mutex::default(),
        h2_idle: settings.idle_timeout.unwrap_or(settings::H2_IDLE_TIMEOUT),
        memo: memo::DecisionMemo::new(memo::CAPACITY),
    };
    if !client_tls {
        let maybe_h2 = is_h2c(&client).await;
        session.upstream.offer_h2(maybe_h2);
        return session.serve_connection(client, maybe_h2).await;
    }
    let Some(ca) = conn.gw.tls.as_deref() else {
        return failed("client TLS: the gateway has no local CA");
    };
    let acceptor =
        tokio_rustls::LazyConfigAcceptor::new(rustls::server::Acceptor::default(), client);
    let start = match tokio::time::timeout(HEADER_TIMEOUT, acceptor).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return failed(format!("client TLS: {e}")),
        Err(_) => return failed("client TLS: no ClientHello in time"),
    };
    let server_name = start.client_hello().server_name().map(str::to_string);
    let config = match ca.http_server_config(server_name.as_deref(), conn.destination.0.ip()) {
        Ok(c) => c,
        Err(e) => return failed(format!("client TLS: {e}")),
    };
    let stream = match tokio::time::timeout(HEADER_TIMEOUT, start.into_stream(config)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return failed(format!("client TLS: {e}")),
        Err(_) => return failed("client TLS: handshake not finished in time"),
    };
    session.server_name = server_name;
    // Anything but an ALPN choice of HTTP/1.1 goes through hyper's version detection.
    // HTTP/2 over TLS is chosen by ALPN (RFC 9113 §3.2); a client that offered none speaks
    // HTTP/1.1 and gets its framing checked like any other (wrk, Python's ssl, openssl s_client).
    let maybe_h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
    session.upstream.offer_h2(maybe_h2);
    session.serve_connection(stream, maybe_h2).await
}

/// The HTTP/2 connection preface a prior-knowledge (h2c) client starts with.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Whether a plain connection is prior-knowledge HTTP/2: the client's first bytes are the
/// whole preface. While what arrived is still a prefix of it (a request line sent a byte at a
/// time starts `P` too), it waits for more, up to [`HEADER_TIMEOUT`]: the any-version server's
/// HTTP/1 side has no framing checks, so only a complete preface may reach it. Anything else,
/// errors included, is served as HTTP/1.1 with its framing checked.
async fn is_h2c(client: &TcpStream) -> bool {
    let mut head = [0u8; H2_PREFACE.len()];
    let deadline = tokio::time::Instant::now() + HEADER_TIMEOUT;
    loop {
        match client.peek(&mut head).await {
            Ok(n) if n > 0 && head[..n] == H2_PREFACE[..n] => {
                if n == head.len() {
                    return true;
                }
            }
            _ => return false,
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        // Only a client that sends its first bytes in pieces gets here.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A request handed from hyper's service to the connection's task, and where its answer goes.
struct Job {
    req: Request<Incoming>,
    reply: oneshot::Sender<Response<ProxyBody>>,
}

struct Session<'c, 'g> {
    conn: &'c Conn<'g>,
    flavor: Flavor,
    upstream: Upstream,
    injected: Result<Injected, String>,
    totals: Arc<Totals>,
    /// The client spoke TLS to the gateway.
    tls: bool,
    /// The server name the client's TLS hello asked for.
    server_name: Option<String>,
    /// Upgraded streams (Kubernetes exec, attach, port-forward) still relayed: the session
    /// ends when they do.
    tunnels: std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>,
    /// How long an HTTP/2 connection may stay with nothing in flight.
    h2_idle: Duration,
    /// Decisions on requests already judged in this session.
    memo: memo::DecisionMemo,
}

impl Session<'_, '_> {
    /// Serves the client's connection to its end: HTTP/1.1 served here, borrowing the
    /// session; a connection that is (or may be) HTTP/2 through hyper's version detection,
    /// whose streams run on spawned tasks and reach the session through a channel.
    async fn serve_connection<S>(&self, io: S, maybe_h2: bool) -> SessionEnd
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let result = if maybe_h2 {
            self.serve_any_version(io).await
        } else {
            self.serve_http1(io).await
        };
        let tunnels = std::mem::take(
            &mut *self
                .tunnels
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        for t in tunnels {
            let _ = t.await;
        }
        let outcome = match result {
            Ok(()) => Outcome::Closed,
            Err(error) => Outcome::Failed { error },
        };
        ended(&self.totals, outcome)
    }

    /// HTTP/1.1: hyper's service borrows the session and answers each request in place (no
    /// task or channel per request). The client's bytes are read alongside for framing hyper
    /// would settle silently ([`framing`]): such a request, and any after it, is answered 400.
    async fn serve_http1<S>(&self, io: S) -> Result<(), String>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let framing = Arc::new(framing::Framing::default());
        let io = framing::Sniffed::new(io, Arc::clone(&framing));
        let requests = AtomicU64::new(0);
        let service = service_fn(|req: Request<Incoming>| {
            // hyper calls the service once per request, in the connection's order.
            let nth = requests.fetch_add(1, Ordering::Relaxed) + 1;
            let refused = framing.refused(nth);
            async move {
                Ok::<_, Infallible>(match refused {
                    Some(r) => self.refuse_framing(&req, r.why),
                    None => self.answer(req).await,
                })
            }
        });
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_TIMEOUT)
            .max_buf_size(MAX_HEAD_BYTES);
        let connection = builder
            .serve_connection(TokioIo::new(io), service)
            .with_upgrades();
        tokio::pin!(connection);
        // hyper's header timeout starts at a request's first byte; this one covers a client
        // that never completes a first request.
        let first_request = tokio::time::sleep(HEADER_TIMEOUT);
        tokio::pin!(first_request);
        // The client's connection, the connections to the target, the first-request timer:
        // each polled only when its own waker fired ([`lanes`]), so the hand-overs between
        // the two connections do not wake the task.
        let lanes = lanes::Lanes::new(3);
        std::future::poll_fn(|cx| {
            lanes.poll(cx, |lane, cx| match lane {
                0 => connection.as_mut().poll(cx).map_err(|e| e.to_string()),
                1 => self.upstream.driver.poll_drive(cx).map(Ok),
                _ => match first_request.as_mut().poll(cx) {
                    Poll::Ready(()) if requests.load(Ordering::Relaxed) == 0 => Poll::Ready(Err(
                        format!("client: no request within {}s", HEADER_TIMEOUT.as_secs()),
                    )),
                    // Fired once, never polled again (nothing wakes this lane).
                    _ => Poll::Pending,
                },
            })
        })
        .await
    }

    /// A connection chosen as HTTP/2 (ALPN `h2`, or the whole preface). hyper-util's server
    /// would still serve HTTP/1 on it if the client spoke that instead (ALPN `h2`, then a
    /// request line), without the framing checks: such a request is refused.
    async fn serve_any_version<S>(&self, io: S) -> Result<(), String>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (tx, mut rx) = mpsc::channel::<Job>(MAX_STREAMS as usize);
        let service = service_fn(move |req: Request<Incoming>| {
            let tx = tx.clone();
            async move {
                if req.version() != hyper::Version::HTTP_2 {
                    return Ok::<_, Infallible>(gateway_error(
                        StatusCode::BAD_REQUEST,
                        "HTTP/1 on a connection that chose HTTP/2",
                    ));
                }
                let (reply, answer) = oneshot::channel();
                if tx.send(Job { req, reply }).await.is_err() {
                    return Ok::<_, Infallible>(gateway_error(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "the session is ending",
                    ));
                }
                Ok(answer.await.unwrap_or_else(|_| {
                    gateway_error(StatusCode::BAD_GATEWAY, "the request was dropped")
                }))
            }
        });
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_TIMEOUT)
            .max_buf_size(MAX_HEAD_BYTES);
        builder
            .http2()
            .timer(TokioTimer::new())
            .max_header_list_size(u32::try_from(MAX_HEAD_BYTES).unwrap_or(u32::MAX))
            .max_concurrent_streams(MAX_STREAMS)
            .max_pending_accept_reset_streams(Some(32))
            .max_local_error_reset_streams(Some(32));
        let connection = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
        tokio::pin!(connection);
        let mut in_flight = FuturesUnordered::new();
        // HTTP/1.1's header timeout starts at the first byte; this one covers a client that
        // opens HTTP/2 (or starts a line) and never completes a request.
        let first_request = tokio::time::sleep(HEADER_TIMEOUT);
        tokio::pin!(first_request);
        let mut requests = 0u64;
        // Idle: no request answered or streaming for `h2_idle`; then GOAWAY, and a client that
        // does not close within the grace after it is closed on.
        let idle = tokio::time::sleep(self.h2_idle);
        tokio::pin!(idle);
        let mut goaway_sent = false;
        let result = loop {
            tokio::select! {
                r = &mut connection => break r.map_err(|e| e.to_string()),
                () = self.upstream.driver.run() => {}
                Some(job) = rx.recv() => {
                    requests += 1;
                    in_flight.push(self.exchange(job));
                    if !goaway_sent {
                        idle.as_mut().reset(Instant::now() + self.h2_idle);
                    }
                }
                () = &mut idle => {
                    if goaway_sent {
                        break Ok(());
                    }
                    let busy = !in_flight.is_empty()
                        || self.totals.streaming.load(Ordering::Relaxed) > 0;
                    if busy {
                        idle.as_mut().reset(Instant::now() + self.h2_idle);
                    } else {
                        connection.as_mut().graceful_shutdown();
                        goaway_sent = true;
                        idle.as_mut().reset(Instant::now() + H2_GOAWAY_GRACE);
                    }
                }
                Some(()) = in_flight.next(), if !in_flight.is_empty() => {}
                () = &mut first_request, if requests == 0 => {
                    break Err(format!("client: no request within {}s", HEADER_TIMEOUT.as_secs()));
                }
            }
        };
        result
    }

    async fn exchange(&self, job: Job) {
        let answer = self.answer(job.req).await;
        let _ = job.reply.send(answer);
    }

    /// Reads, judges and forwards one request; the client's answer.
    async fn answer(&self, mut req: Request<Incoming>) -> Response<ProxyBody> {
        let started = Instant::now();
        // Kubernetes exec, attach and port-forward: relayed once the policy allows them.
        let upgrade = (self.flavor == Flavor::Kubernetes)
            .then(|| tunnel::requested(req.headers()))
            .flatten()
            .map(|u| (u, hyper::upgrade::on(&mut req)));
        let (mut parts, body) = req.into_parts();
        let norm = match request::normalise(
            &parts.method,
            &parts.uri,
            parts.version,
            &parts.headers,
            self.tls,
            self.server_name.as_deref(),
        ) {
            Ok(n) => n,
            Err(bad) => return self.refuse_ambiguous(&parts.method, &parts.uri, &bad),
        };
        let judged = Judgement::of(self.flavor, &norm);
        let text = norm.text();
        let (decision, rules) = self.decision(&norm, &judged);
        let decided = self
            .conn
            .decide_remembered(decision, rules, &text, Some(HTTP_CLASS.into()))
            .await;
        if let Some(message) = &decided.refusal {
            return self.denied(message, &decided.decision.rules);
        }
        // Judged first, so a denied exec gets its rule's message whichever way it came (kubectl
        // retries a refused WebSocket exec over SPDY); an allowed one the gateway could not
        // record (SPDY, base64 subprotocols) is refused here. An upgrade the gateway could not
        // read as a Kubernetes request (a policy that allows unknowns) may be an exec: it is
        // treated as one.
        let terminal = match &judged {
            Judgement::Kube(info) => tunnel::is_terminal(&info.action()),
            Judgement::Http | Judgement::Unknown(_) => true,
        };
        if let (Some((value, _)), true) = (&upgrade, terminal) {
            if let Some(why) = tunnel::unrecordable(value, &parts.headers) {
                return self.refuse_unrecordable(&text, why);
            }
        }
        let injected = match &self.injected {
            Ok(h) => h,
            Err(e) => {
                self.record_failure(decided.request, started, e.clone());
                return gateway_error(
                    StatusCode::BAD_GATEWAY,
                    "the gateway cannot read the credential it holds for this target",
                );
            }
        };
        // From here the request is on its way: if its future is dropped before an answer is
        // recorded (the client went away), the guard records that.
        let mut unanswered = Unanswered {
            conn: self.conn,
            request: decided.request,
            started,
            armed: true,
        };
        let meter = Meter::new(!is_safe(&norm.method));
        let Some(up) = Self::upstream_request(
            &mut parts,
            Tap::request(body, Arc::clone(&meter), Arc::clone(&self.totals)),
            &norm,
            injected,
        ) else {
            return gateway_error(StatusCode::BAD_REQUEST, "the request target is invalid");
        };
        let sent = match upgrade {
            // Boxed: the rare path's state would otherwise make every request's future larger.
            Some((value, client)) => match Box::pin(self.open_tunnel(
                &norm.host,
                value,
                up,
                client,
                tunnel::Exchange {
                    request: decided.request,
                    started,
                    secrets: Arc::clone(&injected.secrets),
                    terminal,
                },
            ))
            .await
            {
                Ok(tunnel::Opened::Switched(answer)) => {
                    unanswered.armed = false;
                    return answer;
                }
                Ok(tunnel::Opened::Answered(resp)) => Ok(resp),
                Err(e) => Err(e),
            },
            None => self.upstream.send(&norm.host, &norm.authority, up).await,
        };
        unanswered.armed = false;
        self.answered(sent, decided.request, started, meter, &injected.secrets)
    }

    /// The client's answer from the target's (streamed, its result recorded when its body
    /// ends), or the 502 for a target that could not be reached (recorded now).
    fn answered(
        &self,
        sent: Result<Response<Incoming>, upstream::UpstreamError>,
        request: u64,
        started: Instant,
        meter: Arc<Meter>,
        secrets: &Arc<[String]>,
    ) -> Response<ProxyBody> {
        match sent {
            Ok(resp) => {
                let (mut parts, body) = resp.into_parts();
                strip_hop_by_hop(&mut parts.headers);
                parts.version = hyper::Version::default();
                let finish = Finish {
                    store: Arc::clone(&self.conn.gw.store),
                    session: self.conn.session,
                    request,
                    started: started.into_std(),
                    status: parts.status,
                    meter,
                    secrets: Arc::clone(secrets),
                };
                Response::from_parts(
                    parts,
                    ProxyBody::Stream(Tap::response(body, Arc::clone(&self.totals), finish)),
                )
            }
            Err(e) => {
                let error = e.to_string();
                self.record_failure(request, started, error.clone());
                json_answer(
                    StatusCode::BAD_GATEWAY,
                    &serde_json::json!({
                        "error": "bulkhead: the target could not be reached",
                        "reason": error,
                    }),
                )
            }
        }
    }

    /// The policy's decision on a normalised request, and its rules as the request event
    /// shares them. A request that reads as one judged before in this session, under the same
    /// policy, gets that decision ([`memo`]); it is recorded and enforced as any other.
    fn decision(
        &self,
        norm: &request::Normalised,
        judged: &Judgement,
    ) -> (Arc<crate::policy::Decision>, Arc<[String]>) {
        let policy = self.conn.policy();
        if let Some(hit) = self.memo.get(&policy, |shape| shape.is(norm)) {
            return hit;
        }
        let decision = Arc::new(policy.evaluate(&crate::policy::Request {
            target: self.conn.target.policy_ref(),
            identity: &self.conn.identity,
            action: judged.action(norm),
        }));
        let rules: Arc<[String]> = Arc::from(decision.rules.as_slice());
        self.memo
            .put(&policy, memo::Shape::of(norm), &decision, &rules);
        (decision, rules)
    }

    /// The 403 for a refused request: a Kubernetes `Status` kubectl prints, else JSON naming
    /// the rule and its message.
    fn denied(&self, message: &str, rules: &[String]) -> Response<ProxyBody> {
        if self.flavor == Flavor::Kubernetes {
            return json_answer(
                StatusCode::FORBIDDEN,
                &crate::kube::status::forbidden(message, rules),
            );
        }
        json_answer(
            StatusCode::FORBIDDEN,
            &serde_json::json!({
                "error": "bulkhead: denied",
                "message": message,
                "rule": rules.first(),
                "rules": rules,
            }),
        )
    }

    /// The request the target gets: the normalised method and target, the client's headers as
    /// [`forwarded_headers`] leaves them, Host from the judged authority. `None` when the
    /// normalised target does not parse.
    fn upstream_request(
        parts: &mut hyper::http::request::Parts,
        body: Tap,
        norm: &request::Normalised,
        injected: &Injected,
    ) -> Option<Request<Tap>> {
        let mut up = Request::new(body);
        *up.method_mut() = norm.method.clone();
        // The client's own origin-form target when it is already the normalised one (the
        // usual case): no second parse.
        let as_sent = parts.uri.scheme().is_none()
            && parts
                .uri
                .path_and_query()
                .map(hyper::http::uri::PathAndQuery::as_str)
                == Some(norm.path_and_query.as_str());
        *up.uri_mut() = if as_sent {
            std::mem::take(&mut parts.uri)
        } else {
            norm.path_and_query.parse().ok()?
        };
        *up.headers_mut() =
            forwarded_headers(std::mem::take(&mut parts.headers), &injected.headers);
        if let Ok(host) = HeaderValue::from_str(&norm.authority) {
            up.headers_mut().insert(header::HOST, host);
        }
        Some(up)
    }

    /// Records and answers a request refused before judging (400, 414 or 421).
    fn refuse_ambiguous(
        &self,
        method: &Method,
        uri: &hyper::Uri,
        bad: &request::Ambiguous,
    ) -> Response<ProxyBody> {
        let text = format!("{method} {uri}");
        self.conn.record(
            EventKind::request(
                &text,
                Some(HTTP_CLASS.into()),
                RecordedVerdict::Deny,
                Vec::new(),
            )
            .with_error(format!("ambiguous request refused: {bad}")),
        );
        let status = StatusCode::from_u16(bad.status()).unwrap_or(StatusCode::BAD_REQUEST);
        json_answer(
            status,
            &serde_json::json!({
                "error": "bulkhead: ambiguous request refused",
                "reason": bad.to_string(),
            }),
        )
    }

    /// Records and answers 403 an exec or attach whose stream could not be recorded
    /// ([`tunnel::unrecordable`] says why).
    fn refuse_unrecordable(&self, text: &str, why: &str) -> Response<ProxyBody> {
        self.conn.record(
            EventKind::request(
                text,
                Some(HTTP_CLASS.into()),
                RecordedVerdict::Deny,
                Vec::new(),
            )
            .with_error(format!("bulkhead: {why}")),
        );
        json_answer(
            StatusCode::FORBIDDEN,
            &crate::kube::status::forbidden(why, &[]),
        )
    }

    /// Records and answers 400 a request whose framing the client's bytes left ambiguous
    /// ([`framing`]), or 431 one whose head is longer than the gateway reads, closing the
    /// connection: what follows it cannot be read reliably.
    fn refuse_framing(&self, req: &Request<Incoming>, why: &str) -> Response<ProxyBody> {
        let text = format!("{} {}", req.method(), req.uri());
        self.conn.record(
            EventKind::request(
                &text,
                Some(HTTP_CLASS.into()),
                RecordedVerdict::Deny,
                Vec::new(),
            )
            .with_error(format!("ambiguous request refused: {why}")),
        );
        let (status, error) = if why == framing::HEAD_TOO_LARGE {
            (
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "bulkhead: request head too large",
            )
        } else {
            (
                StatusCode::BAD_REQUEST,
                "bulkhead: ambiguous request refused",
            )
        };
        let mut resp = json_answer(
            status,
            &serde_json::json!({ "error": error, "reason": why }),
        );
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        resp
    }

    fn record_failure(&self, request: u64, started: Instant, error: String) {
        self.conn.record(EventKind::Response {
            request,
            duration_us: u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
            summary: None,
            error: Some(error),
            masked_rows: None,
            mask_rules: Vec::new(),
        });
    }
}

/// Records the `response` event of an allowed request whose answer never came (its future
/// dropped: the client closed the connection first), unless disarmed.
struct Unanswered<'c, 'g> {
    conn: &'c Conn<'g>,
    request: u64,
    started: Instant,
    armed: bool,
}

impl Drop for Unanswered<'_, '_> {
    fn drop(&mut self) {
        if self.armed {
            self.conn.record(EventKind::Response {
                request: self.request,
                duration_us: u64::try_from(self.started.elapsed().as_micros()).unwrap_or(u64::MAX),
                summary: None,
                error: Some("no answer reached the client (it went away first)".into()),
                masked_rows: None,
                mask_rules: Vec::new(),
            });
        }
    }
}

/// Methods that change nothing at the target: their bodies are not recorded.
fn is_safe(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE
    )
}

fn json_answer(status: StatusCode, body: &serde_json::Value) -> Response<ProxyBody> {
    let mut text = body.to_string();
    text.push('\n');
    let mut resp = Response::new(ProxyBody::full(text));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

fn gateway_error(status: StatusCode, message: &str) -> Response<ProxyBody> {
    json_answer(
        status,
        &serde_json::json!({ "error": format!("bulkhead: {message}") }),
    )
}

#[cfg(test)]
#[path = "tests.rs"]
mod gateway_tests;
