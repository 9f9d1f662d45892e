//! Kubernetes: the real `kubectl` against the test API server (`bh-kube-apiserver`) on the
//! target host. First directly, without the gateway, so that what the gateway tests rely on is
//! known to work: discovery, pods listed across all namespaces and in one, get, delete, and an
//! exec over the WebSocket channel protocol.
//!
//! Each test builds its own namespaces (see `bulkhead_tests::Topology`) and needs root.

use bulkhead_tests::{
    kube::{missing_kubectl, write_kubeconfig, KubeApi},
    require_root, Side, Topology,
};

fn text(out: &std::process::Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn skip_without_kubectl() -> bool {
    if let Some(why) = missing_kubectl() {
        eprintln!("SKIPPED: {why}");
        return true;
    }
    false
}

#[test]
fn kubectl_works_against_the_test_apiserver_directly() {
    require_root();
    if skip_without_kubectl() {
        return;
    }
    let topo = Topology::new("");
    let mut api = topo.kube_apiserver();
    let kubeconfig = topo.dir.join("kubeconfig");
    write_kubeconfig(&kubeconfig, &api.url, &api.ca, Some(&api.token));

    let out = topo.output(
        Side::Host,
        topo.kubectl(&kubeconfig, &["get", "pods", "-A"]),
    );
    let all = text(&out);
    assert!(out.status.success(), "{all}");
    for (ns, pod) in [
        ("prod", "web-1"),
        ("dev", "api-1"),
        ("kube-system", "coredns-1"),
    ] {
        assert!(
            all.lines()
                .any(|l| l.split_whitespace().take(2).eq([ns, pod])),
            "{ns}/{pod} listed: {all}"
        );
    }

    let out = topo.output(
        Side::Host,
        topo.kubectl(&kubeconfig, &["get", "pods", "-n", "prod"]),
    );
    let prod = text(&out);
    assert!(
        out.status.success() && prod.contains("web-1") && !prod.contains("api-1"),
        "{prod}"
    );

    let out = topo.output(
        Side::Host,
        topo.kubectl(
            &kubeconfig,
            &["get", "pod", "web-1", "-n", "prod", "-o", "json"],
        ),
    );
    assert!(out.status.success(), "{}", text(&out));
    let got: serde_json::Value = serde_json::from_slice(&out.stdout).expect("pod JSON");
    assert_eq!(got["metadata"]["name"], "web-1");

    let out = topo.output(
        Side::Host,
        topo.kubectl(
            &kubeconfig,
            &[
                "exec", "web-1", "-n", "prod", "--", "echo", "hello", "from", "exec",
            ],
        ),
    );
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hello from exec\n");

    let out = topo.output(
        Side::Host,
        topo.kubectl(&kubeconfig, &["delete", "pod", "x", "-n", "prod"]),
    );
    let deleted = text(&out);
    assert!(
        out.status.success() && deleted.contains("pod \"x\" deleted"),
        "{deleted}"
    );
    let out = topo.output(
        Side::Host,
        topo.kubectl(&kubeconfig, &["get", "pod", "x", "-n", "prod"]),
    );
    assert!(!out.status.success(), "x is gone: {}", text(&out));

    let requests = api.requests();
    assert!(
        requests.iter().all(|r| r["authorized"] == true),
        "every request carried the token: {requests:?}"
    );
    assert!(
        requests
            .iter()
            .any(|r| r["upgrade"] == true && r["path"] == "/api/v1/namespaces/prod/pods/web-1/exec"),
        "exec went over a WebSocket upgrade: {requests:?}"
    );

    // Without the token the cluster refuses: the test server checks the credential.
    let anonymous = topo.dir.join("kubeconfig-anonymous");
    write_kubeconfig(&anonymous, &api.url, &api.ca, None);
    let out = topo.output(Side::Host, topo.kubectl(&anonymous, &["get", "pods", "-A"]));
    assert!(!out.status.success(), "{}", text(&out));
}

const POLICY: &str = r#"
[[target]]
name = "prod-cluster"
protocol = "kubernetes"
default = "deny"

[[rule]]
id = "kube-read"
verdict = "allow"
target = { name = ["prod-cluster"] }
kube = { verb = ["get", "list", "watch"], namespace = ["*"] }

[[rule]]
id = "no-delete-prod"
verdict = "deny"
message = "nothing is deleted in prod through the gateway"
target = { name = ["prod-cluster"] }
kube = { verb = ["delete", "deletecollection"], namespace = ["prod"] }

[[rule]]
id = "exec-needs-approval"
verdict = "approve"
target = { name = ["prod-cluster"] }
kube = { resource = ["pods"], subresource = ["exec", "attach"] }
"#;

/// Every event of every session, oldest session first.
fn all_events(topo: &Topology) -> Vec<serde_json::Value> {
    let mut sessions = topo.sessions();
    sessions.reverse();
    sessions
        .iter()
        .flat_map(|s| topo.events(&s["id"]))
        .collect()
}

#[test]
fn kubectl_through_the_gateway_is_judged_held_and_recorded() {
    require_root();
    if skip_without_kubectl() {
        return;
    }
    let topo = Topology::new("");
    let mut api = topo.kube_apiserver();
    topo.kube_target(&api);
    topo.policy("kube.toml", POLICY);
    let _daemon = topo.start_daemon(&[]);

    // Allowed: a list across all namespaces. kubectl has no token (the kubeconfig `bulkhead
    // run` wrote has none); the gateway sets the one it holds.
    let out = topo.output(Side::Host, topo.governed_kubectl(&["get", "pods", "-A"]));
    let all = text(&out);
    assert!(
        out.status.success(),
        "{all}\nthe API server saw: {:?}\nrecorded: {:?}",
        api.requests(),
        all_events(&topo)
    );
    assert!(
        all.lines()
            .any(|l| l.split_whitespace().take(2).eq(["prod", "web-1"])),
        "{all}"
    );
    assert!(all.contains("coredns-1"), "{all}");

    // Denied: kubectl prints the rule's message; the API server never sees the DELETE.
    let out = topo.output(
        Side::Host,
        topo.governed_kubectl(&["delete", "pod", "x", "-n", "prod"]),
    );
    let denied = text(&out);
    assert!(!out.status.success(), "{denied}");
    assert!(
        denied.contains("Error from server (Forbidden)")
            && denied.contains("nothing is deleted in prod through the gateway"),
        "{denied}"
    );

    // Held: the exec waits for an admin, then runs.
    let mut exec = topo.spawn(
        Side::Host,
        "kubectl-exec",
        topo.governed_kubectl(&[
            "exec", "web-1", "-n", "prod", "--", "echo", "hello", "governed",
        ]),
    );
    let pending = topo.first_pending();
    assert!(
        pending["text"]
            .as_str()
            .is_some_and(|t| t.contains("/api/v1/namespaces/prod/pods/web-1/exec")),
        "{pending}"
    );
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert!(
        exec.child.try_wait().expect("try_wait").is_none(),
        "kubectl exec waits while held"
    );
    let id = pending["id"].to_string();
    let approved = topo.output(
        Side::Host,
        topo.bulkhead(&["approvals", "approve", &id, "--reason", "debugging web-1"]),
    );
    assert!(approved.status.success(), "{}", text(&approved));
    let status = exec.wait();
    // kubectl has exited: its stdout ends, so this waits only on a loaded machine's reader
    // thread (500 ms per line was once too short).
    let stdout = exec.rest_of_stdout(std::time::Duration::from_secs(10));
    assert!(status.success(), "{stdout} {}", exec.stderr());
    assert_eq!(stdout, "hello governed\n", "{}", exec.stderr());

    assert_reached_and_recorded(&topo, &mut api);
}

/// What reached the API server: everything carried the held token, the DELETE never came, the
/// exec came as a WebSocket upgrade. The record: each request with its verdict and rule, the
/// exec's output as terminal output, and never the token.
fn assert_reached_and_recorded(topo: &Topology, api: &mut KubeApi) {
    let seen = api.requests();
    assert!(!seen.is_empty());
    assert!(
        seen.iter().all(|r| r["authorized"] == true),
        "the held token on every request: {seen:?}"
    );
    assert!(
        !seen.iter().any(|r| r["method"] == "DELETE"),
        "the denied DELETE never reached the server: {seen:?}"
    );
    assert!(
        seen.iter().any(|r| r["upgrade"] == true
            && r["path"] == "/api/v1/namespaces/prod/pods/web-1/exec"),
        "{seen:?}"
    );

    let events = all_events(topo);
    let request = |needle: &str, verdict: &str| {
        events.iter().any(|e| {
            e["type"] == "request"
                && e["verdict"] == verdict
                && e["text"].as_str().is_some_and(|t| t.contains(needle))
        })
    };
    assert!(
        request("GET https://10.201.0.2:6443/api/v1/pods", "allow"),
        "{events:?}"
    );
    assert!(
        request(
            "DELETE https://10.201.0.2:6443/api/v1/namespaces/prod/pods/x",
            "deny"
        ),
        "{events:?}"
    );
    assert!(
        request("/api/v1/namespaces/prod/pods/web-1/exec", "approve"),
        "{events:?}"
    );
    assert!(
        events.iter().any(|e| e["type"] == "terminal_output"
            && e["data"]
                .as_str()
                .is_some_and(|d| d.contains("hello governed"))),
        "{events:?}"
    );
    let recorded = serde_json::to_string(&events).expect("JSON");
    assert!(
        !recorded.contains(&api.token),
        "the held token is never recorded"
    );

    // The exec's session exports as asciicast, as an SSH session does.
    let exec_session = events
        .iter()
        .find(|e| e["type"] == "terminal_output")
        .map(|e| e["session"].to_string())
        .expect("a terminal session");
    let cast = topo.output(
        Side::Host,
        topo.bulkhead(&[
            "sessions",
            "export",
            "--session",
            &exec_session,
            "--format",
            "asciicast",
        ]),
    );
    let cast_text = String::from_utf8_lossy(&cast.stdout);
    assert!(cast.status.success(), "{}", text(&cast));
    assert!(
        cast_text
            .lines()
            .any(|l| l.contains("\"o\"") && l.contains("hello governed")),
        "{cast_text}"
    );
}

const EXEC_POLICY: &str = r#"
[[target]]
name = "prod-cluster"
protocol = "kubernetes"
default = "deny"

[[rule]]
id = "kube-read"
verdict = "allow"
target = { name = ["prod-cluster"] }
kube = { verb = ["get", "list", "watch"], namespace = ["*"] }

[[rule]]
id = "exec-in-dev"
verdict = "allow"
target = { name = ["prod-cluster"] }
kube = { verb = ["create"], resource = ["pods"], subresource = ["exec"], namespace = ["dev"] }

[[rule]]
id = "no-exec-in-prod"
verdict = "deny"
message = "no shells in prod pods"
target = { name = ["prod-cluster"] }
kube = { resource = ["pods"], subresource = ["exec"], namespace = ["prod"] }
"#;

#[test]
fn exec_input_is_recorded_and_a_denied_exec_never_opens() {
    require_root();
    if skip_without_kubectl() {
        return;
    }
    let topo = Topology::new("");
    let mut api = topo.kube_apiserver();
    topo.kube_target(&api);
    topo.policy("kube.toml", EXEC_POLICY);
    let _daemon = topo.start_daemon(&[]);

    // kubectl exec -i with stdin from a pipe, all under `bulkhead run`: the test server echoes
    // stdin back; both directions are recorded.
    let mut cmd = topo.governed_kubectl(&[]);
    let kubectl_args: Vec<String> = cmd
        .get_args()
        .skip_while(|a| *a != "--")
        .skip(1)
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let mut shell = topo.bulkhead(&["run", "--", "/bin/sh", "-c"]);
    shell.arg(format!(
        "printf 'typed by the agent\\n' | {} exec -i api-1 -n dev -- cat",
        kubectl_args.join(" ")
    ));
    for (k, v) in cmd.get_envs() {
        match v {
            Some(v) => shell.env(k, v),
            None => shell.env_remove(k),
        };
    }
    shell.current_dir(&topo.dir);
    cmd = shell;
    let out = topo.output(Side::Host, cmd);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "\ntyped by the agent\n",
        "{}",
        text(&out)
    );

    // A denied exec: kubectl says why, and the API server never sees a stream.
    let out = topo.output(
        Side::Host,
        topo.governed_kubectl(&["exec", "web-1", "-n", "prod", "--", "sh"]),
    );
    let denied = text(&out);
    assert!(!out.status.success(), "{denied}");
    assert!(denied.contains("no shells in prod pods"), "{denied}");

    let seen = api.requests();
    assert!(
        !seen
            .iter()
            .any(|r| r["path"] == "/api/v1/namespaces/prod/pods/web-1/exec"),
        "{seen:?}"
    );
    let events = all_events(&topo);
    assert!(
        events.iter().any(|e| e["type"] == "terminal_input"
            && e["data"]
                .as_str()
                .is_some_and(|d| d.contains("typed by the agent"))),
        "{events:?}"
    );
    assert!(
        events.iter().any(|e| e["type"] == "request"
            && e["verdict"] == "deny"
            && e["rules"] == serde_json::json!(["no-exec-in-prod"])),
        "{events:?}"
    );
}

const DELETE_POLICY: &str = r#"
[[target]]
name = "prod-cluster"
protocol = "kubernetes"
default = "deny"

[[rule]]
id = "delete-in-dev"
verdict = "allow"
target = { name = ["prod-cluster"] }
kube = { verb = ["get", "list", "delete"], namespace = ["dev"] }

[[rule]]
id = "no-delete-prod"
verdict = "deny"
message = "nothing is deleted in prod through the gateway"
target = { name = ["prod-cluster"] }
kube = { verb = ["delete", "deletecollection"], namespace = ["prod"] }
"#;

/// Raw paths the API server would read as another namespace than they seem to name are judged
/// as the server reads them (the gateway forwards its normalised form), and what it cannot
/// read the same way is unknown (denied).
#[test]
fn raw_paths_are_judged_as_the_api_server_reads_them() {
    require_root();
    let topo = Topology::new("");
    let mut api = topo.kube_apiserver();
    topo.kube_target(&api);
    topo.policy("kube.toml", DELETE_POLICY);
    let _daemon = topo.start_daemon(&[]);
    let curl = |method: &str, path: &str| {
        let url = format!("{}{path}", api.url);
        let out = topo.output(bulkhead_tests::Side::Host, {
            let mut cmd = topo.bulkhead(&["run", "--", "curl"]);
            cmd.args(["-sS", "--max-time", "20", "--path-as-is", "-X", method])
                .args(["-w", "\n%{http_code}", &url])
                .env("SUDO_UID", "65534")
                .env("SUDO_GID", "65534")
                .env("SUDO_USER", "nobody")
                .current_dir(&topo.dir);
            cmd
        });
        let body = String::from_utf8_lossy(&out.stdout).into_owned();
        let code = body.lines().last().unwrap_or_default().to_string();
        (code, body)
    };
    for path in [
        "/api/v1/namespaces/dev/pods/../../prod/pods/x",
        "/api/v1/namespaces/pr%6Fd/pods/x",
        "/api/v1/namespaces/dev/../prod/pods/x",
    ] {
        let (code, body) = curl("DELETE", path);
        assert_eq!(code, "403", "{path}: {body}");
        assert!(
            body.contains("nothing is deleted in prod"),
            "{path}: {body}"
        );
    }
    // An encoded slash: the API server's reading is not the gateway's to guess.
    let (code, body) = curl("DELETE", "/api/v1/namespaces/dev%2F..%2Fprod/pods/x");
    assert_eq!(code, "403", "{body}");
    assert!(body.contains("on_unknown"), "{body}");
    // What the rules allow goes through.
    let (code, body) = curl("DELETE", "/api/v1/namespaces/dev/pods/api-1");
    assert_eq!(code, "200", "{body}");

    let seen = api.requests();
    let deletes: Vec<&serde_json::Value> =
        seen.iter().filter(|r| r["method"] == "DELETE").collect();
    assert_eq!(deletes.len(), 1, "{seen:?}");
    assert_eq!(deletes[0]["path"], "/api/v1/namespaces/dev/pods/api-1");
    assert_eq!(deletes[0]["authorized"], true);
}

/// The WebSocket exec client a tool could write itself: exact handshakes and frames from
/// Python, over TLS to the cluster's address with the bundle `bulkhead run` gave.
const RAW_EXEC: &str = r#"
import socket, ssl, sys
HOST, PORT = sys.argv[1], int(sys.argv[2])
ctx = ssl.create_default_context()
def frame(payload, opcode=2, rsv=0):
    mask = b"\x11\x22\x33\x44"
    head = bytes([0x80 | rsv | opcode, 0x80 | len(payload)])
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
def read_frame(s):
    def exact(n):
        out = b""
        while len(out) < n:
            b = s.recv(n - len(out))
            if not b:
                raise EOFError
            out += b
        return out
    h = exact(2)
    n = h[1] & 0x7f
    if n == 126:
        n = int.from_bytes(exact(2), "big")
    elif n == 127:
        n = int.from_bytes(exact(8), "big")
    return h[0] & 0x0f, exact(n)
def upgrade(command, protocols, extensions=None):
    s = ctx.wrap_socket(socket.create_connection((HOST, PORT), timeout=20), server_hostname=HOST)
    head = (f"GET /api/v1/namespaces/dev/pods/api-1/exec?command=echo&command={command}"
            f"&stdin=true&stdout=true HTTP/1.1\r\nHost: {HOST}:{PORT}\r\n"
            "Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            f"Sec-WebSocket-Protocol: {protocols}\r\n")
    if extensions:
        head += f"Sec-WebSocket-Extensions: {extensions}\r\n"
    s.sendall((head + "\r\n").encode())
    got = b""
    while b"\r\n\r\n" not in got:
        b = s.recv(65536)
        if not b:
            break
        got += b
    answer, _, rest = got.partition(b"\r\n\r\n")
    lines = answer.decode().split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (l.split(":", 1) for l in lines[1:] if ":" in l)}
    return s, lines[0], headers, rest
# 1. Only a base64 subprotocol: refused before it reaches the cluster.
s, status, headers, rest = upgrade("b64only", "v4.base64.channel.k8s.io")
print("base64 only:", status, b"base64" in rest)
s.close()
# 2. base64 first, the binary one second, and compression: the binary one, uncompressed.
s, status, headers, rest = upgrade("mixed", "v4.base64.channel.k8s.io, v5.channel.k8s.io",
                                   "permessage-deflate; client_max_window_bits")
print("mixed:", status, headers.get("sec-websocket-protocol"),
      headers.get("sec-websocket-extensions"))
print("stdout:", read_frame(s))
# stdin in a text message: the apiserver reads it as stdin all the same.
s.sendall(frame(b"\x00typed in a text frame\n", opcode=1))
print("echo:", read_frame(s))
s.sendall(frame(b"\xff\x00"))
print("status:", read_frame(s)[1][:1])
s.close()
# 3. A frame with RSV1 set (what permessage-deflate sends): the stream ends there.
s, status, headers, rest = upgrade("rsv", "v5.channel.k8s.io")
print("rsv:", status, read_frame(s))
s.sendall(frame(b"\x00compressed-looking\n", rsv=0x40))
try:
    while True:
        op, data = read_frame(s)
        print("after rsv:", op, data)
except (EOFError, ConnectionError, ssl.SSLError, socket.timeout) as e:
    print("closed:", type(e).__name__)
"#;

/// What the record cannot read is not relayed: a WebSocket exec that offers only the
/// `base64.channel.k8s.io` subprotocol is refused (403) and never reaches the cluster; one that
/// offers it first gets the binary protocol (the offer is cut down before it is forwarded) and
/// no compression; stdin sent in a text message is recorded (the apiserver reads it); a frame
/// with a reserved bit set (a compressed frame) ends the stream instead of passing unread.
#[test]
fn exec_streams_the_record_cannot_read_are_not_relayed() {
    require_root();
    let topo = Topology::new("");
    let mut api = topo.kube_apiserver();
    topo.kube_target(&api);
    topo.policy("kube.toml", EXEC_POLICY);
    let _daemon = topo.start_daemon(&[]);
    let (host, port) = api
        .url
        .trim_start_matches("https://")
        .rsplit_once(':')
        .expect("HOST:PORT");
    let out = topo.run_governed("/usr/bin/python3", &["-c", RAW_EXEC, host, port]);
    let printed = String::from_utf8_lossy(&out.stdout).into_owned();
    let all = text(&out);
    assert!(out.status.success(), "{all}");
    let lines: Vec<&str> = printed.lines().collect();
    assert_eq!(
        lines,
        vec![
            "base64 only: HTTP/1.1 403 Forbidden True",
            "mixed: HTTP/1.1 101 Switching Protocols v5.channel.k8s.io None",
            "stdout: (2, b'\\x01mixed\\n')",
            "echo: (2, b'\\x01typed in a text frame\\n')",
            "status: b'\\x03'",
            "rsv: HTTP/1.1 101 Switching Protocols (2, b'\\x01rsv\\n')",
            "closed: EOFError",
        ],
        "{all}"
    );

    // What reached the cluster: no base64-only exec; the others offered only what the gateway
    // reads, and no extension.
    let seen = api.requests();
    let execs: Vec<&serde_json::Value> = seen.iter().filter(|r| r["upgrade"] == true).collect();
    assert_eq!(execs.len(), 2, "{seen:?}");
    assert!(execs[0]["query"]
        .as_str()
        .unwrap()
        .contains("command=mixed"));
    for exec in &execs {
        assert_eq!(
            exec["protocols"],
            serde_json::json!(["v5.channel.k8s.io"]),
            "{exec}"
        );
        assert_eq!(exec["extensions"], serde_json::json!([]), "{exec}");
    }

    let events = all_events(&topo);
    assert!(
        events.iter().any(|e| e["type"] == "request"
            && e["verdict"] == "deny"
            && e["text"]
                .as_str()
                .is_some_and(|t| t.contains("command=b64only"))
            && e["error"].as_str().is_some_and(|t| t.contains("base64"))),
        "{events:?}"
    );
    assert!(
        events
            .iter()
            .any(|e| e["type"] == "terminal_input" && e["data"] == "typed in a text frame\n"),
        "{events:?}"
    );
    assert!(
        events.iter().any(|e| e["type"] == "response"
            && e["error"]
                .as_str()
                .is_some_and(|t| t.contains("reserved bits"))),
        "{events:?}"
    );
    assert!(
        !events.iter().any(|e| e["data"]
            .as_str()
            .is_some_and(|d| d.contains("compressed-looking"))),
        "{events:?}"
    );
}
