//! The HTTP(S) gateway against nginx from Debian on the target host, with governed clients
//! started through `bulkhead run` (curl, Python, Node) and raw sockets from Python.

use bulkhead_tests::{
    http::{Nginx, SERVER_NAME},
    require_root, Topology, TARGET_V4,
};
use serde_json::Value;

const SECRET: &str = "held-secret-7f3a";

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
"#;

/// nginx on the target, configured as target `api` (plain and TLS ports) whose bearer token
/// the gateway holds, and the daemon started.
fn setup() -> (Topology, Nginx, bulkhead_tests::Proc) {
    require_root();
    let topo = Topology::new("");
    let nginx = topo.nginx();
    let secret = topo.credential_file("api", SECRET);
    topo.write_config(&format!(
        "[[target]]\nname = \"api\"\nprotocol = \"http\"\n\
         addresses = [\"{TARGET_V4}:80\", \"{TARGET_V4}:443\"]\n\
         [target.http]\nca = \"{ca}\"\n\
         [[target.http.inject]]\nheader = \"authorization\"\nprefix = \"Bearer \"\n\
         credentials = {{ file = \"{secret}\" }}\n",
        ca = nginx.ca.display(),
        secret = secret.display(),
    ));
    topo.policy("api.toml", POLICY);
    let daemon = topo.start_daemon(&[]);
    (topo, nginx, daemon)
}

fn text(out: &std::process::Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn curl(topo: &Topology, args: &[&str]) -> (String, String) {
    let mut all = vec!["-sS", "--max-time", "20"];
    all.extend_from_slice(args);
    text(&topo.run_governed("curl", &all))
}

/// Every request event of every session, as (text, verdict, rules).
fn requests(topo: &Topology) -> Vec<(String, String, Value)> {
    let mut out = Vec::new();
    for s in topo.sessions() {
        for e in topo.events(&s["id"]) {
            if e["type"] == "request" {
                out.push((
                    e["text"].as_str().unwrap_or_default().to_string(),
                    e["verdict"].as_str().unwrap_or_default().to_string(),
                    e["rules"].clone(),
                ));
            }
        }
    }
    out
}

/// Without the bundle `bulkhead run` names, curl does not trust the gateway: nothing is
/// trusted behind the user's back.
fn assert_untrusted_without_the_bundle(topo: &Topology, nginx: &Nginx) {
    let out = topo.output(bulkhead_tests::Side::Governed, {
        let mut c = std::process::Command::new("curl");
        c.args([
            "-sS",
            "--max-time",
            "10",
            "--cacert",
            &nginx.ca.display().to_string(),
            "--resolve",
            &format!("{SERVER_NAME}:443:{TARGET_V4}"),
            &format!("https://{SERVER_NAME}/v1/tls"),
        ]);
        c
    });
    assert!(!out.status.success(), "{out:?}");
}

#[test]
fn curl_is_allowed_denied_and_given_the_held_token_over_http_and_https() {
    let (topo, nginx, _daemon) = setup();

    // Allowed GET, with a dummy token the gateway replaces.
    let (out, err) = curl(
        &topo,
        &[
            "-H",
            "Authorization: Bearer dummy-token",
            &format!("http://{TARGET_V4}/v1/items/./a/../b"),
        ],
    );
    assert_eq!(out.trim(), "nginx says hello GET /v1/items/b", "{err}");
    let log = nginx.wait_requests(1);
    assert!(
        log.contains(&format!(
            "GET /v1/items/b auth=\"Bearer {SECRET}\" proto=HTTP/1.1"
        )),
        "nginx saw the held token, on the normalised path: {log}"
    );
    assert!(!log.contains("dummy-token"), "{log}");

    // Denied DELETE: 403 with a JSON body naming the rule and its message; nginx sees nothing.
    let (out, err) = curl(
        &topo,
        &[
            "-X",
            "DELETE",
            "-w",
            "\n%{http_code}",
            &format!("http://{TARGET_V4}/v1/items/1"),
        ],
    );
    let (body, code) = out.trim().rsplit_once('\n').unwrap_or(("", ""));
    assert_eq!(code, "403", "{out} {err}");
    let denial: Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"));
    assert_eq!(denial["rule"], "no-delete", "{denial}");
    assert_eq!(
        denial["message"], "nothing is deleted through the gateway",
        "{denial}"
    );
    // HTTP/2 without TLS (prior knowledge) toward the gateway.
    let (out, err) = curl(
        &topo,
        &[
            "--http2-prior-knowledge",
            "-w",
            "%{http_version}",
            &format!("http://{TARGET_V4}/v1/h2c"),
        ],
    );
    assert_eq!(out.trim_end(), "nginx says hello GET /v1/h2c\n2", "{err}");

    // HTTPS with HTTP/2: the client trusts the gateway's leaf through the CA bundle `bulkhead
    // run` names (CURL_CA_BUNDLE); the gateway verifies nginx with the target's CA and speaks
    // HTTP/2 to it too (ALPN).
    let (out, err) = curl(
        &topo,
        &[
            "--http2",
            "-w",
            "%{http_version}",
            "--resolve",
            &format!("{SERVER_NAME}:443:{TARGET_V4}"),
            &format!("https://{SERVER_NAME}/v1/tls"),
        ],
    );
    assert_eq!(out.trim_end(), "nginx says hello GET /v1/tls\n2", "{err}");
    // HTTPS with HTTP/1.1: the gateway offers nginx HTTP/1.1 alone, as the client spoke it.
    let (out, err) = curl(
        &topo,
        &[
            "--http1.1",
            "--resolve",
            &format!("{SERVER_NAME}:443:{TARGET_V4}"),
            &format!("https://{SERVER_NAME}/v1/tls1"),
        ],
    );
    assert_eq!(out, "nginx says hello GET /v1/tls1\n", "{err}");
    let log = nginx.wait_requests(4);
    assert!(
        log.contains(&format!(
            "GET /v1/tls auth=\"Bearer {SECRET}\" proto=HTTP/2.0"
        )),
        "{log}"
    );
    assert!(
        log.contains(&format!(
            "GET /v1/tls1 auth=\"Bearer {SECRET}\" proto=HTTP/1.1"
        )),
        "{log}"
    );
    assert!(
        !log.contains("DELETE"),
        "the denied request never reached nginx: {log}"
    );

    assert_untrusted_without_the_bundle(&topo, &nginx);

    // The record: each request with its verdict, rule and normalised URL; the held token
    // appears nowhere.
    let reqs = requests(&topo);
    let find = |t: &str| reqs.iter().find(|r| r.0 == t).cloned();
    let get = find(&format!("GET http://{TARGET_V4}/v1/items/b")).expect("GET recorded");
    assert_eq!(get.1, "allow", "{reqs:?}");
    let del = find(&format!("DELETE http://{TARGET_V4}/v1/items/1")).expect("DELETE recorded");
    assert_eq!(
        (del.1.as_str(), del.2.clone()),
        ("deny", serde_json::json!(["no-delete"]))
    );
    assert!(
        find(&format!("GET https://{SERVER_NAME}/v1/tls")).is_some(),
        "{reqs:?}"
    );
    let export = topo.output(
        bulkhead_tests::Side::Host,
        topo.bulkhead(&["sessions", "export"]),
    );
    let exported = String::from_utf8_lossy(&export.stdout);
    // The results: in response events, or written into their requests (docs/EVENTS.md).
    assert!(exported.contains("\"summary\":\"200 OK"), "{exported}");
    assert!(
        !exported.contains(SECRET),
        "the held token is never recorded"
    );
}

#[test]
fn python_and_node_clients_work_unchanged_and_ambiguous_requests_are_refused() {
    let (topo, nginx, _daemon) = setup();

    // Python's requests over HTTPS to the address (no SNI: the leaf names the address) and
    // urllib over HTTP, with the bundle `bulkhead run` gave through REQUESTS_CA_BUNDLE.
    let py = format!(
        "import requests, urllib.request\n\
         r = requests.post('https://{TARGET_V4}/v1/py', json={{'a': 1}}, headers={{'Authorization': 'Bearer nope'}})\n\
         print(r.status_code, r.text.strip())\n\
         print(urllib.request.urlopen('http://{TARGET_V4}/v1/urllib').read().decode().strip())\n\
         try:\n    requests.delete('https://{TARGET_V4}/v1/py/1').raise_for_status()\n\
         except requests.HTTPError as e:\n    print(e.response.status_code, e.response.json()['rule'])\n"
    );
    let (out, err) = text(&topo.run_governed("/usr/bin/python3", &["-c", &py]));
    assert_eq!(
        out, "200 nginx says hello POST /v1/py\nnginx says hello GET /v1/urllib\n403 no-delete\n",
        "{err}"
    );

    // Node's fetch over HTTPS, trusting the gateway through NODE_EXTRA_CA_CERTS.
    let js = format!(
        "fetch('https://{TARGET_V4}/v1/node').then(r => r.text()).then(t => process.stdout.write(t))\
         .catch(e => {{ console.error(e); process.exit(1); }})"
    );
    let (out, err) = text(&topo.run_governed("node", &["-e", &js]));
    assert_eq!(out, "nginx says hello GET /v1/node\n", "{err}");
    let log = nginx.wait_requests(3);
    assert_eq!(
        log.matches(&format!("auth=\"Bearer {SECRET}\"")).count(),
        3,
        "{log}"
    );

    // Raw bytes from Python: each ambiguous request is answered 400 and never reaches nginx.
    let raw = format!(
        r#"
import socket, sys, time
def ask(data, timeout=15):
    s = socket.create_connection(("{TARGET_V4}", 80), timeout=timeout)
    s.sendall(data)
    out = b""
    while True:
        try:
            b = s.recv(65536)
        except socket.timeout:
            break
        if not b:
            break
        out += b
    return out.decode(errors="replace")
cases = [
    b"GET /v1/x HTTP/1.1\r\nHost: {TARGET_V4}\r\nHost: other.example\r\nConnection: close\r\n\r\n",
    b"GET http://other.example/v1/x HTTP/1.1\r\nHost: {TARGET_V4}\r\nConnection: close\r\n\r\n",
    b"POST /v1/x HTTP/1.1\r\nHost: {TARGET_V4}\r\nTransfer-Encoding: gzip, chunked\r\nConnection: close\r\n\r\n0\r\n\r\n",
    b"POST /v1/x HTTP/1.1\r\nHost: {TARGET_V4}\r\nX-HTTP-Method-Override: DELETE\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    b"GET /v1/x HTTP/1.1\r\nHost: {TARGET_V4}\r\nAuthorization: a\r\nAuthorization: b\r\nConnection: close\r\n\r\n",
]
for c in cases:
    print(ask(c).split("\r\n")[0])
# An encoded slash: unknown, denied (on_unknown).
print(ask(b"GET /v1/a%2Fb HTTP/1.1\r\nHost: {TARGET_V4}\r\nConnection: close\r\n\r\n").split("\r\n")[0])
# Content-Length and chunked, in either order: refused, and the connection closed: the rest
# is not a request.
print(ask(b"POST /v1/cl HTTP/1.1\r\nHost: {TARGET_V4}\r\nContent-Length: 50\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nDELETE /v1/smuggled HTTP/1.1\r\nHost: {TARGET_V4}\r\n\r\n").split("\r\n")[0])
print(ask(b"POST /v1/te HTTP/1.1\r\nHost: {TARGET_V4}\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n").split("\r\n")[0])
# The same behind a request that is fine, on one connection: the first answered, the second
# refused, nothing after it read.
both = ask(b"GET /v1/first HTTP/1.1\r\nHost: {TARGET_V4}\r\n\r\nPOST /v1/second HTTP/1.1\r\nHost: {TARGET_V4}\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /v1/third HTTP/1.1\r\nHost: {TARGET_V4}\r\n\r\n")
print(both.count("HTTP/1.1 200"), both.count("HTTP/1.1 400"), both.count("HTTP/1.1 "))
# The same over TLS, with ALPN http/1.1 and with no ALPN at all (HTTP/1.1 either way).
import ssl
def ask_tls(data, alpn):
    ctx = ssl.create_default_context()
    if alpn:
        ctx.set_alpn_protocols(alpn)
    s = ctx.wrap_socket(socket.create_connection(("{TARGET_V4}", 443), timeout=15), server_hostname="{TARGET_V4}")
    s.sendall(data)
    out = b""
    while True:
        try:
            b = s.recv(65536)
        except (socket.timeout, ssl.SSLError):
            break
        if not b:
            break
        out += b
    return out.decode(errors="replace")
for alpn in (["http/1.1"], None, ["h2"]):
    print(ask_tls(b"POST /v1/tls-cl HTTP/1.1\r\nHost: {TARGET_V4}\r\nContent-Length: 50\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nDELETE /v1/smuggled HTTP/1.1\r\nHost: {TARGET_V4}\r\n\r\n", alpn).split("\r\n")[0])
# The same sent a byte first (a prefix of HTTP/2's preface, `P`), the rest later.
s = socket.create_connection(("{TARGET_V4}", 80), timeout=15)
s.sendall(b"P")
time.sleep(0.3)
s.sendall(b"OST /v1/dribble HTTP/1.1\r\nHost: {TARGET_V4}\r\nContent-Length: 50\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nDELETE /v1/smuggled HTTP/1.1\r\nHost: {TARGET_V4}\r\n\r\n")
out = b""
while True:
    try:
        b = s.recv(65536)
    except socket.timeout:
        break
    if not b:
        break
    out += b
print(out.decode(errors="replace").split("\r\n")[0])
# Two Content-Lengths that disagree.
print(ask(b"POST /v1/dupcl HTTP/1.1\r\nHost: {TARGET_V4}\r\nContent-Length: 3\r\nContent-Length: 4\r\nConnection: close\r\n\r\nabcd").split("\r\n")[0])
# Too many headers, too large a head.
print(ask(b"GET /v1/x HTTP/1.1\r\nHost: {TARGET_V4}\r\n" + b"".join(b"x-h%d: v\r\n" % i for i in range(200)) + b"\r\n").split("\r\n")[0])
big = ask(b"GET /v1/x HTTP/1.1\r\nHost: {TARGET_V4}\r\nx-big: " + b"a" * 100000 + b"\r\n\r\n").split("\r\n")[0]
print("too large refused" if big == "HTTP/1.1 431 Request Header Fields Too Large" else big)
# Not TLS, not HTTP/2: garbage that looks like a TLS record.
print(repr(ask(b"\x16\x03\x01\x00\x05hello")[:20]))
# Slowloris: half a head, then nothing: closed by the gateway well before our 30 s.
t = time.time()
s = socket.create_connection(("{TARGET_V4}", 80), timeout=30)
s.sendall(b"GET /v1/slow HTTP/1.1\r\nHost: {TARGET_V4}\r\nX-A: ")
try:
    s.recv(100)
except socket.timeout:
    pass
print("slow closed", time.time() - t < 20)
"#
    );
    let (out, err) = text(&topo.run_governed("/usr/bin/python3", &["-c", &raw]));
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines,
        vec![
            "HTTP/1.1 400 Bad Request",
            "HTTP/1.1 400 Bad Request",
            "HTTP/1.1 400 Bad Request",
            "HTTP/1.1 400 Bad Request",
            "HTTP/1.1 400 Bad Request",
            "HTTP/1.1 403 Forbidden",
            "HTTP/1.1 400 Bad Request",
            "HTTP/1.1 400 Bad Request",
            "1 1 2",
            "HTTP/1.1 400 Bad Request",
            "HTTP/1.1 400 Bad Request",
            "HTTP/1.1 400 Bad Request",
            "HTTP/1.1 400 Bad Request",
            "HTTP/1.1 400 Bad Request",
            "HTTP/1.1 431 Request Header Fields Too Large",
            "too large refused",
            "''",
            "slow closed True",
        ],
        "{err}"
    );
    let log = nginx.access_log();
    assert!(!log.contains("other.example"), "{log}");
    assert!(!log.contains("smuggled"), "{log}");
    for path in ["/v1/cl", "/v1/te", "/v1/second", "/v1/third", "/v1/dupcl"] {
        assert!(!log.contains(&format!("{path} ")), "{path}: {log}");
    }
    assert!(log.contains("/v1/first "), "{log}");
    assert!(!log.contains("/v1/a"), "{log}");
    assert!(!log.contains("/v1/slow"), "{log}");
    // After all that, the gateway still serves.
    let (out, err) = curl(&topo, &[&format!("http://{TARGET_V4}/v1/after")]);
    assert_eq!(out, "nginx says hello GET /v1/after\n", "{err}");
}

#[test]
fn tls_pass_through_is_decided_by_server_name_and_relayed_untouched() {
    require_root();
    let topo = Topology::new("");
    let nginx = topo.nginx();
    topo.write_config(&format!(
        "[[target]]\nname = \"api\"\nprotocol = \"http\"\naddresses = [\"{TARGET_V4}:443\"]\n\
         [target.http]\ntls = \"passthrough\"\n"
    ));
    topo.policy(
        "api.toml",
        "[[target]]\nname = \"api\"\nprotocol = \"http\"\ndefault = \"deny\"\n\n\
         [[rule]]\nid = \"api-by-name\"\nverdict = \"allow\"\ntarget = { name = [\"api\"] }\n\
         http = { host = [\"api.test\"] }\n",
    );
    let _daemon = topo.start_daemon(&[]);
    let ca = nginx.ca.display().to_string();
    // nginx's own certificate reaches the client (it trusts only nginx's CA): not terminated.
    let (out, err) = curl(
        &topo,
        &[
            "--cacert",
            &ca,
            "--resolve",
            &format!("{SERVER_NAME}:443:{TARGET_V4}"),
            &format!("https://{SERVER_NAME}/v1/through"),
        ],
    );
    assert_eq!(out.trim_end(), "nginx says hello GET /v1/through", "{err}");
    // Another name at the same address: denied, the connection reset before any TLS answer.
    let (out, err) = curl(
        &topo,
        &[
            "--cacert",
            &ca,
            "--resolve",
            &format!("other.test:443:{TARGET_V4}"),
            "https://other.test/v1/x",
        ],
    );
    assert!(out.is_empty() && !err.is_empty(), "{out} {err}");
    // No server name (an address): unknown, denied.
    let (out, err) = curl(
        &topo,
        &["--cacert", &ca, &format!("https://{TARGET_V4}/v1/x")],
    );
    assert!(out.is_empty() && !err.is_empty(), "{out} {err}");
    let log = nginx.wait_requests(1);
    assert_eq!(log.lines().count(), 1, "{log}");
    let reqs = requests(&topo);
    let texts: Vec<(&str, &str)> = reqs.iter().map(|r| (r.0.as_str(), r.1.as_str())).collect();
    assert!(
        texts.contains(&("TLS pass-through to api.test", "allow")),
        "{texts:?}"
    );
    assert!(
        texts.contains(&("TLS pass-through to other.test", "deny")),
        "{texts:?}"
    );
    assert!(
        texts.contains(&("TLS pass-through without a server name", "deny")),
        "{texts:?}"
    );
}

/// A connection the policy refuses before any request (a rule on the process, no request
/// section): plain HTTP is answered 403 with the denial's JSON, TLS with an `access_denied`
/// alert; nginx sees neither, and the session is recorded as refused.
#[test]
fn a_connection_refused_by_policy_is_answered_403_or_a_tls_alert() {
    require_root();
    let topo = Topology::new("");
    let nginx = topo.nginx();
    topo.write_config(&format!(
        "[[target]]\nname = \"api\"\nprotocol = \"http\"\n\
         addresses = [\"{TARGET_V4}:80\", \"{TARGET_V4}:443\"]\n\
         [target.http]\nca = \"{}\"\n",
        nginx.ca.display(),
    ));
    topo.policy(
        "api.toml",
        "[[target]]\nname = \"api\"\nprotocol = \"http\"\ndefault = \"allow\"\n\n\
         [[rule]]\nid = \"no-curl\"\nverdict = \"deny\"\n\
         message = \"curl may not reach the API\"\n\
         target = { name = [\"api\"] }\nidentity = { process = [\"curl\"] }\n",
    );
    let _daemon = topo.start_daemon(&[]);

    let (out, err) = curl(&topo, &["-i", &format!("http://{TARGET_V4}/v1/refused")]);
    assert!(out.starts_with("HTTP/1.1 403 Forbidden"), "{out:?} {err}");
    let body = out.lines().last().unwrap_or_default();
    let body: Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(body["message"], "curl may not reach the API", "{body}");
    assert_eq!(body["rule"], "no-curl", "{body}");

    let (out, err) = curl(&topo, &[&format!("https://{TARGET_V4}/v1/refused-tls")]);
    assert!(out.is_empty(), "{out}");
    assert!(err.contains("alert access denied"), "{err}");

    // Python (not curl) is let through: the refusal was the rule's, not the gateway's.
    let py = format!(
        "import urllib.request\nprint(urllib.request.urlopen('http://{TARGET_V4}/v1/python').read().decode().strip())\n"
    );
    let (out, err) = text(&topo.run_governed("/usr/bin/python3", &["-c", &py]));
    assert_eq!(out, "nginx says hello GET /v1/python\n", "{err}");
    let log = nginx.wait_requests(1);
    assert!(!log.contains("refused"), "{log}");
    let refused = topo
        .sessions()
        .into_iter()
        .filter(|s| s["outcome"]["kind"] == "refused")
        .count();
    assert_eq!(refused, 2, "{:?}", topo.sessions());
}
