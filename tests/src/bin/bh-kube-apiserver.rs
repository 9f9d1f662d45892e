//! A test Kubernetes API server: what `kubectl` needs for get, delete and exec on pods, over
//! TLS (h2 and HTTP/1.1) with a CA this run generates. No real kube-apiserver is installable
//! on the test machines.
//!
//! `bh-kube-apiserver ADDR DIR TOKEN`: writes `DIR/ca/ca.pem` (the cluster CA), listens on
//! `ADDR`, prints `ready`, then one JSON line per request (method, path, query, whether the
//! bearer token was `TOKEN`, whether the request was an upgrade). Every request without
//! `Authorization: Bearer TOKEN` gets 401, as from a real cluster.
//!
//! Serves `/version`, `/api`, `/apis`, `/api/v1` (pods, pods/exec, pods/log, namespaces;
//! aggregated discovery is declined by answering plain JSON), pods in namespaces (list across
//! all namespaces or in one, get, delete; as `Table` when kubectl asks for it), and
//! `pods/NAME/exec` over WebSocket: it echoes the command's arguments on stdout, then stdin
//! back to stdout until stdin closes, then sends a `Success` status on the error channel.
//!
//! The WebSocket handshake is the apiserver's (`wsstream`): the first subprotocol the client
//! offers among `v5.channel.k8s.io`, `v4.channel.k8s.io`, `channel.k8s.io` and the
//! `base64.channel.k8s.io` ones (no offer: `channel.k8s.io`, named in no header), and text
//! messages are read as binary ones. It also accepts `permessage-deflate` when offered (without
//! compressing anything), so a test sees whether a client could negotiate it. Each upgrade's
//! request line also says the subprotocols and extensions it was offered.

use std::{
    collections::BTreeSet,
    convert::Infallible,
    io::Write as _,
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
};

use bytes::Bytes;
use futures_util::{SinkExt as _, StreamExt as _};
use http_body_util::Full;
use hyper::{body::Incoming, header, upgrade::OnUpgrade, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{json, Value};
use tokio_tungstenite::{
    tungstenite::{
        handshake::derive_accept_key,
        protocol::{frame::coding::CloseCode, CloseFrame, Role},
        Message,
    },
    WebSocketStream,
};

/// Pods by (namespace, name).
type Pods = Arc<Mutex<BTreeSet<(String, String)>>>;

struct Server {
    token: String,
    pods: Pods,
    out: Mutex<std::io::Stdout>,
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, addr, dir, token] = args.as_slice() else {
        eprintln!("usage: bh-kube-apiserver ADDR DIR TOKEN");
        std::process::exit(2);
    };
    let addr: SocketAddr = addr.parse().expect("ADDR is IP:PORT");
    let ca = bulkhead::tls::LocalCa::load_or_create(&PathBuf::from(dir).join("ca"))
        .expect("create the cluster CA");
    let mut tls = (*ca
        .server_config(addr.ip(), &["kubernetes".into(), "localhost".into()])
        .expect("mint the server certificate"))
    .clone();
    tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));

    let pods: BTreeSet<(String, String)> = [
        ("prod", "web-1"),
        ("prod", "x"),
        ("dev", "api-1"),
        ("kube-system", "coredns-1"),
    ]
    .into_iter()
    .map(|(ns, n)| (ns.to_string(), n.to_string()))
    .collect();
    let server = Arc::new(Server {
        token: token.clone(),
        pods: Arc::new(Mutex::new(pods)),
        out: Mutex::new(std::io::stdout()),
    });

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(addr).await.expect("bind");
        server.say("ready");
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let acceptor = acceptor.clone();
            let server = Arc::clone(&server);
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let service = hyper::service::service_fn(move |req| {
                    let server = Arc::clone(&server);
                    async move { Ok::<_, Infallible>(server.handle(req)) }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection_with_upgrades(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
}

fn json_response(status: StatusCode, body: &Value) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("response")
}

fn status(code: StatusCode, reason: &str, message: &str) -> Response<Full<Bytes>> {
    json_response(
        code,
        &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": message, "reason": reason, "code": code.as_u16()}),
    )
}

fn pod(ns: &str, name: &str) -> Value {
    json!({
        "kind": "Pod", "apiVersion": "v1",
        "metadata": {"name": name, "namespace": ns, "uid": format!("uid-{ns}-{name}"),
                     "resourceVersion": "1", "creationTimestamp": "2026-01-01T00:00:00Z"},
        "spec": {"containers": [{"name": "main", "image": "busybox"}]},
        "status": {"phase": "Running"}
    })
}

/// What kubectl prints for `get pods`: a server-side Table.
fn table(pods: &[(String, String)]) -> Value {
    let rows: Vec<Value> = pods
        .iter()
        .map(|(ns, n)| {
            json!({"cells": [n, "1/1", "Running", 0, "1d"],
                   "object": {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1",
                              "metadata": {"name": n, "namespace": ns,
                                           "creationTimestamp": "2026-01-01T00:00:00Z"}}})
        })
        .collect();
    let col = |name: &str, ty: &str, format: &str| json!({"name": name, "type": ty, "format": format, "description": "", "priority": 0});
    json!({
        "kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": {"resourceVersion": "1"},
        "columnDefinitions": [col("Name", "string", "name"), col("Ready", "string", ""),
                              col("Status", "string", ""), col("Restarts", "integer", ""),
                              col("Age", "string", "")],
        "rows": rows
    })
}

fn api_resources() -> Value {
    let verbs = [
        "create",
        "delete",
        "deletecollection",
        "get",
        "list",
        "patch",
        "update",
        "watch",
    ];
    json!({
        "kind": "APIResourceList", "groupVersion": "v1",
        "resources": [
            {"name": "namespaces", "singularName": "namespace", "namespaced": false,
             "kind": "Namespace", "verbs": ["get", "list"], "shortNames": ["ns"]},
            {"name": "pods", "singularName": "pod", "namespaced": true, "kind": "Pod",
             "verbs": verbs, "shortNames": ["po"], "categories": ["all"]},
            {"name": "pods/exec", "singularName": "", "namespaced": true, "kind": "PodExecOptions",
             "verbs": ["create", "get"]},
            {"name": "pods/log", "singularName": "", "namespaced": true, "kind": "Pod",
             "verbs": ["get"]}
        ]
    })
}

impl Server {
    fn say(&self, line: &str) {
        if let Ok(mut out) = self.out.lock() {
            let _ = writeln!(out, "{line}");
            let _ = out.flush();
        }
    }

    fn handle(&self, mut req: Request<Incoming>) -> Response<Full<Bytes>> {
        let path = req.uri().path().to_string();
        let query = req.uri().query().unwrap_or("").to_string();
        let authorized = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v == format!("Bearer {}", self.token));
        let upgrade = req.headers().contains_key(header::UPGRADE);
        let extensions: Vec<&str> = req
            .headers()
            .get_all(header::SEC_WEBSOCKET_EXTENSIONS)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        self.say(
            &json!({"method": req.method().as_str(), "path": path, "query": query,
                    "authorized": authorized, "upgrade": upgrade,
                    "protocols": offered_protocols(&req), "extensions": extensions,
                    "version": format!("{:?}", req.version())})
            .to_string(),
        );
        if !authorized {
            return status(StatusCode::UNAUTHORIZED, "Unauthorized", "Unauthorized");
        }
        let wants_table = req
            .headers()
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.contains("as=Table"));
        let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
        let method = req.method().as_str().to_string();
        match (method.as_str(), parts.as_slice()) {
            ("GET", ["version"]) => json_response(
                StatusCode::OK,
                &json!({"major": "1", "minor": "32", "gitVersion": "v1.32.0",
                        "gitCommit": "bulkhead-test", "gitTreeState": "clean",
                        "buildDate": "2026-01-01T00:00:00Z", "goVersion": "go1.23",
                        "compiler": "gc", "platform": "linux/amd64"}),
            ),
            ("GET", ["api"]) => json_response(
                StatusCode::OK,
                &json!({"kind": "APIVersions", "versions": ["v1"],
                        "serverAddressByClientCIDRs": []}),
            ),
            ("GET", ["apis"]) => json_response(
                StatusCode::OK,
                &json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": []}),
            ),
            ("GET", ["api", "v1"]) => json_response(StatusCode::OK, &api_resources()),
            ("GET", ["api", "v1", "pods"]) => self.list(None, wants_table),
            ("GET", ["api", "v1", "namespaces", ns, "pods"]) => self.list(Some(ns), wants_table),
            ("GET", ["api", "v1", "namespaces", ns, "pods", name]) => {
                if self.has(ns, name) {
                    if wants_table {
                        json_response(
                            StatusCode::OK,
                            &table(&[((*ns).to_string(), (*name).to_string())]),
                        )
                    } else {
                        json_response(StatusCode::OK, &pod(ns, name))
                    }
                } else {
                    not_found(name)
                }
            }
            ("DELETE", ["api", "v1", "namespaces", ns, "pods", name]) => {
                let removed = self
                    .pods
                    .lock()
                    .is_ok_and(|mut p| p.remove(&((*ns).to_string(), (*name).to_string())));
                if removed {
                    json_response(StatusCode::OK, &pod(ns, name))
                } else {
                    not_found(name)
                }
            }
            ("GET" | "POST", ["api", "v1", "namespaces", ns, "pods", name, "exec"]) => {
                if !self.has(ns, name) {
                    return not_found(name);
                }
                exec(&mut req, &query)
            }
            _ => status(
                StatusCode::NOT_FOUND,
                "NotFound",
                "the server could not find the requested resource",
            ),
        }
    }

    fn has(&self, ns: &str, name: &str) -> bool {
        self.pods
            .lock()
            .is_ok_and(|p| p.contains(&(ns.to_string(), name.to_string())))
    }

    fn list(&self, ns: Option<&str>, wants_table: bool) -> Response<Full<Bytes>> {
        let pods: Vec<(String, String)> = self
            .pods
            .lock()
            .map(|p| {
                p.iter()
                    .filter(|(n, _)| ns.is_none_or(|want| want == n))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        if wants_table {
            return json_response(StatusCode::OK, &table(&pods));
        }
        let items: Vec<Value> = pods.iter().map(|(ns, n)| pod(ns, n)).collect();
        json_response(
            StatusCode::OK,
            &json!({"kind": "PodList", "apiVersion": "v1",
                    "metadata": {"resourceVersion": "1"}, "items": items}),
        )
    }
}

fn not_found(name: &str) -> Response<Full<Bytes>> {
    status(
        StatusCode::NOT_FOUND,
        "NotFound",
        &format!("pods \"{name}\" not found"),
    )
}

/// The subprotocols a WebSocket client offers, as the apiserver reads them: the first
/// `Sec-WebSocket-Protocol` line, split at commas.
fn offered_protocols(req: &Request<Incoming>) -> Vec<String> {
    req.headers()
        .get(header::SEC_WEBSOCKET_PROTOCOL)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.split(',')
                .map(|p| p.trim().to_string())
                .filter(|p| !p.is_empty())
                .collect()
        })
        .unwrap_or_default()
}

/// The exec subprotocols the apiserver accepts.
const EXEC_PROTOCOLS: [&str; 5] = [
    "v5.channel.k8s.io",
    "v4.channel.k8s.io",
    "channel.k8s.io",
    "v4.base64.channel.k8s.io",
    "base64.channel.k8s.io",
];

/// Standard base64 with padding.
fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// The WebSocket exec: answers 101 with the chosen subprotocol, then runs the echo.
fn exec(req: &mut Request<Incoming>, query: &str) -> Response<Full<Bytes>> {
    let offered = offered_protocols(req);
    let protocol = if offered.is_empty() {
        Some("")
    } else {
        offered
            .iter()
            .find_map(|o| EXEC_PROTOCOLS.into_iter().find(|p| p == o))
    };
    let Some(protocol) = protocol else {
        return status(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "exec needs a WebSocket upgrade with a channel.k8s.io subprotocol",
        );
    };
    let deflate = req
        .headers()
        .get_all(header::SEC_WEBSOCKET_EXTENSIONS)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("permessage-deflate"));
    let Some(key) = req.headers().get(header::SEC_WEBSOCKET_KEY).cloned() else {
        return status(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "no Sec-WebSocket-Key",
        );
    };
    let mut command = Vec::new();
    let mut stdin = false;
    for pair in query.split('&') {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        match k {
            "command" => command.push(decode(v)),
            "stdin" => stdin = v == "true" || v == "1",
            _ => {}
        }
    }
    tokio::spawn(echo(hyper::upgrade::on(req), command, stdin, protocol));
    let mut answer = Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "Upgrade")
        .header(header::UPGRADE, "websocket")
        .header(
            header::SEC_WEBSOCKET_ACCEPT,
            derive_accept_key(key.as_bytes()),
        );
    if !protocol.is_empty() {
        answer = answer.header(header::SEC_WEBSOCKET_PROTOCOL, protocol);
    }
    if deflate {
        answer = answer.header(header::SEC_WEBSOCKET_EXTENSIONS, "permessage-deflate");
    }
    answer.body(Full::new(Bytes::new())).expect("response")
}

/// The exec's echo on the upgraded stream, in the chosen subprotocol's framing.
async fn echo(upgrade: OnUpgrade, command: Vec<String>, stdin: bool, protocol: &'static str) {
    let v5 = protocol.starts_with("v5");
    let base64_text = protocol.contains("base64");
    let Ok(upgraded) = upgrade.await else {
        return;
    };
    let mut ws = WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
    let frame = |channel: u8, data: &[u8]| {
        if base64_text {
            return Message::Text(format!("{}{}", char::from(b'0' + channel), base64(data)).into());
        }
        let mut v = Vec::with_capacity(data.len() + 1);
        v.push(channel);
        v.extend_from_slice(data);
        Message::Binary(v.into())
    };
    // The fixed echo: the arguments after the program name, then stdin until it closes.
    let args = command.get(1..).unwrap_or_default().join(" ");
    if ws
        .send(frame(1, format!("{args}\n").as_bytes()))
        .await
        .is_err()
    {
        return;
    }
    if stdin && !base64_text {
        while let Some(Ok(msg)) = ws.next().await {
            // As `wsstream` reads them: text and binary alike.
            let data = match msg {
                Message::Binary(b) => b.to_vec(),
                Message::Text(t) => t.as_bytes().to_vec(),
                Message::Close(_) => break,
                _ => continue,
            };
            match data.split_first() {
                Some((0, rest)) if !rest.is_empty() && ws.send(frame(1, rest)).await.is_err() => {
                    return;
                }
                // v5: stdin closed.
                Some((255, [0])) if v5 => break,
                _ => {}
            }
        }
    }
    let status = json!({"metadata": {}, "status": "Success"}).to_string();
    let _ = ws.send(frame(3, status.as_bytes())).await;
    // A close without a code reads as an error to client-go: say it ended normally.
    let _ = ws
        .close(Some(CloseFrame {
            code: CloseCode::Normal,
            reason: "".into(),
        }))
        .await;
}

/// Percent- and plus-decoding of a query value.
fn decode(v: &str) -> String {
    let bytes = v.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if bytes.len() >= i + 3 => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                if let Ok(b) = u8::from_str_radix(hex, 16) {
                    out.push(b);
                    i += 3;
                    continue;
                }
                out.push(b'%');
                i += 1;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}
