//! The HTTP gateway in process: a mock kernel record, the real accept loop, and a hyper echo
//! server on loopback as the target. Clients write exact bytes.

use std::{convert::Infallible, fmt::Write as _, net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::{body::Incoming, service::service_fn, Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
    sync::watch,
};

use crate::{
    approval::ApprovalBroker,
    config::{Config, Source},
    ebpf::{MockOrigDst, OrigDst},
    identity::ProcReader,
    net::{to_kernel_bytes, ClientAddr},
    policy::PolicyHandle,
    proxy::{serve, Gateway},
    record::{EventKind, ListFilter, Outcome, RecordedVerdict, SessionStore, SledStore},
};

/// A target that answers every request with its method, target and headers (one per line).
async fn echo_target() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(async move {
                let svc = service_fn(|req: Request<Incoming>| async move {
                    let mut text = format!("{} {} {:?}\n", req.method(), req.uri(), req.version());
                    for (k, v) in req.headers() {
                        let _ = writeln!(text, "{k}: {}", v.to_str().unwrap_or("?"));
                    }
                    let body = req.into_body().collect().await.unwrap().to_bytes();
                    let _ = writeln!(text, "body: {}", String::from_utf8_lossy(&body));
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(text))))
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    addr
}

struct Harness {
    gw: Arc<Gateway>,
    listener: SocketAddr,
    orig: Arc<MockOrigDst>,
    policies: tempfile::TempDir,
    _shutdown: watch::Sender<bool>,
}

const POLICY: &str = r#"
[[target]]
name = "api"
protocol = "http"
default = "deny"

[[rule]]
id = "api-read"
verdict = "allow"
target = { name = ["api"] }
http = { method = ["GET", "POST"], path = ["/v1/**"] }

[[rule]]
id = "no-delete"
verdict = "deny"
message = "nothing is deleted through the gateway"
target = { name = ["api"] }
http = { method = ["DELETE"] }

[[rule]]
id = "held"
verdict = "approve"
target = { name = ["api"] }
http = { path = ["/v1/held"] }

[[rule]]
id = "held-briefly"
verdict = "approve"
approval_timeout = "1s"
target = { name = ["api"] }
http = { path = ["/v1/expires"] }
"#;

impl Harness {
    async fn new(target: SocketAddr, secret_env: &str) -> Self {
        Self::with(target, secret_env, "", POLICY).await
    }

    /// An `api` target of `protocol` with `settings` (lines of its `[target.http]`, or of
    /// `[target.kubernetes]`) under `policy`.
    async fn with(target: SocketAddr, secret_env: &str, settings: &str, policy: &str) -> Self {
        Self::build(target, secret_env, "http", settings, policy).await
    }

    async fn build(
        target: SocketAddr,
        secret_env: &str,
        protocol: &str,
        settings: &str,
        policy: &str,
    ) -> Self {
        let config = format!(
            "[[target]]\nname = \"api\"\nprotocol = \"{protocol}\"\naddresses = [\"{target}\"]\n\
             [target.{protocol}]\n{settings}\n\
             [[target.{protocol}.inject]]\nheader = \"authorization\"\nprefix = \"Bearer \"\n\
             credentials = {{ env = \"{secret_env}\" }}\n"
        );
        let config = Config::from_toml(&config, Source::Embedded).unwrap();
        let policies = tempfile::tempdir().unwrap();
        std::fs::write(policies.path().join("api.toml"), policy).unwrap();
        let store: Arc<dyn SessionStore> = Arc::new(SledStore::temporary().unwrap());
        let approvals = Arc::new(ApprovalBroker::new(Arc::clone(&store), config.approvals));
        let orig = Arc::new(MockOrigDst::default());
        let ca_dir = tempfile::tempdir().unwrap();
        let gw = Arc::new(Gateway {
            config: Arc::new(config).into(),
            orig_dst: Arc::clone(&orig) as Arc<dyn OrigDst>,
            store,
            proc: ProcReader::new("/", "/none"),
            stats: Arc::default(),
            policy: PolicyHandle::open(policies.path()).unwrap(),
            approvals,
            tls: Some(Arc::new(
                crate::tls::LocalCa::load_or_create(&ca_dir.path().join("ca")).unwrap(),
            )),
        });
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = watch::channel(false);
        tokio::spawn(serve(listener, Arc::clone(&gw), Arc::default(), rx));
        Self {
            gw,
            listener: addr,
            orig,
            policies,
            _shutdown: tx,
        }
    }

    async fn connect(&self, dst: SocketAddr) -> TcpStream {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let mut comm = [0u8; 16];
        comm[..4].copy_from_slice(b"curl");
        self.orig.insert(
            ClientAddr(socket.local_addr().unwrap()),
            bulkhead_common::ConnectRecord {
                cgroup_id: 1,
                dst_addr: to_kernel_bytes(dst.ip()),
                dst_port: dst.port(),
                family: bulkhead_common::AF_INET,
                pid: std::process::id(),
                tgid: std::process::id(),
                uid: 0,
                gid: 0,
                comm,
                reserved: 0,
            },
        );
        socket.connect(self.listener).await.unwrap()
    }

    /// Sends `raw` on a new connection and reads the answer to the end.
    async fn raw(&self, dst: SocketAddr, raw: &[u8]) -> String {
        let mut s = self.connect(dst).await;
        s.write_all(raw).await.unwrap();
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
            .await
            .expect("the gateway answers and closes")
            .unwrap();
        String::from_utf8_lossy(&out).into_owned()
    }

    async fn events_of_newest(&self) -> Vec<EventKind> {
        for _ in 0..500 {
            if let Some(s) = self.gw.store.list(&ListFilter::default(), 1).unwrap().pop() {
                if s.outcome != Outcome::Open {
                    return self
                        .gw
                        .store
                        .events(s.id)
                        .unwrap()
                        .into_iter()
                        .map(|e| e.kind)
                        .collect();
                }
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("session never closed");
    }
}

#[tokio::test]
async fn allowed_requests_are_forwarded_normalised_with_the_held_header_and_recorded() {
    std::env::set_var("BH_TEST_TOKEN_A", "real-token");
    let target = echo_target().await;
    let h = Harness::new(target, "BH_TEST_TOKEN_A").await;
    let answer = h
        .raw(
            target,
            b"POST /v1/%61b/./../users?x=%2F HTTP/1.1\r\nHost: API.example\r\n\
              Authorization: Bearer dummy\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello",
        )
        .await;
    assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
    assert!(
        answer.contains("POST /v1/users?x=%2F HTTP/1.1\n"),
        "{answer}"
    );
    assert!(
        answer.contains("authorization: Bearer real-token\n"),
        "{answer}"
    );
    assert!(!answer.contains("dummy"), "{answer}");
    assert!(answer.contains("host: api.example\n"), "{answer}");
    assert!(answer.contains("body: hello\n"), "{answer}");
    let events = h.events_of_newest().await;
    let request = events
        .iter()
        .find_map(|e| match e {
            EventKind::Request { text, verdict, .. } => Some((text.clone(), *verdict)),
            _ => None,
        })
        .unwrap();
    assert_eq!(
        request,
        (
            "POST http://api.example/v1/users?x=%2F".to_string(),
            RecordedVerdict::Allow
        )
    );
    let summary = events
        .iter()
        .find_map(|e| match e {
            // A result in a response event, or written into its request.
            EventKind::Response { summary, .. } | EventKind::Request { summary, .. } => {
                summary.clone()
            }
            _ => None,
        })
        .unwrap();
    assert!(summary.starts_with("200 OK, 5 B up"), "{summary}");
    assert!(summary.contains("request body: hello"), "{summary}");
    let all = format!("{events:?}");
    assert!(
        !all.contains("real-token"),
        "the held secret is never recorded"
    );
}

/// The session polls the client's connection and the target's in one task, each woken on its
/// own (`lanes.rs`): a large body each way and a request after it on the same connection must
/// flow without a lost wake-up (which would stall the exchange until the timeout here).
#[tokio::test]
async fn large_bodies_both_ways_and_a_request_after_them_flow_on_one_connection() {
    std::env::set_var("BH_TEST_TOKEN_L", "real-token");
    let target = echo_target().await;
    let h = Harness::new(target, "BH_TEST_TOKEN_L").await;
    let size = 4 << 20;
    let mut raw =
        format!("POST /v1/big HTTP/1.1\r\nHost: api.example\r\nContent-Length: {size}\r\n\r\n")
            .into_bytes();
    raw.extend(std::iter::repeat_n(b'a', size));
    raw.extend_from_slice(
        b"GET /v1/after HTTP/1.1\r\nHost: api.example\r\nConnection: close\r\n\r\n",
    );
    let answer = h.raw(target, &raw).await;
    assert_eq!(
        answer.matches("HTTP/1.1 200 OK\r\n").count(),
        2,
        "{}",
        &answer[..200]
    );
    assert!(
        answer.contains(&"a".repeat(size)),
        "the body came back whole"
    );
    assert!(answer.contains("GET /v1/after HTTP/1.1\n"));
    let events = h.events_of_newest().await;
    let summaries: Vec<String> = events
        .iter()
        .filter_map(|e| match e {
            // A result in a response event, or written into its request.
            EventKind::Response { summary, .. } | EventKind::Request { summary, .. } => {
                summary.clone()
            }
            _ => None,
        })
        .collect();
    assert_eq!(summaries.len(), 2, "{summaries:?}");
    assert!(
        summaries[0].starts_with(&format!("200 OK, {size} B up")),
        "{}",
        &summaries[0][..80]
    );
}

#[tokio::test]
async fn denied_and_ambiguous_requests_never_reach_the_target() {
    std::env::set_var("BH_TEST_TOKEN_B", "real-token");
    let target = echo_target().await;
    let h = Harness::new(target, "BH_TEST_TOKEN_B").await;
    let answer = h
        .raw(
            target,
            b"DELETE /v1/users/1 HTTP/1.1\r\nHost: api\r\nConnection: close\r\n\r\n",
        )
        .await;
    assert!(answer.starts_with("HTTP/1.1 403 Forbidden\r\n"), "{answer}");
    assert!(answer.contains("application/json"), "{answer}");
    assert!(
        answer.contains("\"message\":\"nothing is deleted through the gateway\""),
        "{answer}"
    );
    assert!(answer.contains("\"rule\":\"no-delete\""), "{answer}");

    // Content-Length with Transfer-Encoding: refused 400 (hyper would read it as chunked and
    // drop the length; the gateway reads the framing beside it), the connection closed, so
    // what follows is never read as a request; the target sees none of it.
    let answer = h
        .raw(
            target,
            b"POST /v1/x HTTP/1.1\r\nHost: api\r\nContent-Length: 40\r\nTransfer-Encoding: chunked\r\n\r\n\
              0\r\n\r\nGET /v1/smuggled HTTP/1.1\r\nHost: api\r\n\r\n",
        )
        .await;
    assert_eq!(answer.matches("HTTP/1.1 ").count(), 1, "{answer}");
    assert!(answer.starts_with("HTTP/1.1 400 "), "{answer}");
    assert!(
        answer.contains("both Content-Length and Transfer-Encoding"),
        "{answer}"
    );
    assert!(!answer.contains("smuggled"), "{answer}");
    assert!(
        !answer.contains("body:"),
        "the target was not reached: {answer}"
    );
    for raw in [
        &b"POST /v1/x HTTP/1.1\r\nHost: api\r\nTransfer-Encoding: gzip, chunked\r\nConnection: close\r\n\r\n0\r\n\r\n"[..],
        b"GET /v1/x HTTP/1.1\r\nHost: api\r\nHost: other\r\nConnection: close\r\n\r\n",
        b"GET http://other/v1/x HTTP/1.1\r\nHost: api\r\nConnection: close\r\n\r\n",
        b"POST /v1/x HTTP/1.1\r\nHost: api\r\nX-HTTP-Method-Override: DELETE\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    ] {
        let answer = h.raw(target, raw).await;
        assert!(
            answer.starts_with("HTTP/1.1 400 "),
            "{}: {answer}",
            String::from_utf8_lossy(raw)
        );
        assert!(!answer.contains("real-token"), "{answer}");
    }
    // An encoded slash is unknown: denied (on_unknown), although /v1/** allows GET.
    let answer = h
        .raw(
            target,
            b"GET /v1/a%2Fb HTTP/1.1\r\nHost: api\r\nConnection: close\r\n\r\n",
        )
        .await;
    assert!(answer.starts_with("HTTP/1.1 403 "), "{answer}");
    // Path outside /v1 after normalisation: the default (deny).
    let answer = h
        .raw(
            target,
            b"GET /v1/../admin HTTP/1.1\r\nHost: api\r\nConnection: close\r\n\r\n",
        )
        .await;
    assert!(answer.starts_with("HTTP/1.1 403 "), "{answer}");
    // Too many headers: refused by hyper, the gateway still serves others.
    let mut big = b"GET /v1/x HTTP/1.1\r\nHost: api\r\n".to_vec();
    for i in 0..200 {
        big.extend_from_slice(format!("x-h{i}: v\r\n").as_bytes());
    }
    big.extend_from_slice(b"Connection: close\r\n\r\n");
    let answer = h.raw(target, &big).await;
    assert!(answer.starts_with("HTTP/1.1 431 "), "{answer}");
    let answer = h
        .raw(
            target,
            b"GET /v1/ok HTTP/1.1\r\nHost: api\r\nConnection: close\r\n\r\n",
        )
        .await;
    assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");
}

#[tokio::test]
async fn http2_clients_are_served_over_h2c_and_tls_with_the_name_they_asked_for() {
    std::env::set_var("BH_TEST_TOKEN_C", "real-token");
    let target = echo_target().await;
    let h = Harness::new(target, "BH_TEST_TOKEN_C").await;
    // h2c with prior knowledge.
    let io = TokioIo::new(h.connect(target).await);
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake::<_, _, Full<Bytes>>(TokioExecutor::new(), io)
            .await
            .unwrap();
    tokio::spawn(conn);
    let mut answers = Vec::new();
    for path in ["/v1/a", "/v1/b/../c", "/v1/held-not"] {
        let req = Request::builder()
            .uri(format!("http://api.example{path}"))
            .body(Full::new(Bytes::new()))
            .unwrap();
        answers.push(sender.send_request(req));
    }
    let mut bodies = Vec::new();
    for a in answers {
        let resp = a.await.unwrap();
        assert_eq!(resp.status(), 200);
        bodies.push(String::from_utf8(resp.collect().await.unwrap().to_bytes().to_vec()).unwrap());
    }
    assert!(bodies[1].starts_with("GET /v1/c HTTP/1.1\n"), "{bodies:?}");
    assert!(bodies[0].contains("host: api.example\n"), "{bodies:?}");

    // TLS: the leaf names the server name asked for; ALPN h2.
    let mut roots = rustls::RootCertStore::empty();
    roots.add_parsable_certificates(
        rustls_pki_types::CertificateDer::pem_slice_iter(
            h.gw.tls.as_ref().unwrap().cert_pem().as_bytes(),
        )
        .map(Result::unwrap),
    );
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = h.connect(target).await;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect("api.example".try_into().unwrap(), tcp)
        .await
        .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut sender, conn) = hyper::client::conn::http2::handshake::<_, _, Full<Bytes>>(
        TokioExecutor::new(),
        TokioIo::new(tls),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let ok = sender
        .send_request(
            Request::builder()
                .uri("https://api.example/v1/x")
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await
        .unwrap();
    // Upstream is plain here (a plain target): the scheme follows the client's, so the
    // gateway speaks TLS to an echo server that does not: 502, said in JSON.
    assert_eq!(ok.status(), 502);
    let misdirected = sender
        .send_request(
            Request::builder()
                .uri("https://other.example/v1/x")
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(misdirected.status(), 421);
}

#[tokio::test]
async fn held_requests_wait_for_an_admin_and_expired_ones_are_refused_saying_so() {
    std::env::set_var("BH_TEST_TOKEN_D", "real-token");
    let target = echo_target().await;
    let h = Arc::new(Harness::new(target, "BH_TEST_TOKEN_D").await);
    let held = {
        let h = Arc::clone(&h);
        tokio::spawn(async move {
            h.raw(
                target,
                b"POST /v1/held HTTP/1.1\r\nHost: api\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok",
            )
            .await
        })
    };
    let id = loop {
        if let [one] = h.gw.approvals.list_pending().as_slice() {
            break one.id;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert!(!held.is_finished(), "the client waits");
    h.gw.approvals
        .approve(
            id,
            crate::approval::Approver { uid: 0, user: None },
            None,
            None,
        )
        .unwrap();
    let answer = held.await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");
    assert!(answer.contains("POST /v1/held HTTP/1.1\n"), "{answer}");

    let answer = h
        .raw(
            target,
            b"GET /v1/expires HTTP/1.1\r\nHost: api\r\nConnection: close\r\n\r\n",
        )
        .await;
    assert!(answer.starts_with("HTTP/1.1 403 "), "{answer}");
    assert!(answer.contains("expired"), "{answer}");
    assert!(answer.contains("\"rule\":\"held-briefly\""), "{answer}");
}

#[tokio::test]
async fn bad_http2_frames_end_that_connection_only() {
    std::env::set_var("BH_TEST_TOKEN_E", "real-token");
    let target = echo_target().await;
    let h = Harness::new(target, "BH_TEST_TOKEN_E").await;
    // The preface, then a HEADERS frame on stream 0 (a connection error), then garbage.
    let mut bad = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    bad.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]); // empty SETTINGS
    bad.extend_from_slice(&[0, 0, 3, 1, 5, 0, 0, 0, 0, 0xff, 0xff, 0xff]);
    bad.extend_from_slice(&[0xde; 32]);
    let mut s = h.connect(target).await;
    s.write_all(&bad).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .expect("closed")
        .unwrap();
    // The server's frames: a GOAWAY (type 7) among them, then the end of the connection.
    let mut types = Vec::new();
    let mut rest = &out[..];
    while rest.len() >= 9 {
        let len = usize::from(rest[0]) << 16 | usize::from(rest[1]) << 8 | usize::from(rest[2]);
        types.push(rest[3]);
        rest = &rest[(9 + len).min(rest.len())..];
    }
    assert!(types.contains(&7), "{types:?}");
    let answer = h
        .raw(
            target,
            b"GET /v1/ok HTTP/1.1\r\nHost: api\r\nConnection: close\r\n\r\n",
        )
        .await;
    assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");
}

/// The server's frames in `out` (type, flags, payload), as far as they are whole.
fn h2_frames(out: &[u8]) -> Vec<(u8, u8, Vec<u8>)> {
    let mut frames = Vec::new();
    let mut rest = out;
    while rest.len() >= 9 {
        let len = usize::from(rest[0]) << 16 | usize::from(rest[1]) << 8 | usize::from(rest[2]);
        if rest.len() < 9 + len {
            break;
        }
        frames.push((rest[3], rest[4], rest[9..9 + len].to_vec()));
        rest = &rest[9 + len..];
    }
    frames
}

#[tokio::test]
async fn an_idle_http2_connection_gets_goaway_and_is_closed() {
    std::env::set_var("BH_TEST_TOKEN_I", "real-token");
    let target = echo_target().await;
    let h = Harness::with(target, "BH_TEST_TOKEN_I", "idle_timeout = \"1s\"", POLICY).await;
    let mut s = h.connect(target).await;
    // Prior knowledge: the preface, empty SETTINGS, then `GET /v1/idle` on stream 1 (HPACK:
    // :method GET, :scheme http, :path and :authority as literals with indexed names).
    let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    hello.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
    let block: &[u8] = b"\x82\x86\x44\x08/v1/idle\x41\x03api";
    hello.extend_from_slice(&[0, 0, u8::try_from(block.len()).unwrap(), 1, 5, 0, 0, 0, 1]);
    hello.extend_from_slice(block);
    let started = std::time::Instant::now();
    s.write_all(&hello).await.unwrap();
    // Read to the end, acknowledging SETTINGS and PINGs as a client does (the gateway's
    // graceful GOAWAY waits for a PING's acknowledgement).
    let mut out = Vec::new();
    let mut answered = 0;
    let closed = tokio::time::timeout(Duration::from_secs(15), async {
        let mut buf = vec![0u8; 16384];
        loop {
            let n = s.read(&mut buf).await.unwrap_or(0);
            if n == 0 {
                return;
            }
            out.extend_from_slice(&buf[..n]);
            let frames = h2_frames(&out);
            for (kind, flags, payload) in &frames[answered..] {
                if *kind == 4 && flags & 1 == 0 {
                    s.write_all(&[0, 0, 0, 4, 1, 0, 0, 0, 0]).await.unwrap();
                }
                if *kind == 6 && flags & 1 == 0 {
                    let mut ack = vec![0, 0, 8, 6, 1, 0, 0, 0, 0];
                    ack.extend_from_slice(payload);
                    s.write_all(&ack).await.unwrap();
                }
            }
            answered = frames.len();
        }
    })
    .await;
    assert!(closed.is_ok(), "the idle connection was not closed");
    let elapsed = started.elapsed();
    let frames = h2_frames(&out);
    let kinds: Vec<u8> = frames.iter().map(|f| f.0).collect();
    // HEADERS and DATA of the answer (the request was served), then GOAWAY.
    assert!(kinds.contains(&1) && kinds.contains(&0), "{kinds:?}");
    let goaway = kinds.iter().position(|k| *k == 7).expect("a GOAWAY");
    assert!(
        goaway > kinds.iter().position(|k| *k == 1).unwrap(),
        "{kinds:?}"
    );
    assert!(
        elapsed >= Duration::from_secs(1),
        "closed after {elapsed:?}"
    );
    let data: Vec<u8> = frames
        .iter()
        .filter(|f| f.0 == 0)
        .flat_map(|f| f.2.clone())
        .collect();
    assert!(
        String::from_utf8_lossy(&data).contains("GET /v1/idle "),
        "{}",
        String::from_utf8_lossy(&data)
    );
}

const KUBE_POLICY: &str = r#"
[[target]]
name = "api"
protocol = "kubernetes"
default = "deny"

[[rule]]
id = "everything"
verdict = "allow"
target = { name = ["api"] }
kube = { verb = ["*"], resource = ["*"] }

[[rule]]
id = "no-prod-shells"
verdict = "deny"
message = "no shells in prod"
target = { name = ["api"] }
kube = { resource = ["pods"], subresource = ["exec"], namespace = ["prod"] }
"#;

#[tokio::test]
async fn spdy_exec_is_refused_and_websocket_exec_and_spdy_port_forward_are_relayed() {
    std::env::set_var("BH_TEST_TOKEN_S", "real-token");
    let target = echo_target().await;
    let h = Harness::build(target, "BH_TEST_TOKEN_S", "kubernetes", "", KUBE_POLICY).await;
    let upgrade = |method: &str, sub: &str, proto: &str| {
        format!(
            "{method} /api/v1/namespaces/web/pods/web-1/{sub}?command=ls&stdout=true HTTP/1.1\r\n\
             Host: api\r\nConnection: Upgrade, close\r\nUpgrade: {proto}\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
             X-Stream-Protocol-Version: v4.channel.k8s.io\r\n\r\n"
        )
    };
    // The policy allows every exec; over SPDY it cannot be recorded, so it is refused.
    for (method, sub) in [("POST", "exec"), ("POST", "attach"), ("GET", "exec")] {
        let answer = h
            .raw(target, upgrade(method, sub, "SPDY/3.1").as_bytes())
            .await;
        assert!(answer.starts_with("HTTP/1.1 403 "), "{answer}");
        assert!(answer.contains("\"reason\":\"Forbidden\""), "{answer}");
        assert!(answer.contains("over SPDY cannot be recorded"), "{answer}");
        assert!(!answer.contains("real-token"), "{answer}");
        let events = h.events_of_newest().await;
        assert!(
            events.iter().any(|e| matches!(
                e,
                EventKind::Request { verdict: RecordedVerdict::Deny, error: Some(e), .. }
                    if e.contains("SPDY")
            )),
            "{events:?}"
        );
    }
    // Judged first: a denied exec over SPDY gets its rule's message (kubectl retries a
    // refused WebSocket exec over SPDY, and prints the last answer).
    let denied =
        upgrade("POST", "exec", "SPDY/3.1").replace("/namespaces/web/", "/namespaces/prod/");
    let answer = h.raw(target, denied.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 403 "), "{answer}");
    assert!(answer.contains("no shells in prod"), "{answer}");
    // WebSocket exec and SPDY port-forward reach the target (the echo answers 200 rather than
    // switching protocols, and that answer comes back).
    for (sub, proto) in [("exec", "websocket"), ("portforward", "SPDY/3.1")] {
        let answer = h.raw(target, upgrade("GET", sub, proto).as_bytes()).await;
        assert!(
            answer.starts_with("HTTP/1.1 200 "),
            "{sub} {proto}: {answer}"
        );
        assert!(
            answer.contains(&format!("GET /api/v1/namespaces/web/pods/web-1/{sub}?")),
            "{answer}"
        );
        assert!(
            answer.contains("authorization: Bearer real-token\n"),
            "{answer}"
        );
    }
}

/// The header-field limit is hyper's default, `MAX_HEADERS` (the builders do not set it).
#[tokio::test]
async fn exactly_max_headers_fields_are_served_one_more_is_431() {
    std::env::set_var("BH_TEST_TOKEN_M", "real-token");
    let target = echo_target().await;
    let h = Harness::new(target, "BH_TEST_TOKEN_M").await;
    let head = |fields: usize| {
        // Host and Connection, and the rest `x-h` fields.
        let mut raw = b"GET /v1/x HTTP/1.1\r\nHost: api\r\n".to_vec();
        for i in 0..fields - 2 {
            raw.extend_from_slice(format!("x-h{i}: v\r\n").as_bytes());
        }
        raw.extend_from_slice(b"Connection: close\r\n\r\n");
        raw
    };
    let answer = h.raw(target, &head(super::MAX_HEADERS)).await;
    assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");
    let last = format!("x-h{}: v", super::MAX_HEADERS - 3);
    assert!(
        answer.contains(&last),
        "the target saw every field: {answer}"
    );
    let answer = h.raw(target, &head(super::MAX_HEADERS + 1)).await;
    assert!(answer.starts_with("HTTP/1.1 431 "), "{answer}");
}

#[tokio::test]
async fn a_head_over_the_limit_is_answered_431() {
    std::env::set_var("BH_TEST_TOKEN_L", "real-token");
    let target = echo_target().await;
    let h = Harness::new(target, "BH_TEST_TOKEN_L").await;
    let mut big = b"GET /v1/x HTTP/1.1\r\nHost: api\r\nx-big: ".to_vec();
    big.extend(std::iter::repeat_n(b'a', 100_000));
    big.extend_from_slice(b"\r\n\r\n");
    let mut s = h.connect(target).await;
    // The client writes all of it, as clients do, and reads what it gets.
    let (mut rd, mut wr) = s.split();
    let write = async {
        let _ = wr.write_all(&big).await;
    };
    let mut out = Vec::new();
    let read = async {
        let _ = tokio::time::timeout(Duration::from_secs(10), rd.read_to_end(&mut out)).await;
    };
    tokio::join!(write, read);
    let answer = String::from_utf8_lossy(&out);
    assert!(answer.starts_with("HTTP/1.1 431 "), "{answer:?}");
}

use rustls_pki_types::pem::PemObject as _;

/// A session opened before a reload asks with its target's old settings, one after it with
/// the new, under the same name: each gets configurations built from its own settings.
#[test]
fn upstream_tls_configurations_are_served_only_for_the_settings_they_were_built_from() {
    let configs = super::upstream::ClientConfigs::default();
    let before = super::settings::HttpTarget::default();
    let after = super::settings::HttpTarget {
        h2c: true,
        ..super::settings::HttpTarget::default()
    };
    let first = configs.get("api", &before).unwrap();
    let again = configs.get("api", &before).unwrap();
    assert!(
        Arc::ptr_eq(&first.any, &again.any),
        "built once per settings"
    );
    let reloaded = configs.get("api", &after).unwrap();
    assert!(
        !Arc::ptr_eq(&first.any, &reloaded.any),
        "changed settings under the same name are built afresh"
    );
    let old_session = configs.get("api", &before).unwrap();
    assert!(
        !Arc::ptr_eq(&reloaded.any, &old_session.any),
        "a session with the old settings never gets the new ones' configuration"
    );
}

/// The status codes of the answers in `out`, in order.
fn statuses(out: &str) -> Vec<u16> {
    out.split("HTTP/1.1 ")
        .skip(1)
        .filter_map(|s| s.get(..3)?.parse().ok())
        .collect()
}

/// A session remembers its decisions ([`super::memo`]): a request that differs from one judged
/// before in any input of the policy (method, host, normalised path, an unknown reading) or
/// comes after a policy reload is judged anew, on the same connection; every one is recorded
/// with its own verdict.
#[tokio::test]
async fn a_remembered_decision_serves_only_requests_the_policy_reads_the_same() {
    std::env::set_var("BH_TEST_TOKEN_M", "real-token");
    let target = echo_target().await;
    let policy = |allowed: &str| {
        format!(
            "[[target]]\nname = \"api\"\nprotocol = \"http\"\ndefault = \"deny\"\n\
             [[rule]]\nid = \"read\"\nverdict = \"allow\"\ntarget = {{ name = [\"api\"] }}\n\
             http = {{ method = [\"GET\"], path = [\"{allowed}\"] }}\n\
             [[rule]]\nid = \"not-other\"\nverdict = \"deny\"\ntarget = {{ name = [\"api\"] }}\n\
             http = {{ host = [\"other.example\"] }}\n"
        )
    };
    let h = Harness::with(target, "BH_TEST_TOKEN_M", "", &policy("/v1/**")).await;
    let mut s = h.connect(target).await;
    s.write_all(
        b"GET /v1/users HTTP/1.1\r\nHost: api\r\n\r\n\
          DELETE /v1/users HTTP/1.1\r\nHost: api\r\n\r\n\
          GET /v1/users HTTP/1.1\r\nHost: api\r\n\r\n\
          GET /v1/users/../../admin HTTP/1.1\r\nHost: api\r\n\r\n\
          GET /v1/a%2Fb HTTP/1.1\r\nHost: api\r\n\r\n\
          GET /v1/users HTTP/1.1\r\nHost: other.example\r\n\r\n\
          GET /v1/users HTTP/1.1\r\nHost: api\r\n\r\n",
    )
    .await
    .unwrap();
    let mut out = Vec::new();
    let mut buf = vec![0u8; 65536];
    while statuses(&String::from_utf8_lossy(&out)).len() < 7 {
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
            .await
            .expect("answers")
            .unwrap();
        assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&out));
        out.extend_from_slice(&buf[..n]);
    }
    let first = String::from_utf8_lossy(&out).into_owned();
    assert_eq!(
        statuses(&first),
        [200, 403, 200, 403, 403, 403, 200],
        "{first}"
    );
    // A new policy on the same connection: what it allowed before is denied now.
    std::fs::write(h.policies.path().join("api.toml"), policy("/v2/**")).unwrap();
    h.gw.policy.reload().unwrap();
    s.write_all(b"GET /v1/users HTTP/1.1\r\nHost: api\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut rest))
        .await
        .expect("the gateway answers and closes")
        .unwrap();
    let rest = String::from_utf8_lossy(&rest).into_owned();
    assert_eq!(statuses(&rest), [403], "{rest}");
    let verdicts: Vec<RecordedVerdict> = h
        .events_of_newest()
        .await
        .into_iter()
        .filter_map(|e| match e {
            EventKind::Request { verdict, .. } => Some(verdict),
            _ => None,
        })
        .collect();
    let (allow, deny) = (RecordedVerdict::Allow, RecordedVerdict::Deny);
    assert_eq!(
        verdicts,
        [allow, deny, allow, deny, deny, deny, allow, deny],
        "every request recorded with its own verdict"
    );
}

/// hyper's deadline for each request head (its `header_read_timeout`), not only the first
/// request's: a client that sends its second head slowly on a kept-alive connection is closed
/// at [`super::HEADER_TIMEOUT`] from when the gateway began waiting for it, neither sooner nor
/// much later, and that head never reaches the target.
#[tokio::test]
async fn a_slow_second_head_is_closed_at_the_header_timeout() {
    std::env::set_var("BH_TEST_TOKEN_S", "real-token");
    let target = echo_target().await;
    let h = Harness::new(target, "BH_TEST_TOKEN_S").await;
    let mut s = h.connect(target).await;
    s.write_all(b"GET /v1/first HTTP/1.1\r\nHost: api\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 65536];
    let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
        .await
        .expect("the first answer")
        .unwrap();
    let first = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(first.starts_with("HTTP/1.1 200 "), "{first}");
    let waiting = std::time::Instant::now();
    // Half a head, then a byte every 2 s: never complete.
    s.write_all(b"GET /v1/slow HTTP/1.1\r\nHost: api\r\n")
        .await
        .unwrap();
    let mut rest = Vec::new();
    let read = async {
        loop {
            tokio::select! {
                r = s.read(&mut buf) => match r {
                    Ok(0) | Err(_) => break,
                    Ok(n) => rest.extend_from_slice(&buf[..n]),
                },
                () = tokio::time::sleep(Duration::from_secs(2)) => {
                    let _ = s.write_all(b"X").await;
                }
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(30), read)
        .await
        .expect("the gateway closes a slow head");
    let took = waiting.elapsed();
    let secs = super::HEADER_TIMEOUT.as_secs_f64();
    assert!(
        took.as_secs_f64() > secs - 0.5 && took.as_secs_f64() < secs + 3.0,
        "closed after {took:?}"
    );
    let rest = String::from_utf8_lossy(&rest);
    assert!(!rest.contains("/v1/slow"), "never forwarded: {rest}");
}
