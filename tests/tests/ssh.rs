//! The SSH gateway (#14) against OpenSSH: Debian's sshd on the target host, the `ssh` client
//! governed. The client holds no key for the target; the gateway logs in with the held one.

use std::{process::Command, time::Duration};

use bulkhead_tests::{require_root, ssh::SSHD_PORT, Side, Topology, TARGET_V4};

const POLICY: &str = r#"
[[target]]
name = "box"
protocol = "ssh"
default = "deny"

[[rule]]
id = "box-allow"
verdict = "allow"
target = { name = ["box"] }
ssh = { command = ["echo **", "cat", "exit *", "true", "printf **"], shell = true }

[[rule]]
id = "box-no-rm"
verdict = "deny"
message = "no deleting through the gateway"
target = { name = ["box"] }
ssh = { command = ["rm **"] }

[[rule]]
id = "box-touch-approve"
verdict = "approve"
target = { name = ["box"] }
ssh = { command = ["touch **"] }
"#;

/// Events of the newest session whose request texts include `text`.
fn session_with(topo: &Topology, text: &str) -> (serde_json::Value, Vec<serde_json::Value>) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        for s in topo.sessions() {
            if s["outcome"]["kind"] == "open" {
                continue;
            }
            let events = topo.events(&s["id"]);
            if events
                .iter()
                .any(|e| e["type"] == "request" && e["text"] == text)
            {
                return (s, events);
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no closed session with request {text:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn exec_runs_with_the_held_key_relays_stdin_and_exit_status_and_is_recorded() {
    require_root();
    let topo = Topology::new("");
    let (_sshd, _daemon) = topo.ssh_target(POLICY, "");

    let (code, out, err) = topo.ssh(&[], "echo ok");
    assert_eq!((code, out.as_str()), (Some(0), "ok\n"), "{err}");

    // The exit status comes back as the target's.
    let (code, _, err) = topo.ssh(&[], "exit 3");
    assert_eq!(code, Some(3), "{err}");

    // stdin piped through to the remote command, EOF included (cat ends).
    let mut piped = Command::new("sh");
    let ssh = topo.ssh_line(&[], Some("cat"));
    piped.args(["-c", &format!("printf 'line one\\nline two\\n' | {ssh}")]);
    let out = topo.output(Side::Governed, piped);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "line one\nline two\n",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let (session, events) = session_with(&topo, "echo ok");
    assert_eq!(session["protocol"], "ssh", "{session}");
    let request = events
        .iter()
        .find(|e| e["type"] == "request" && e["text"] == "echo ok")
        .unwrap();
    assert_eq!(request["verdict"], "allow", "{request}");
    assert_eq!(request["rules"][0], "box-allow", "{request}");
    assert!(
        events.iter().any(|e| e["type"] == "auth"
            && e["side"] == "target"
            && e["user"] == "root"
            && e["ok"] == true),
        "{events:?}"
    );
    assert!(
        events
            .iter()
            .any(|e| e["type"] == "response" && e["summary"] == "exit 0"),
        "{events:?}"
    );
}

#[test]
fn a_denied_command_gets_the_message_and_status_126_and_never_runs() {
    require_root();
    let topo = Topology::new("");
    let (_sshd, _daemon) = topo.ssh_target(POLICY, "");
    let marker = topo.dir.join("must-stay");
    std::fs::write(&marker, "x").unwrap();
    let (code, out, err) = topo.ssh(&[], &format!("rm -f {}", marker.display()));
    assert_eq!(code, Some(126), "{out} {err}");
    assert!(err.contains("no deleting through the gateway"), "{err}");
    assert!(marker.exists(), "the denied command ran");
    // Not covered by any allow rule: the target's default (deny).
    let (code, _, err) = topo.ssh(&[], "id");
    assert_eq!(code, Some(126), "{err}");
    // A shell expansion is unknown: denied, whatever it would expand to.
    let (code, _, err) = topo.ssh(&[], "echo $(id)");
    assert_eq!(code, Some(126), "{err}");
    let (_, events) = session_with(&topo, &format!("rm -f {}", marker.display()));
    let request = events.iter().find(|e| e["type"] == "request").unwrap();
    assert_eq!(request["verdict"], "deny", "{request}");
    assert_eq!(request["rules"][0], "box-no-rm", "{request}");
}

#[test]
fn forwarding_is_refused_and_recorded() {
    require_root();
    let topo = Topology::new("");
    // A real agent (outside the cgroup; its socket allowed to governed processes), since
    // OpenSSH asks to forward only an agent it reaches.
    let agent_sock = topo.dir.join("agent.sock");
    let (_sshd, _daemon) = topo.ssh_target(
        POLICY,
        &format!("[capture]\nunix_allow = [\"{}\"]\n", agent_sock.display()),
    );
    let mut agent_cmd = Command::new("ssh-agent");
    agent_cmd.args(["-D", "-a"]).arg(&agent_sock);
    let _agent = topo.spawn(Side::Host, "ssh-agent", agent_cmd);
    for _ in 0..100 {
        if agent_sock.exists() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // -W is a direct-tcpip channel (what -L, -D and -J open).
    let (code, _, err) = topo.ssh(&["-W", &format!("{TARGET_V4}:{SSHD_PORT}")], "");
    assert_eq!(code, Some(255), "{err}");
    assert!(err.contains("administratively prohibited"), "{err}");
    // -R: the remote listener is refused.
    let (code, _, err) = topo.ssh(
        &["-o", "ExitOnForwardFailure=yes", "-R", "0:127.0.0.1:9"],
        "true",
    );
    assert_eq!(code, Some(255), "{err}");
    // -A: the agent request is refused (the command still runs, as with sshd's own refusal).
    let mut agent = topo.ssh_command(&["-A"], Some("true"));
    agent.env("SSH_AUTH_SOCK", &agent_sock);
    let out = topo.output(Side::Governed, agent);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let refused: Vec<String> = topo
        .sessions()
        .iter()
        .flat_map(|s| topo.events(&s["id"]))
        .filter(|e| e["type"] == "request" && e["class"] == "forward")
        .map(|e| e["text"].as_str().unwrap_or_default().to_string())
        .collect();
    assert!(
        refused
            .iter()
            .any(|t| t == &format!("direct-tcpip {TARGET_V4}:{SSHD_PORT}")),
        "{refused:?}"
    );
    assert!(
        refused.iter().any(|t| t.starts_with("tcpip-forward")),
        "{refused:?}"
    );
    assert!(
        refused.iter().any(|t| t == "agent forwarding"),
        "{refused:?}"
    );
    // -Y: X11 forwarding is refused (the command still runs, without a display).
    let mut x11 = topo.ssh_command(&["-Y"], Some("true"));
    x11.env("DISPLAY", "127.0.0.1:37")
        .env("XAUTHORITY", topo.dir.join("client-Xauthority"));
    let out = topo.output(Side::Governed, x11);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(
        forward_requests(&topo).contains(&("x11 forwarding".to_string(), "deny".to_string())),
        "{:?}",
        forward_requests(&topo)
    );
}

/// [`POLICY`] with tunnels, agent forwarding and `BULKHEAD_*` variables allowed by rule, and
/// the commands the tests below run.
fn tunnel_policy() -> String {
    format!(
        "{POLICY}\n[[rule]]\nid = \"box-tunnels\"\nverdict = \"allow\"\ntarget = {{ name = [\"box\"] }}\n\
         ssh = {{ forward = [\"{TARGET_V4}:{ECHO_PORT}\"], remote_forward = [\"localhost:*\"], agent = true, env = [\"BULKHEAD_*\"] }}\n\
         [[rule]]\nid = \"box-tools\"\nverdict = \"allow\"\ntarget = {{ name = [\"box\"] }}\n\
         ssh = {{ command = [\"ssh-add -l\", \"printenv **\"] }}\n"
    )
}

/// The echo server's port on the target host (`-L`), and on the governed host (`-R`).
const ECHO_PORT: u16 = 7007;

/// Probes `addr` from `side` until the echo server behind it answers (a tunnel being set up
/// by an `ssh` started just before); the echoed text.
fn echoed_through(
    topo: &Topology,
    side: Side,
    addr: &str,
    text: &str,
    context: &dyn Fn() -> String,
) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let probe = topo.probe_connect(side, addr, text);
        if probe["reply"].as_str().is_some_and(|r| !r.is_empty()) {
            return bulkhead_tests::reply(&probe)["data"]
                .as_str()
                .unwrap_or_default()
                .to_string();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no echo through {addr}: {probe}\n{}\n{:?}",
            context(),
            forward_requests(topo)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Forwarding requests recorded, as (text, verdict).
fn forward_requests(topo: &Topology) -> Vec<(String, String)> {
    topo.sessions()
        .iter()
        .flat_map(|s| topo.events(&s["id"]))
        .filter(|e| e["type"] == "request" && e["class"] == "forward")
        .map(|e| {
            (
                e["text"].as_str().unwrap_or_default().to_string(),
                e["verdict"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

/// The echo server on the target host, and a governed `ssh -N -L 127.0.0.1:PORT:echo` to it
/// through the gateway (the listener is reached from outside the cgroup: not captured).
fn echo_through_local_forward(
    topo: &Topology,
    port: u16,
) -> (bulkhead_tests::Proc, bulkhead_tests::Proc) {
    let echo = topo.echo_server(
        Side::Target,
        format!("{TARGET_V4}:{ECHO_PORT}").parse().unwrap(),
    );
    let forward = format!("127.0.0.1:{port}:{TARGET_V4}:{ECHO_PORT}");
    let tunnel = topo.spawn(
        Side::Governed,
        "ssh -L",
        topo.ssh_command(
            &["-N", "-o", "ExitOnForwardFailure=yes", "-L", &forward],
            None,
        ),
    );
    (echo, tunnel)
}

#[test]
fn local_forwarding_allowed_by_a_rule_carries_data_and_is_recorded() {
    require_root();
    let topo = Topology::new("");
    let (_sshd, _daemon) = topo.ssh_target(&tunnel_policy(), "");
    // -L: a listener on the governed host, through the gateway, to the echo server that only
    // the target reaches; the connection is made from outside the cgroup (not captured).
    let (_echo, mut tunnel) = echo_through_local_forward(&topo, 17007);
    let echoed = echoed_through(
        &topo,
        Side::Host,
        "127.0.0.1:17007",
        "through the tunnel",
        &|| tunnel.stderr(),
    );
    assert_eq!(echoed, "through the tunnel", "{}", tunnel.stderr());
    // Another destination is not allowed: the channel is refused, the ssh goes on.
    let (code, _, err) = topo.ssh(&["-W", &format!("{TARGET_V4}:{SSHD_PORT}")], "");
    assert_eq!(code, Some(255), "{err}");
    assert!(err.contains("administratively prohibited"), "{err}");
    // The tunnel's record: its response (bytes both ways) once the echo server closed it.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let events = loop {
        let events: Vec<serde_json::Value> = topo
            .sessions()
            .iter()
            .flat_map(|s| topo.events(&s["id"]))
            .collect();
        if events.iter().any(|e| {
            e["type"] == "response"
                && e["summary"]
                    .as_str()
                    .is_some_and(|s| s.contains("bytes to target"))
        }) {
            break events;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no tunnel response: {events:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    tunnel.terminate();
    let allowed = events
        .iter()
        .find(|e| {
            e["type"] == "request" && e["text"] == format!("direct-tcpip {TARGET_V4}:{ECHO_PORT}")
        })
        .unwrap_or_else(|| panic!("{events:?}"));
    assert_eq!(allowed["verdict"], "allow", "{allowed}");
    assert_eq!(allowed["rules"][0], "box-tunnels", "{allowed}");
    let response = events
        .iter()
        .find(|e| e["type"] == "response" && e["request"] == allowed["id"])
        .unwrap_or_else(|| panic!("{events:?}"));
    // What was sent, and the echo server's JSON line (with the text) back.
    let summary = response["summary"].as_str().unwrap_or_default();
    let (sent, back) = summary
        .strip_suffix(" from target")
        .and_then(|s| s.split_once(" bytes to target, "))
        .unwrap_or_else(|| panic!("{response}"));
    assert_eq!(sent, "through the tunnel".len().to_string(), "{response}");
    assert!(
        back.parse::<usize>().unwrap() > "through the tunnel".len(),
        "{response}"
    );
    assert!(
        forward_requests(&topo).contains(&(
            format!("direct-tcpip {TARGET_V4}:{SSHD_PORT}"),
            "deny".to_string()
        )),
        "{:?}",
        forward_requests(&topo)
    );
}

#[test]
fn remote_forwarding_allowed_by_a_rule_reaches_the_client_side() {
    require_root();
    let topo = Topology::new("");
    // What the client connects to for -R is a connection of the governed process like any
    // other, captured and judged: here an opaque TCP destination the policy lets through.
    topo.allow_opaque_tcp();
    let (_sshd, daemon) = topo.ssh_target(&tunnel_policy(), "");
    // The client's side of -R: an echo server on the governed host.
    let _echo = topo.echo_server(
        Side::Host,
        format!("127.0.0.1:{ECHO_PORT}").parse().unwrap(),
    );
    let forward = format!("0:127.0.0.1:{ECHO_PORT}");
    let tunnel = topo.spawn(
        Side::Governed,
        "ssh -R",
        topo.ssh_command(
            &["-N", "-o", "ExitOnForwardFailure=yes", "-R", &forward],
            None,
        ),
    );
    // OpenSSH prints the port the target allocated.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let port = loop {
        let err = tunnel.stderr();
        if let Some(rest) = err.split("Allocated port ").nth(1) {
            break rest
                .split_whitespace()
                .next()
                .and_then(|p| p.parse::<u16>().ok())
                .unwrap_or_else(|| panic!("{err}"));
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no allocated port: {err}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    // On the target: its loopback listener leads back to the client's echo server.
    let echoed = echoed_through(
        &topo,
        Side::Target,
        &format!("127.0.0.1:{port}"),
        "back to the client",
        &|| {
            let events: Vec<String> = topo
                .sessions()
                .iter()
                .flat_map(|s| topo.events(&s["id"]))
                .filter(|e| e["type"] != "request")
                .map(|e| e.to_string())
                .take(30)
                .collect();
            format!(
                "{}\n{}\n{}",
                tunnel.stderr(),
                daemon.stderr(),
                events.join("\n")
            )
        },
    );
    assert_eq!(echoed, "back to the client");
    // The client's own connection to its side went through the gateway too.
    assert!(
        topo.sessions().iter().any(|s| {
            topo.events(&s["id"]).iter().any(|e| {
                e["type"] == "connect"
                    && e["comm"] == "ssh"
                    && e["destination"] == format!("127.0.0.1:{ECHO_PORT}")
            })
        }),
        "the -R connection on the client's side was not captured"
    );
    let requests = forward_requests(&topo);
    assert!(
        requests.contains(&("tcpip-forward localhost:0".to_string(), "allow".to_string())),
        "{requests:?}"
    );
    assert!(
        requests.iter().any(|(t, v)| t
            .starts_with(&format!("forwarded-tcpip localhost:{port} from 127.0.0.1:"))
            && v == "allow"),
        "{requests:?}"
    );
}

#[test]
fn agent_forwarding_allowed_by_a_rule_lists_the_clients_key_on_the_target() {
    require_root();
    let topo = Topology::new("");
    let agent_sock = topo.dir.join("agent.sock");
    let (_sshd, _daemon) = topo.ssh_target(
        &tunnel_policy(),
        &format!("[capture]\nunix_allow = [\"{}\"]\n", agent_sock.display()),
    );
    let mut agent_cmd = Command::new("ssh-agent");
    agent_cmd.args(["-D", "-a"]).arg(&agent_sock);
    let _agent = topo.spawn(Side::Host, "ssh-agent", agent_cmd);
    let key = topo.dir.join("client_key");
    let keygen = Command::new("ssh-keygen")
        .args([
            "-q",
            "-t",
            "ed25519",
            "-N",
            "",
            "-C",
            "the-clients-key",
            "-f",
        ])
        .arg(&key)
        .output()
        .unwrap();
    assert!(keygen.status.success(), "{keygen:?}");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let mut add = Command::new("ssh-add");
        add.arg(&key).env("SSH_AUTH_SOCK", &agent_sock);
        let out = topo.output(Side::Host, add);
        if out.status.success() {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "ssh-add: {out:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut listed = topo.ssh_command(&["-A"], Some("ssh-add -l"));
    listed.env("SSH_AUTH_SOCK", &agent_sock);
    let out = topo.output(Side::Governed, listed);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(stdout.contains("the-clients-key"), "{out:?}");
    let requests = forward_requests(&topo);
    assert!(
        requests.contains(&("agent forwarding".to_string(), "allow".to_string())),
        "{requests:?}"
    );
    assert!(
        requests.contains(&("auth-agent channel".to_string(), "allow".to_string())),
        "{requests:?}"
    );
    // Without the -A, the target has no agent (and the gateway relays none).
    let mut plain = topo.ssh_command(&[], Some("ssh-add -l"));
    plain.env("SSH_AUTH_SOCK", &agent_sock);
    let out = topo.output(Side::Governed, plain);
    assert_eq!(out.status.code(), Some(2), "no agent: {out:?}");
}

#[test]
fn env_variables_are_refused_by_default_and_passed_when_a_rule_allows_them() {
    require_root();
    let topo = Topology::new("");
    let policy = format!(
        "{POLICY}\n[[rule]]\nid = \"box-printenv\"\nverdict = \"allow\"\ntarget = {{ name = [\"box\"] }}\n\
         ssh = {{ command = [\"printenv **\"] }}\n"
    );
    let (_sshd, _daemon) = topo.ssh_target(&policy, "");
    let (code, out, err) = topo.ssh(
        &["-o", "SetEnv=BULKHEAD_GREETING=hello"],
        "printenv BULKHEAD_GREETING",
    );
    assert_eq!((code, out.as_str()), (Some(1), ""), "refused: {err}");
    assert!(
        forward_requests(&topo)
            .contains(&("env BULKHEAD_GREETING".to_string(), "deny".to_string())),
        "{:?}",
        forward_requests(&topo)
    );
    // With a rule naming it, the remote command sees it; others stay refused.
    topo.policy("box.toml", &tunnel_policy());
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (code, out, err) = topo.ssh(
            &["-o", "SetEnv=BULKHEAD_GREETING=hello OTHER_VAR=x"],
            "printenv BULKHEAD_GREETING OTHER_VAR",
        );
        if out == "hello\n" {
            assert_eq!(code, Some(1), "OTHER_VAR is not set: {err}");
            break;
        }
        // The policy reloads on change: until then, refused as before.
        assert!(
            std::time::Instant::now() < deadline,
            "{code:?} {out:?} {err}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let requests = forward_requests(&topo);
    assert!(
        requests.contains(&("env BULKHEAD_GREETING".to_string(), "allow".to_string())),
        "{requests:?}"
    );
    assert!(
        requests.contains(&("env OTHER_VAR".to_string(), "deny".to_string())),
        "{requests:?}"
    );
}

#[test]
fn a_changed_host_key_is_refused_naming_both_fingerprints() {
    require_root();
    let topo = Topology::new("");
    let (sshd, _daemon) = topo.ssh_target(POLICY, "");
    let real = fingerprint(&sshd.host_key_line(), &topo);
    let other = sshd.other_host_key();
    let recorded = fingerprint(&other, &topo);
    sshd.write_known_hosts(&other);
    let (code, out, err) = topo.ssh(&[], "echo ok");
    assert_eq!(code, Some(255), "{out} {err}");
    assert!(!out.contains("ok"));
    assert!(
        err.contains("box") && err.contains(&real) && err.contains(&recorded),
        "want {real} and {recorded} in: {err}"
    );
}

#[test]
fn an_approval_holds_the_command_until_an_admin_approves() {
    require_root();
    let topo = Topology::new("");
    let (_sshd, _daemon) = topo.ssh_target(POLICY, "");
    let file = topo.dir.join("approved-touch");
    let mut held = topo.spawn(
        Side::Governed,
        "ssh",
        topo.ssh_command(&[], Some(&format!("touch {}", file.display()))),
    );
    let pending = topo.first_pending();
    assert!(
        pending["text"]
            .as_str()
            .unwrap_or_default()
            .starts_with("touch "),
        "{pending}"
    );
    std::thread::sleep(Duration::from_millis(300));
    assert!(!file.exists(), "ran before the approval");
    let out = topo.output(
        Side::Host,
        topo.bulkhead(&["approvals", "approve", &pending["id"].to_string()]),
    );
    assert!(out.status.success(), "{out:?}");
    let status = held.wait();
    assert_eq!(status.code(), Some(0), "{}", held.stderr());
    assert!(file.exists(), "the approved command ran");
    assert!(
        held.stderr().contains("waiting for an admin's approval"),
        "{}",
        held.stderr()
    );
}

#[test]
fn an_interactive_shell_is_recorded_replayed_and_exported_as_a_cast() {
    require_root();
    let topo = Topology::new("");
    let (_sshd, _daemon) = topo.ssh_target(POLICY, "");
    // A pty on the client side (script), typed input, a pty at the target.
    let ssh = topo.ssh_line(&["-tt"], None);
    let mut cmd = Command::new("sh");
    cmd.args([
        "-c",
        &format!(
            "(sleep 1; printf 'echo typed-$((6*7))\\n'; sleep 1; printf 'exit\\n') | script -qec \"{ssh}\" /dev/null"
        ),
    ]);
    let out = topo.output(Side::Governed, cmd);
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(
        shown.contains("typed-42"),
        "{shown} {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let (session, events) = session_with(&topo, "shell");
    assert!(
        events.iter().any(|e| e["type"] == "terminal_input"
            && e["data"]
                .as_str()
                .unwrap_or_default()
                .contains("echo typed")),
        "{events:?}"
    );
    let id = session["id"].to_string();
    let replay = topo.output(
        Side::Host,
        topo.bulkhead(&[
            "sessions",
            "replay",
            &id,
            "--speed",
            "100",
            "--max-idle",
            "0.1",
        ]),
    );
    assert!(
        String::from_utf8_lossy(&replay.stdout).contains("typed-42"),
        "{replay:?}"
    );
    let cast = topo.dir.join("shell.cast");
    let export = topo.output(
        Side::Host,
        topo.bulkhead(&[
            "sessions",
            "export",
            "--session",
            &id,
            "--format",
            "asciicast",
            "--output",
            cast.to_str().unwrap(),
        ]),
    );
    assert!(export.status.success(), "{export:?}");
    let text = std::fs::read_to_string(&cast).unwrap();
    assert!(text.contains("\"i\"") && text.contains("typed"), "{text}");
    // asciinema reads /dev/tty: give it a terminal.
    let played = Command::new("script")
        .args([
            "-qec",
            &format!("asciinema cat {}", cast.display()),
            "/dev/null",
        ])
        .output()
        .expect("asciinema");
    assert!(played.status.success(), "{played:?}");
    assert!(
        String::from_utf8_lossy(&played.stdout).contains("typed-42"),
        "{played:?}"
    );
}

#[test]
fn bulkhead_run_makes_the_openssh_client_trust_the_gateway() {
    require_root();
    let topo = Topology::new("");
    let (_sshd, _daemon) = topo.ssh_target(POLICY, "");
    let line = topo.output(Side::Host, topo.bulkhead(&["ca", "export", "--ssh"]));
    let line = String::from_utf8_lossy(&line.stdout).into_owned();
    assert!(line.starts_with("@cert-authority * ssh-ed25519 "), "{line}");
    assert_eq!(
        std::fs::read_to_string(topo.gateway_known_hosts()).unwrap(),
        line
    );
    // As nobody, through `bulkhead run`: plain `ssh`, strict host key checking, no options
    // about known hosts.
    let mut cmd = topo.bulkhead(&["run", "--"]);
    cmd.args([
        "ssh",
        "-p",
        &SSHD_PORT.to_string(),
        "-o",
        "StrictHostKeyChecking=yes",
        "-o",
        "BatchMode=yes",
        &format!("agent@{TARGET_V4}"),
        "echo via-run",
    ])
    .env("SUDO_UID", "65534")
    .env("SUDO_GID", "65534")
    .env("SUDO_USER", "nobody")
    .current_dir(&topo.dir);
    let out = topo.output(Side::Host, cmd);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "via-run\n",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn fingerprint(key_line: &str, topo: &Topology) -> String {
    let path = topo.dir.join("fp.pub");
    std::fs::write(&path, key_line).unwrap();
    let out = Command::new("ssh-keygen")
        .arg("-lf")
        .arg(&path)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .nth(1)
        .unwrap()
        .to_string()
}

#[test]
fn sftp_and_scp_are_judged_per_file_recorded_and_a_denied_put_is_permission_denied() {
    require_root();
    let topo = Topology::new("");
    let dir = topo.dir.display().to_string();
    let policy = format!(
        "{POLICY}\n[[rule]]\nid = \"box-files\"\nverdict = \"allow\"\ntarget = {{ name = [\"box\"] }}\n\
         ssh = {{ sftp = {{ read = [\"{dir}/**\"], write = [\"{dir}/up/**\"] }} }}\n"
    );
    let (_sshd, _daemon) = topo.ssh_target(&policy, "");
    std::fs::create_dir_all(topo.dir.join("up")).unwrap();
    std::fs::write(topo.dir.join("data.txt"), "remote data\n").unwrap();
    std::fs::write(topo.dir.join("local.txt"), "local data\n").unwrap();
    let batch = topo.dir.join("batch");
    std::fs::write(
        &batch,
        format!(
            "ls {dir}/up\nget {dir}/data.txt {dir}/got.txt\nput {dir}/local.txt {dir}/up/put.txt\n\
             -put {dir}/local.txt {dir}/denied.txt\n"
        ),
    )
    .unwrap();
    let mut sftp = Command::new("sftp");
    sftp.args(["-P", &SSHD_PORT.to_string()])
        .args(topo.ssh_options())
        .arg("-b")
        .arg(&batch)
        .arg(format!("agent@{TARGET_V4}"))
        .current_dir(&topo.dir);
    let out = topo.output(Side::Governed, sftp);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert_eq!(
        std::fs::read_to_string(topo.dir.join("got.txt")).unwrap(),
        "remote data\n"
    );
    assert_eq!(
        std::fs::read_to_string(topo.dir.join("up/put.txt")).unwrap(),
        "local data\n"
    );
    assert!(!topo.dir.join("denied.txt").exists(), "a denied put wrote");
    assert!(err.contains("Permission denied"), "{err}");

    // scp (the sftp protocol in OpenSSH 9) both ways.
    let scp = |from: &str, to: &str| {
        let mut cmd = Command::new("scp");
        cmd.args(["-P", &SSHD_PORT.to_string()])
            .args(topo.ssh_options())
            .args([from, to])
            .current_dir(&topo.dir);
        topo.output(Side::Governed, cmd)
    };
    let up = scp(
        &format!("{dir}/local.txt"),
        &format!("agent@{TARGET_V4}:{dir}/up/scp.txt"),
    );
    assert!(up.status.success(), "{up:?}");
    assert_eq!(
        std::fs::read_to_string(topo.dir.join("up/scp.txt")).unwrap(),
        "local data\n"
    );
    let down = scp(
        &format!("agent@{TARGET_V4}:{dir}/data.txt"),
        &format!("{dir}/scp-got.txt"),
    );
    assert!(down.status.success(), "{down:?}");
    assert_eq!(
        std::fs::read_to_string(topo.dir.join("scp-got.txt")).unwrap(),
        "remote data\n"
    );
    let denied = scp(
        &format!("{dir}/local.txt"),
        &format!("agent@{TARGET_V4}:{dir}/scp-denied.txt"),
    );
    assert!(!denied.status.success(), "{denied:?}");
    assert!(!topo.dir.join("scp-denied.txt").exists());

    let events: Vec<serde_json::Value> = topo
        .sessions()
        .iter()
        .flat_map(|s| topo.events(&s["id"]))
        .collect();
    let request = |text: &str| {
        events
            .iter()
            .find(|e| e["type"] == "request" && e["text"] == text)
            .unwrap_or_else(|| panic!("no request {text:?} in {events:?}"))
            .clone()
    };
    assert_eq!(
        request(&format!("sftp open-write {dir}/denied.txt"))["verdict"],
        "deny"
    );
    assert_eq!(
        request(&format!("sftp open-write {dir}/up/put.txt"))["verdict"],
        "allow"
    );
    assert_eq!(
        request(&format!("sftp open-read {dir}/data.txt"))["verdict"],
        "allow"
    );
    let summaries: Vec<&str> = events
        .iter()
        .filter(|e| e["type"] == "response")
        .filter_map(|e| e["summary"].as_str())
        .collect();
    assert!(
        summaries.contains(&format!("wrote 11 bytes {dir}/up/put.txt").as_str()),
        "{summaries:?}"
    );
    assert!(
        summaries.contains(&format!("read 12 bytes {dir}/data.txt").as_str()),
        "{summaries:?}"
    );
}

#[test]
fn a_window_size_change_reaches_the_remote_pty() {
    require_root();
    let topo = Topology::new("");
    // A tmux server of the test's own, governed (its panes' ssh is captured; its own socket
    // allowed to governed processes); driven from outside the cgroup over that socket. Short:
    // a unix socket path has at most 107 bytes, the topology's directory may be long.
    let sock = std::path::PathBuf::from(format!("/tmp/bh-tmux-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&sock);
    let (_sshd, _daemon) = topo.ssh_target(
        POLICY,
        &format!("[capture]\nunix_allow = [\"{}\"]\n", sock.display()),
    );
    let mut server = Command::new("tmux");
    server.args(["-D", "-f", "/dev/null", "-S"]).arg(&sock);
    let server = topo.spawn(Side::Governed, "tmux", server);
    let tmux = |args: &[&str]| {
        let mut cmd = Command::new("tmux");
        cmd.arg("-S").arg(&sock).args(args);
        topo.output(Side::Host, cmd)
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !sock.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "tmux did not start: {}",
            server.stderr()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let ssh = topo.ssh_line(&["-tt"], None);
    let out = tmux(&["new-session", "-d", "-x", "80", "-y", "24", &ssh]);
    assert!(out.status.success(), "{out:?}");
    // Types `stty size` (what the remote pty says its size is) until the answer shows.
    let size_shown = |want: &str| {
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        loop {
            let _ = tmux(&["send-keys", "echo size=$(stty size)", "Enter"]);
            std::thread::sleep(Duration::from_millis(300));
            let screen =
                String::from_utf8_lossy(&tmux(&["capture-pane", "-p"]).stdout).into_owned();
            if screen.contains(&format!("size={want}")) {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "want size={want}:\n{screen}"
            );
        }
    };
    size_shown("24 80");
    let out = tmux(&["resize-window", "-x", "100", "-y", "30"]);
    assert!(out.status.success(), "{out:?}");
    let _ = tmux(&["send-keys", "clear", "Enter"]);
    size_shown("30 100");
    let _ = tmux(&["kill-server"]);
    let _ = std::fs::remove_file(&sock);
}

#[test]
fn a_held_password_logs_in_upstream() {
    require_root();
    let topo = Topology::new("");
    let sshd = topo.sshd_with_password("held-secret-42");
    let secret = topo.credential_file("box", "held-secret-42");
    // No key for the target: only the password.
    topo.write_config(&format!(
        "[[target]]\nname = \"box\"\nprotocol = \"ssh\"\naddresses = [\"{TARGET_V4}:{SSHD_PORT}\"]\n\
         credentials = {{ file = \"{}\" }}\n[target.ssh]\nuser = \"root\"\nknown_hosts = \"{}\"\n",
        secret.display(),
        sshd.known_hosts.display()
    ));
    topo.policy("box.toml", POLICY);
    let _daemon = topo.start_daemon(&[]);
    let (code, out, err) = topo.ssh(&[], "echo ok");
    assert_eq!((code, out.as_str()), (Some(0), "ok\n"), "{err}");
    assert!(
        sshd.proc.stderr().contains("Accepted password for root"),
        "{}",
        sshd.proc.stderr()
    );
    let (_, events) = session_with(&topo, "echo ok");
    assert!(
        events.iter().any(|e| e["type"] == "auth"
            && e["side"] == "target"
            && e["method"] == "password (held)"
            && e["ok"] == true),
        "{events:?}"
    );
    // A wrong held password refuses the client, and says so.
    std::fs::write(&secret, "not-the-password").unwrap();
    let (code, out, err) = topo.ssh(&[], "echo ok");
    assert_eq!(code, Some(255), "{out} {err}");
    assert!(!out.contains("ok"), "{out}");
}

/// Waits until sshd has logged `n` logins with the held key (sessions' and the pool's).
fn wait_for_logins(sshd: &bulkhead_tests::ssh::SshServer, n: usize) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let seen = sshd
            .proc
            .stderr()
            .matches("Accepted publickey for root")
            .count();
        if seen >= n {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{seen} of {n} upstream logins: {}",
            sshd.proc.stderr()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The target side's login method recorded for the session that ran `text`.
fn target_login(topo: &Topology, text: &str) -> String {
    let (_, events) = session_with(topo, text);
    events
        .iter()
        .find(|e| e["type"] == "auth" && e["side"] == "target" && e["ok"] == true)
        .and_then(|e| e["method"].as_str())
        .unwrap_or_else(|| panic!("no upstream login in {events:?}"))
        .to_string()
}

#[test]
fn a_session_takes_a_warm_connection_unless_the_key_file_or_host_key_changed_since() {
    require_root();
    let topo = Topology::new("");
    let (sshd, _daemon) = topo.ssh_target(POLICY, "");
    // The first session connects itself: no target is warmed before it is used.
    let (code, out, err) = topo.ssh(&[], "echo one");
    assert_eq!((code, out.as_str()), (Some(0), "one\n"), "{err}");
    assert_eq!(target_login(&topo, "echo one"), "publickey (held key)");
    // Its login warmed one connection for the next.
    wait_for_logins(&sshd, 2);
    let (code, out, err) = topo.ssh(&[], "echo two");
    assert_eq!((code, out.as_str()), (Some(0), "two\n"), "{err}");
    let method = target_login(&topo, "echo two");
    assert!(method.contains("warm pooled connection"), "{method}");
    // Taken once: the session's end closed it, and a refill replaced it.
    wait_for_logins(&sshd, 3);

    // The held key file rewritten (a rotation) after the warm login: not taken.
    let held = std::fs::read(&sshd.held_key).unwrap();
    std::fs::write(&sshd.held_key, &held).unwrap();
    let (code, out, err) = topo.ssh(&[], "echo three");
    assert_eq!((code, out.as_str()), (Some(0), "three\n"), "{err}");
    assert_eq!(target_login(&topo, "echo three"), "publickey (held key)");
    wait_for_logins(&sshd, 5);

    // known_hosts no longer records the key the warm connection was verified with: not taken,
    // and the session's own connection is refused naming both keys.
    let real = fingerprint(&sshd.host_key_line(), &topo);
    let other = sshd.other_host_key();
    sshd.write_known_hosts(&other);
    let (code, out, err) = topo.ssh(&[], "echo four");
    assert_eq!(code, Some(255), "{out} {err}");
    assert!(
        err.contains(&real) && err.contains(&fingerprint(&other, &topo)),
        "{err}"
    );
    let logins = sshd
        .proc
        .stderr()
        .matches("Accepted publickey for root")
        .count();
    assert_eq!(logins, 5, "nothing logged in after the key change");
}

#[test]
fn an_approve_rule_holds_a_local_forward_until_an_admin_approves_then_it_carries_data() {
    require_root();
    let topo = Topology::new("");
    let policy = format!(
        "{POLICY}\n[[rule]]\nid = \"box-tunnel-approve\"\nverdict = \"approve\"\n\
         target = {{ name = [\"box\"] }}\nssh = {{ forward = [\"{TARGET_V4}:{ECHO_PORT}\"] }}\n"
    );
    let (_sshd, _daemon) = topo.ssh_target(&policy, "");
    let (_echo, mut tunnel) = echo_through_local_forward(&topo, 17009);
    // The local listener is up once ssh has logged in; a connection through it opens the
    // channel the gateway holds.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while !topo
        .output(Side::Host, {
            let mut ss = Command::new("ss");
            ss.args(["-ltnH", "sport = :17009"]);
            ss
        })
        .stdout
        .starts_with(b"LISTEN")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "no -L listener: {}",
            tunnel.stderr()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let probe = std::thread::scope(|scope| {
        let held =
            scope.spawn(|| topo.probe_connect(Side::Host, "127.0.0.1:17009", "after the approval"));
        let pending = topo.first_pending();
        assert_eq!(
            pending["text"],
            format!("direct-tcpip {TARGET_V4}:{ECHO_PORT}"),
            "{pending}"
        );
        assert!(!held.is_finished(), "the channel was not held");
        let out = topo.output(
            Side::Host,
            topo.bulkhead(&["approvals", "approve", &pending["id"].to_string()]),
        );
        assert!(out.status.success(), "{out:?}");
        held.join().unwrap()
    });
    assert_eq!(
        bulkhead_tests::reply(&probe)["data"],
        "after the approval",
        "{probe}\n{}",
        tunnel.stderr()
    );
    tunnel.terminate();
    assert!(
        forward_requests(&topo).contains(&(
            format!("direct-tcpip {TARGET_V4}:{ECHO_PORT}"),
            "approve".to_string()
        )),
        "{:?}",
        forward_requests(&topo)
    );
}

#[test]
fn a_cancelled_remote_forward_closes_the_targets_listener() {
    require_root();
    let topo = Topology::new("");
    topo.allow_opaque_tcp();
    let (_sshd, _daemon) = topo.ssh_target(&tunnel_policy(), "");
    let _echo = topo.echo_server(
        Side::Host,
        format!("127.0.0.1:{ECHO_PORT}").parse().unwrap(),
    );
    let control = topo.dir.join("ctl");
    let control = control.display().to_string();
    let forward = format!("17010:127.0.0.1:{ECHO_PORT}");
    let mut master = topo.spawn(
        Side::Governed,
        "ssh -M -R",
        topo.ssh_command(
            &[
                "-M",
                "-S",
                &control,
                "-N",
                "-o",
                "ExitOnForwardFailure=yes",
                "-R",
                &forward,
            ],
            None,
        ),
    );
    let echoed = echoed_through(
        &topo,
        Side::Target,
        "127.0.0.1:17010",
        "before the cancel",
        &|| master.stderr(),
    );
    assert_eq!(echoed, "before the cancel");
    // The mux client runs outside the cgroup: governed processes may not connect to unix
    // sockets, the master's control socket included.
    let out = topo.output(
        Side::Host,
        topo.ssh_command(&["-S", &control, "-O", "cancel", "-R", &forward], None),
    );
    assert!(out.status.success(), "{out:?}\n{}", master.stderr());
    // The target's listener goes away (asked of sshd, which closes it).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let listening = topo.output(Side::Target, {
            let mut ss = Command::new("ss");
            ss.args(["-ltnH", "sport = :17010"]);
            ss
        });
        if listening.stdout.is_empty() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the target still listens: {}\n{}",
            String::from_utf8_lossy(&listening.stdout),
            master.stderr()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let probe = topo.probe_connect(Side::Target, "127.0.0.1:17010", "after the cancel");
    assert_eq!(probe["kind"], "ConnectionRefused", "{probe}");
    master.terminate();
    let requests = forward_requests(&topo);
    assert!(
        requests.contains(&(
            "cancel-tcpip-forward localhost:17010".to_string(),
            "allow".to_string()
        )),
        "{requests:?}"
    );
}

#[test]
fn in_observe_mode_a_tunnel_no_rule_allows_is_relayed_and_recorded_as_would_be_denied() {
    require_root();
    let topo = Topology::new("");
    let policy = POLICY.replacen(
        "default = \"deny\"\n",
        "default = \"deny\"\nmode = \"observe\"\n",
        1,
    );
    let (_sshd, _daemon) = topo.ssh_target(&policy, "");
    let (_echo, mut tunnel) = echo_through_local_forward(&topo, 17011);
    let echoed = echoed_through(&topo, Side::Host, "127.0.0.1:17011", "observed", &|| {
        tunnel.stderr()
    });
    assert_eq!(echoed, "observed");
    tunnel.terminate();
    let text = format!("direct-tcpip {TARGET_V4}:{ECHO_PORT}");
    let request = topo
        .sessions()
        .iter()
        .flat_map(|s| topo.events(&s["id"]))
        .find(|e| e["type"] == "request" && e["text"] == text)
        .unwrap_or_else(|| panic!("{:?}", forward_requests(&topo)));
    assert_eq!(request["verdict"], "deny", "{request}");
    assert_eq!(request["observed"], true, "{request}");
}

/// The display number of the test's fake X server on the governed host (TCP 6000 + N).
const X_DISPLAY: u16 = 37;

#[test]
fn x11_forwarding_allowed_by_a_rule_reaches_the_clients_display() {
    require_root();
    assert!(
        std::path::Path::new("/usr/bin/xauth").exists(),
        "/usr/bin/xauth is missing: apt-get install xauth (scripts/setup.sh)"
    );
    let topo = Topology::new("");
    // The client's connection to its own display is a governed connection like any other.
    topo.allow_opaque_tcp();
    // A program on the target that opens $DISPLAY as an X client does: the setup packet with
    // the cookie sshd stored, then a few bytes; it prints what the display answers.
    let script = topo.dir.join("x11_client.py");
    let xauthority = topo.dir.join("Xauthority");
    std::fs::write(
        &script,
        format!(
            "import os, socket, struct, subprocess\n\
             d = os.environ['DISPLAY']\n\
             n = int(d.split(':')[1].split('.')[0])\n\
             env = dict(os.environ, XAUTHORITY='{}')\n\
             f = subprocess.check_output(['xauth', 'list'], env=env).decode().split()\n\
             name, cookie = f[1].encode(), bytes.fromhex(f[2])\n\
             pad = lambda b: b + bytes(-len(b) % 4)\n\
             s = socket.create_connection(('127.0.0.1', 6000 + n))\n\
             s.sendall(struct.pack('<cxHHHH2x', b'l', 11, 0, len(name), len(cookie)) + pad(name) + pad(cookie) + b'hello X')\n\
             print(s.recv(100).decode(), flush=True)\n",
            xauthority.display()
        ),
    )
    .unwrap();
    let policy = format!(
        "{POLICY}\n[[rule]]\nid = \"box-x11\"\nverdict = \"allow\"\ntarget = {{ name = [\"box\"] }}\n\
         ssh = {{ x11 = true, command = [\"python3 {}\"] }}\n",
        script.display()
    );
    let (_sshd, _daemon, _) = topo.ssh_target_x11(&policy, "");
    // The client's display: answers the X client's bytes once the setup packet and the
    // payload are in, and prints what it got.
    let mut display = Command::new("python3");
    display.args([
        "-c",
        &format!(
            "import socket\n\
             l = socket.socket(); l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
             l.bind(('127.0.0.1', {})); l.listen(1); print('listening', flush=True)\n\
             c, _ = l.accept(); got = b''\n\
             while b'hello X' not in got:\n\
             \x20   b = c.recv(4096)\n\
             \x20   if not b: break\n\
             \x20   got += b\n\
             print('got', got[:12].hex(), got.endswith(b'hello X'), flush=True)\n\
             c.sendall(b'X server says hi'); c.close()\n",
            6000 + X_DISPLAY
        ),
    ]);
    let mut display = topo.spawn(Side::Host, "fake X server", display);
    assert_eq!(
        display.line(Duration::from_secs(10)).as_deref(),
        Some("listening")
    );
    let mut ssh = topo.ssh_command(&["-Y"], Some(&format!("python3 {}", script.display())));
    ssh.env("DISPLAY", format!("127.0.0.1:{X_DISPLAY}"))
        .env("XAUTHORITY", topo.dir.join("client-Xauthority"));
    let out = topo.output(Side::Governed, ssh);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("X server says hi"),
        "{out:?}\n{:?}",
        forward_requests(&topo)
    );
    // The display got the X11 setup packet (little-endian, protocol 11) and the bytes after it.
    let got = display.line(Duration::from_secs(10)).unwrap_or_default();
    assert!(
        got.starts_with("got 6c000b00") && got.ends_with("True"),
        "{got}"
    );
    let requests = forward_requests(&topo);
    for (text, verdict) in [("x11 forwarding", "allow"), ("x11 channel", "allow")] {
        assert!(
            requests.contains(&(text.to_string(), verdict.to_string())),
            "{text}: {requests:?}"
        );
    }
}
