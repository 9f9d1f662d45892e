//! Connection-level policy for opaque TCP, against the real kernel: a `tcp` target's connection,
//! and a destination that matches no target (named by its address), is decided before a byte
//! reaches the target. Denied connections are reset and recorded as refused, held ones wait for
//! an admin, observed ones go through with the verdict they would have had on the record.
//!
//! Each test builds its own namespaces, veth pair and cgroup (see `bulkhead_tests::Topology`)
//! and needs root.

use std::{process::Command, time::Duration};

use bulkhead_tests::{reply, require_root, Proc, Side, Topology, TARGET_V4, TARGET_V6};
use serde_json::{json, Value};

/// Target `build-host`: the echo server at `TARGET_V4:7000`, opaque TCP.
const BUILD_HOST: &str =
    "[[target]]\nname = \"build-host\"\naddresses = [\"10.201.0.2:7000\"]\nprotocol = \"tcp\"\n";

fn build_host_addr() -> String {
    format!("{TARGET_V4}:7000")
}

/// The `n` ended sessions of process `pid`, waiting up to 10 s for them to be recorded.
fn ended_sessions_of(topo: &Topology, pid: &Value, n: usize) -> Vec<Value> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let mine: Vec<Value> = topo
            .sessions()
            .into_iter()
            .filter(|s| s["identity"]["pid"] == *pid && s["outcome"]["kind"] != "open")
            .collect();
        if mine.len() == n {
            return mine;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{n} sessions of {pid}: {mine:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A running daemon under one policy file, with echo servers on the target host.
struct World {
    // Fields drop in order: processes first, then the namespaces they run in.
    _daemon: Proc,
    echoes: Vec<Proc>,
    topo: Topology,
}

impl World {
    /// `config` appended to the daemon's configuration, `policy` as its only policy file, and
    /// an echo server (`bh-probe serve`) at each of `echo_at` on the target host.
    fn new(config: &str, policy: &str, echo_at: &[String]) -> Self {
        require_root();
        let topo = Topology::new(config);
        topo.policy("tcp.toml", policy);
        let echoes = echo_at
            .iter()
            .map(|a| topo.echo_server(Side::Target, a.parse().expect("echo address")))
            .collect();
        let daemon = topo.start_daemon(&[]);
        Self {
            _daemon: daemon,
            echoes,
            topo,
        }
    }

    /// Target `build-host` with its echo server, under a policy whose `build-host` table says
    /// `default = "deny"` and goes on with `rest` (more keys of that table, then rules).
    fn build_host(rest: &str) -> Self {
        Self::new(
            BUILD_HOST,
            &format!("[[target]]\nname = \"build-host\"\ndefault = \"deny\"\n{rest}"),
            &[build_host_addr()],
        )
    }

    /// A governed `bh-probe connect ADDR TEXT`, to completion.
    fn connect(&self, addr: &str, text: &str) -> Value {
        self.topo.probe_connect(Side::Governed, addr, text)
    }

    /// A governed `bh-probe connect ADDR TEXT` left running (it may be held).
    fn spawn_connect(&self, addr: &str, text: &str) -> Proc {
        let mut cmd = Command::new(self.topo.probe());
        cmd.args(["connect", addr, text]);
        self.topo.spawn(Side::Governed, "client", cmd)
    }

    /// Asserts that `client`'s bytes made the round trip to echo server `echo` and back, and
    /// that its session was recorded as relayed and closed.
    fn assert_relayed(&mut self, client: &Value, text: &str, echo: usize) -> Value {
        assert_eq!(reply(client)["data"], text, "{client}");
        let accepted = self.echoes[echo].line(Duration::from_secs(5));
        assert!(
            accepted
                .as_deref()
                .is_some_and(|l| l.starts_with("accepted ")),
            "the target saw the connection: {accepted:?}"
        );
        let session = self.topo.wait_session_of(&client["pid"]);
        assert_eq!(session["outcome"]["kind"], "closed", "{session}");
        assert_eq!(session["bytes_to_target"], text.len(), "{session}");
        session
    }

    /// Asserts that `client`'s connection to `destination` was refused by `rule` before
    /// anything reached the target: recorded as refused and denied, with the connection's
    /// decision in its events, and the client reset. Returns the session.
    fn assert_refused(&mut self, client: &Value, destination: &str, rule: &str) -> Value {
        let session = self.topo.wait_session_of(&client["pid"]);
        assert_eq!(session["destination"], destination, "{session}");
        assert_eq!(session["outcome"]["kind"], "refused", "{session}");
        assert!(
            session["outcome"]["reason"]
                .as_str()
                .is_some_and(|r| !r.is_empty()),
            "a refusal says why: {session}"
        );
        assert!(
            self.denied_sessions().contains(&session["id"]),
            "`sessions list --verdict denied` lists {session}"
        );
        assert_eq!(
            self.decisions(&session).last(),
            Some(&decision("deny", &[rule], false)),
            "the connection's final decision: {session}"
        );
        self.assert_targets_saw_nothing();
        // The probe sent nothing and half-closed: a plain close would read as an empty reply,
        // a reset as an error (on the read, or earlier if it came first).
        assert!(
            client["reply"].is_null()
                && ["ConnectionReset", "NotConnected", "BrokenPipe"]
                    .contains(&client["kind"].as_str().unwrap_or_default()),
            "the client's connection is reset: {client}"
        );
        session
    }

    /// The session's `request` events, each a decision on the connection itself, as
    /// [`decision`]s.
    fn decisions(&self, session: &Value) -> Vec<Value> {
        let text = format!("connect {}", session["destination"].as_str().unwrap());
        self.topo
            .events(&session["id"])
            .iter()
            .filter(|e| e["type"] == "request")
            .map(|e| {
                assert_eq!(
                    (&e["class"], &e["text"]),
                    (&json!("connect"), &json!(text)),
                    "{e}"
                );
                json!({ "verdict": e["verdict"], "rules": e["rules"], "observed": e["observed"] })
            })
            .collect()
    }

    /// The `state` and `reason` of the session's approval events, in order.
    fn approval_events(&self, session: &Value) -> Vec<(Value, Value)> {
        self.topo
            .events(&session["id"])
            .iter()
            .filter(|e| e["type"] == "approval")
            .map(|e| (e["state"].clone(), e["reason"].clone()))
            .collect()
    }

    /// Ids of the sessions `sessions list --verdict denied` lists.
    fn denied_sessions(&self) -> Vec<Value> {
        let list = self
            .topo
            .run_cli(&["sessions", "list", "--json", "--verdict", "denied"])
            .unwrap();
        list.as_array()
            .unwrap()
            .iter()
            .map(|s| s["id"].clone())
            .collect()
    }

    /// No echo server accepted a connection that was not already accounted for.
    fn assert_targets_saw_nothing(&mut self) {
        std::thread::sleep(Duration::from_millis(200));
        for echo in &mut self.echoes {
            let lines = echo.drain_lines();
            assert!(lines.is_empty(), "a target saw a connection: {lines:?}");
        }
    }

    /// `bulkhead approvals VERB ID --reason REASON`, which must succeed.
    fn decide(&self, verb: &str, pending: &Value, reason: &str) {
        let id = pending["id"].to_string();
        let out = self.topo.output(
            Side::Host,
            self.topo
                .bulkhead(&["approvals", verb, &id, "--reason", reason]),
        );
        assert!(
            out.status.success(),
            "approvals {verb} {id}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// A decision on a connection as [`World::decisions`] lists it.
fn decision(verdict: &str, rules: &[&str], observed: bool) -> Value {
    json!({ "verdict": verdict, "rules": rules, "observed": observed })
}

/// The JSON line a spawned probe printed when it finished.
fn finished(client: &mut Proc) -> Value {
    client.wait();
    let line = client
        .line(Duration::from_secs(5))
        .unwrap_or_else(|| panic!("the probe printed nothing: {}", client.stderr()));
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("probe output {line:?}: {e}"))
}

#[test]
fn a_tcp_target_denied_by_default_is_reset_before_the_target_sees_it() {
    let mut w = World::build_host("");
    let client = w.connect(&build_host_addr(), "");
    let session = w.assert_refused(&client, &build_host_addr(), "target:build-host:default");
    assert_eq!(session["target"], "build-host", "{session}");
    // The reason recorded is the policy's message, as `policy test` shows it.
    let dir = w.topo.policy_dir().display().to_string();
    let out = w.topo.output(
        Side::Host,
        w.topo.bulkhead(&[
            "policy",
            "test",
            "--dir",
            &dir,
            "--target",
            "build-host",
            "--connect",
            "--json",
        ]),
    );
    assert_eq!(
        out.status.code(),
        Some(1),
        "policy test exits 1 on deny: {out:?}"
    );
    let tried: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        tried["rules"],
        json!(["target:build-host:default"]),
        "{tried}"
    );
    assert_eq!(session["outcome"]["reason"], tried["message"], "{tried}");
}

#[test]
fn an_identity_gate_lets_the_named_process_through_and_refuses_another() {
    let mut w = World::build_host(
        r#"
[[rule]]
id = "probe-may"
verdict = "allow"
target = { name = ["build-host"] }
identity = { process = ["bh-probe"] }
"#,
    );
    let allowed = w.connect(&build_host_addr(), "gated");
    let session = w.assert_relayed(&allowed, "gated", 0);
    assert_eq!(
        w.decisions(&session),
        [decision("allow", &["probe-may"], false)]
    );

    // The same program under another name is another process to the policy.
    let other = w
        .topo
        .named_probe_connect("other-probe", Side::Governed, &build_host_addr(), "");
    let session = w.assert_refused(&other, &build_host_addr(), "target:build-host:default");
    assert_eq!(session["identity"]["comm"], "other-probe", "{session}");
}

#[test]
fn a_connection_held_for_approval_waits_then_goes_through_or_is_refused() {
    let mut w = World::build_host(
        r#"
[[rule]]
id = "ask-first"
verdict = "approve"
target = { name = ["build-host"] }
"#,
    );
    let dst = build_host_addr();

    let mut held = w.spawn_connect(&dst, "held");
    let pending = w.topo.first_pending();
    assert_eq!(pending["text"], format!("connect {dst}"), "{pending}");
    assert_eq!(pending["target"], "build-host", "{pending}");
    assert_eq!(pending["rule"], "ask-first", "{pending}");
    // While it waits, the client has no answer and nothing reached the target.
    w.assert_targets_saw_nothing();
    assert!(
        held.child.try_wait().unwrap().is_none(),
        "the client is still waiting: {:?}",
        held.drain_lines()
    );
    w.decide("approve", &pending, "x");
    let client = finished(&mut held);
    let session = w.assert_relayed(&client, "held", 0);
    assert_eq!(
        w.decisions(&session),
        [decision("approve", &["ask-first"], false)]
    );
    assert_eq!(
        w.approval_events(&session),
        vec![
            (json!("requested"), Value::Null),
            (json!("approved"), json!("x"))
        ]
    );
    assert!(
        !w.denied_sessions().contains(&session["id"]),
        "an approved connection is not denied: {session}"
    );

    let mut refused = w.spawn_connect(&dst, "");
    let pending = w.topo.first_pending();
    assert_eq!(pending["text"], format!("connect {dst}"), "{pending}");
    w.decide("deny", &pending, "not now");
    let client = finished(&mut refused);
    let session = w.assert_refused(&client, &dst, "ask-first");
    // The hold, then the final verdict (which counts the session as denied).
    assert_eq!(
        w.decisions(&session),
        [
            decision("approve", &["ask-first"], false),
            decision("deny", &["ask-first"], false)
        ]
    );
    assert_eq!(
        w.approval_events(&session),
        vec![
            (json!("requested"), Value::Null),
            (json!("denied"), json!("not now"))
        ]
    );
}

#[test]
fn observe_mode_relays_a_connection_the_policy_would_deny_and_records_that() {
    let mut w = World::build_host(r#"mode = "observe""#);
    let client = w.connect(&build_host_addr(), "watched");
    let session = w.assert_relayed(&client, "watched", 0);
    assert_eq!(
        w.decisions(&session),
        [decision("deny", &["target:build-host:default"], true)]
    );
    assert!(
        w.denied_sessions().contains(&session["id"]),
        "the record says what would have been denied: {session}"
    );
}

#[test]
fn unmatched_destinations_are_judged_under_their_address() {
    // No target configured and `capture.unmatched = "relay"` (the default): each destination is
    // judged as a `tcp` target named by its address. The echo servers listen on both families.
    let mut w = World::new(
        "",
        r#"
[[target]]
protocol = "tcp"
default = "allow"

[[rule]]
id = "no-7001"
verdict = "deny"
message = "port 7001 is closed to agents"
target = { name = ["10.201.0.2:7001", "[fd00:201::2]:7001"] }
"#,
        &["[::]:7001".into(), "[::]:7002".into()],
    );
    for open in [format!("{TARGET_V4}:7002"), format!("[{TARGET_V6}]:7002")] {
        let client = w.connect(&open, "open");
        let session = w.assert_relayed(&client, "open", 1);
        assert_eq!(session["destination"], open, "{session}");
        assert_eq!(
            w.decisions(&session),
            [decision(
                "allow",
                &[&format!("target:{open}:default")],
                false
            )]
        );
        assert!(!w.denied_sessions().contains(&session["id"]), "{session}");
    }
    // The IPv4-mapped form of the denied address is the same destination, named the same way.
    for (dialled, destination) in [
        (format!("{TARGET_V4}:7001"), format!("{TARGET_V4}:7001")),
        (format!("[{TARGET_V6}]:7001"), format!("[{TARGET_V6}]:7001")),
        (
            format!("[::ffff:{TARGET_V4}]:7001"),
            format!("{TARGET_V4}:7001"),
        ),
    ] {
        let client = w.connect(&dialled, "");
        let session = w.assert_refused(&client, &destination, "no-7001");
        assert!(
            session["outcome"]["reason"]
                .as_str()
                .is_some_and(|r| r.contains("port 7001 is closed to agents")),
            "the rule's message is the reason: {session}"
        );
    }
}

/// A request that succeeded for the client is recorded as such: Python's urllib (which closes
/// its socket without reading to the end) through the opaque relay.
#[test]
fn a_python_http_request_through_the_relay_is_recorded_closed() {
    require_root();
    let topo = Topology::new("");
    topo.allow_opaque_tcp();
    let root = topo.dir.join("www");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::write(root.join("hello.txt"), "hello from the target\n").unwrap();
    let mut server = Command::new("python3");
    server
        .args([
            "-m",
            "http.server",
            "--bind",
            TARGET_V4,
            "8080",
            "--directory",
        ])
        .arg(&root);
    let _server = topo.spawn(Side::Target, "http", server);
    let _daemon = topo.start_daemon(&[]);
    let script = format!(
        "import time, urllib.request\n\
         for _ in range(50):\n\
         \x20   try:\n\
         \x20       print(urllib.request.urlopen('http://{TARGET_V4}:8080/hello.txt', timeout=5).read().decode(), end='')\n\
         \x20       break\n\
         \x20   except OSError:\n\
         \x20       time.sleep(0.1)\n"
    );
    let mut client = Command::new("python3");
    client.args(["-c", &script]);
    let out = topo.output(Side::Governed, client);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "hello from the target\n",
        "{out:?}"
    );
    let sessions = topo.sessions();
    let last = sessions
        .iter()
        .find(|s| s["bytes_from_target"].as_u64().unwrap_or(0) > 0)
        .unwrap_or_else(|| panic!("{sessions:?}"));
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let mut last = last.clone();
    while last["outcome"]["kind"] == "open" && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        last = topo
            .sessions()
            .into_iter()
            .find(|s| s["id"] == last["id"])
            .unwrap();
    }
    assert_eq!(last["outcome"]["kind"], "closed", "{last}");
}

#[test]
fn a_process_that_execs_another_program_is_judged_as_that_program() {
    let w = World::build_host(
        r#"
[[rule]]
id = "python-may"
verdict = "allow"
target = { name = ["build-host"] }
identity = { process = ["python3"] }
"#,
    );
    let addr = build_host_addr();
    let (host, port) = addr.rsplit_once(':').unwrap();
    // Python, which the rule lets through, connects; then the same process (same pid, same
    // start time) becomes another program by execve and connects again.
    let other = w.topo.probe_named("other-probe");
    let script = format!(
        "import os, socket\n\
         s = socket.create_connection(('{host}', {port}))\n\
         s.sendall(b'first')\n\
         s.shutdown(socket.SHUT_WR)\n\
         print(s.recv(100).decode(), flush=True)\n\
         s.close()\n\
         os.execv('{other}', ['{other}', 'connect', '{addr}', ''])\n",
        other = other.display()
    );
    let mut cmd = Command::new("python3");
    cmd.args(["-c", &script]);
    let out = w.topo.output(Side::Governed, cmd);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.lines().next().is_some_and(|l| l.contains("first")),
        "python's connection relayed: {stdout}"
    );
    let execed = bulkhead_tests::parse_probe(&out);
    let pid = execed["pid"].clone();
    let sessions = ended_sessions_of(&w.topo, &pid, 2);
    let by_comm = |comm: &str| {
        sessions
            .iter()
            .find(|s| s["identity"]["comm"] == comm)
            .unwrap_or_else(|| panic!("a session of {comm}: {sessions:?}"))
    };
    assert_eq!(by_comm("python3")["outcome"]["kind"], "closed");
    let after = by_comm("other-probe");
    assert_eq!(after["outcome"]["kind"], "refused", "{after}");
    assert!(
        after["identity"]["exe"]
            .as_str()
            .is_some_and(|e| e.ends_with("/other-probe")),
        "identified by its new executable: {after}"
    );
}

#[test]
fn a_rule_on_an_ancestor_judges_the_parent_as_it_is_at_each_connect() {
    let w = World::build_host(
        r#"
[[rule]]
id = "under-the-wrapper"
verdict = "allow"
target = { name = ["build-host"] }
identity = { ancestor = ["trusted-wrapper"] }
"#,
    );
    let addr = build_host_addr();
    let (host, port) = addr.rsplit_once(':').unwrap();
    // The child connects twice, the same process both times (its own pid, start time,
    // executable and name do not change, so the daemon's identity cache would serve it). In
    // between, its parent, the process the rule trusts, execs another program.
    let child = format!(
        "import json, os, socket, sys, time\n\
         def attempt():\n\
         \x20   try:\n\
         \x20       s = socket.create_connection(('{host}', {port}), timeout=5)\n\
         \x20       s.sendall(b'hi')\n\
         \x20       s.shutdown(socket.SHUT_WR)\n\
         \x20       return s.recv(100).decode() or 'closed'\n\
         \x20   except OSError as e:\n\
         \x20       return 'error: ' + str(e)\n\
         first = attempt()\n\
         os.write(int(sys.argv[1]), b'x')\n\
         parent = os.getppid()\n\
         for _ in range(250):\n\
         \x20   if open(f'/proc/{{parent}}/comm').read().strip() == 'sleep':\n\
         \x20       break\n\
         \x20   time.sleep(0.02)\n\
         print(json.dumps({{'pid': os.getpid(), 'parent': open(f'/proc/{{parent}}/comm').read().strip(), 'first': first, 'second': attempt()}}), flush=True)\n"
    );
    let parent = format!(
        "import ctypes, os, subprocess, sys\n\
         ctypes.CDLL(None).prctl(15, b'trusted-wrapper', 0, 0, 0)\n\
         r, w = os.pipe()\n\
         subprocess.Popen([sys.executable, '-c', {child:?}, str(w)], pass_fds=(w,))\n\
         os.read(r, 1)\n\
         os.execv('/bin/sleep', ['sleep', '3'])\n"
    );
    let mut cmd = Command::new("python3");
    cmd.args(["-c", &parent]);
    let out = w.topo.output(Side::Governed, cmd);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let seen: Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        panic!(
            "child's report: {e}: {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert_eq!(seen["parent"], "sleep", "the parent exec'd: {seen}");
    assert!(
        seen["first"].as_str().is_some_and(|r| r.contains("hi")),
        "under the trusted parent the connection is relayed: {seen}"
    );
    assert!(
        !seen["second"].as_str().is_some_and(|r| r.contains("hi")),
        "under the exec'd parent nothing is relayed: {seen}"
    );
    let pid = seen["pid"].clone();
    let sessions = ended_sessions_of(&w.topo, &pid, 2);
    let under = |parent: &str| {
        sessions
            .iter()
            .find(|s| s["identity"]["ancestors"][0]["comm"] == parent)
            .unwrap_or_else(|| panic!("a session under {parent}: {sessions:?}"))
    };
    assert_eq!(under("trusted-wrapper")["outcome"]["kind"], "closed");
    let after = under("sleep");
    assert_eq!(after["outcome"]["kind"], "refused", "{after}");
    assert!(
        after["identity"]["ancestors"][0]["exe"]
            .as_str()
            .is_some_and(|e| e.ends_with("/sleep")),
        "the parent identified by its new executable: {after}"
    );
}
