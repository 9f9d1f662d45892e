//! The foundation's promises, against the real kernel: governed connections land in the
//! gateway, which knows where they were going and who made them, and relays them; nothing
//! else is captured; and when the daemon dies, governed connections fail instead of going
//! around it.
//!
//! Each test builds its own namespaces, veth pair and cgroup (see `bulkhead_tests::Topology`)
//! and needs root.

use std::{process::Command, time::Duration};

use bulkhead_tests::{
    parse_probe, reply, require_root, Side, Topology, GOVERNED_V4, TARGET_V4, TARGET_V6,
};

/// `text` reached the target from `side` without the gateway: the echo came back and the
/// client's socket is bound to the governed side's own address, not to loopback.
fn assert_direct(topo: &Topology, side: Side, dst: &str, text: &str) -> serde_json::Value {
    let client = topo.probe_connect(side, dst, text);
    assert_eq!(reply(&client)["data"], text, "{client}");
    assert!(
        client["local"]
            .as_str()
            .unwrap()
            .starts_with(&format!("{GOVERNED_V4}:")),
        "not direct: {client}"
    );
    client
}

#[test]
fn governed_client_reaches_the_target_through_the_gateway_and_is_recorded() {
    require_root();
    let topo = Topology::new("");
    topo.allow_opaque_tcp();
    let mut echo = topo.echo_server(Side::Target, format!("{TARGET_V4}:7000").parse().unwrap());
    let _daemon = topo.start_daemon(&[]);

    // `bulkhead run` puts the probe in the governed cgroup and, as under sudo, drops to the
    // invoking user (here: nobody).
    let mut cmd = topo.bulkhead(&["run", "--"]);
    cmd.arg(topo.probe())
        .args(["connect", &format!("{TARGET_V4}:7000"), "hello"]);
    cmd.env("SUDO_UID", "65534")
        .env("SUDO_GID", "65534")
        .env("SUDO_USER", "nobody");
    let client = parse_probe(&topo.output(Side::Host, cmd));

    // The bytes made the round trip.
    let answer = reply(&client);
    assert_eq!(answer["data"], "hello", "{client}");
    // Through the gateway: the client's socket is connected to the loopback listener (its
    // local address says so), yet getpeername() answers with the destination it dialled; the
    // target saw the daemon's own connection from the governed side's address.
    assert!(
        client["local"].as_str().unwrap().starts_with("127.0.0.1:"),
        "{client}"
    );
    assert_eq!(client["peer"], format!("{TARGET_V4}:7000"), "{client}");
    let target_peer = answer["peer"].as_str().unwrap();
    assert!(
        target_peer.starts_with(&format!("{GOVERNED_V4}:")),
        "{target_peer}"
    );
    assert_ne!(
        client["local"].as_str().unwrap().rsplit(':').next(),
        target_peer.rsplit(':').next()
    );
    assert_eq!(
        echo.line(Duration::from_secs(5)).as_deref(),
        Some(format!("accepted {target_peer}").as_str())
    );

    let session = topo.wait_session_closed();
    assert_eq!(
        session["destination"],
        format!("{TARGET_V4}:7000"),
        "{session}"
    );
    assert_eq!(session["outcome"]["kind"], "closed");
    assert_eq!(session["protocol"], "tcp");
    assert_eq!(session["bytes_to_target"], 5);
    assert_eq!(
        session["bytes_from_target"].as_u64().unwrap(),
        client["reply"].as_str().unwrap().len() as u64 + 1
    );
    let who = &session["identity"];
    assert_eq!(who["pid"], client["pid"], "{who}");
    assert_eq!(who["uid"], 65534);
    assert_eq!(who["gid"], 65534);
    assert_eq!(who["user"], "nobody");
    assert_eq!(who["comm"], "bh-probe");
    assert_eq!(who["exe"], topo.probe().display().to_string());
    assert_eq!(who["cmdline"][1], "connect");
    // The parent chain ends at the first process outside the governed cgroup: the test.
    assert_eq!(who["ancestors"][0]["governed"], false, "{who}");
    assert_eq!(who["ancestors"][0]["pid"], std::process::id());
}

#[test]
fn ipv6_targets_are_governed_the_same_way() {
    require_root();
    let topo = Topology::new("");
    topo.allow_opaque_tcp();
    let _echo = topo.echo_server(Side::Target, format!("[{TARGET_V6}]:7000").parse().unwrap());
    let _daemon = topo.start_daemon(&[]);

    let client = topo.probe_connect(Side::Governed, &format!("[{TARGET_V6}]:7000"), "over six");
    let answer = reply(&client);
    assert_eq!(answer["data"], "over six", "{client}");
    assert!(
        client["local"].as_str().unwrap().starts_with("[::1]:"),
        "{client}"
    );
    assert_eq!(client["peer"], format!("[{TARGET_V6}]:7000"), "{client}");
    let session = topo.wait_session_closed();
    assert_eq!(session["destination"], format!("[{TARGET_V6}]:7000"));
    assert_eq!(session["identity"]["pid"], client["pid"]);
    assert_eq!(session["bytes_to_target"], 8);
}

#[test]
fn ipv4_mapped_destinations_on_a_dual_stack_socket_are_governed() {
    require_root();
    let topo = Topology::new("");
    topo.allow_opaque_tcp();
    let _echo = topo.echo_server(Side::Target, format!("{TARGET_V4}:7000").parse().unwrap());
    let _daemon = topo.start_daemon(&[]);

    let client = topo.probe_connect(
        Side::Governed,
        &format!("[::ffff:{TARGET_V4}]:7000"),
        "mapped",
    );
    assert_eq!(reply(&client)["data"], "mapped", "{client}");
    assert!(
        client["local"]
            .as_str()
            .unwrap()
            .starts_with("[::ffff:127.0.0.1]:"),
        "{client}"
    );
    assert_eq!(
        client["peer"],
        format!("[::ffff:{TARGET_V4}]:7000"),
        "{client}"
    );
    let session = topo.wait_session_closed();
    assert_eq!(session["destination"], format!("{TARGET_V4}:7000"));
}

#[test]
fn processes_outside_the_governed_cgroup_connect_directly() {
    require_root();
    let topo = Topology::new("");
    let _echo = topo.echo_server(Side::Target, format!("{TARGET_V4}:7000").parse().unwrap());
    let _daemon = topo.start_daemon(&[]);

    let client = assert_direct(&topo, Side::Host, &format!("{TARGET_V4}:7000"), "direct");
    assert_eq!(client["peer"], format!("{TARGET_V4}:7000"));
    assert_eq!(
        reply(&client)["peer"],
        client["local"],
        "the target saw the client itself"
    );
    assert!(
        topo.sessions().is_empty(),
        "nothing recorded for an ungoverned process"
    );
}

#[test]
fn allowed_udp_is_not_redirected() {
    require_root();
    let topo = Topology::new(&format!("[capture]\nudp_allow = [\"{TARGET_V4}:5353\"]\n"));
    let _daemon = topo.start_daemon(&[]);
    // A connected UDP socket to an allowed destination keeps its real peer (UDP is decided in
    // the kernel, never relayed; `containment.rs` has the refusals).
    let mut cmd = Command::new("python3");
    cmd.args([
        "-c",
        &format!(
            "import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.connect(('{TARGET_V4}', 5353)); print(s.getpeername()[0])"
        ),
    ]);
    let out = topo.output(Side::Governed, cmd);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), TARGET_V4);
}

#[test]
fn the_daemons_own_upstream_connection_is_not_captured() {
    require_root();
    // Capture loopback too, and put the target on the governed side's loopback: were the
    // daemon's upstream connect captured, it would be redirected back into the daemon.
    let topo = Topology::new("[capture]\nloopback = true\n");
    topo.allow_opaque_tcp();
    let mut echo = topo.echo_server(Side::Host, "127.0.0.1:7100".parse().unwrap());
    let _daemon = topo.start_daemon(&[]);

    let client = topo.probe_connect(Side::Governed, "127.0.0.1:7100", "no loop");
    let answer = reply(&client);
    assert_eq!(answer["data"], "no loop", "{client}");
    let session = topo.wait_session_closed();
    assert_eq!(session["destination"], "127.0.0.1:7100");
    assert_eq!(session["outcome"]["kind"], "closed");
    // Exactly one connection reached the target and exactly one session exists.
    assert!(echo.line(Duration::from_secs(5)).is_some());
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        echo.drain_lines().is_empty(),
        "the target saw more than one connection"
    );
    assert_eq!(topo.sessions().len(), 1, "{:?}", topo.sessions());
}

#[test]
fn a_killed_daemon_fails_closed_and_a_restarted_one_governs_again() {
    require_root();
    let topo = Topology::new("");
    topo.allow_opaque_tcp();
    let mut echo = topo.echo_server(Side::Target, format!("{TARGET_V4}:7000").parse().unwrap());
    let dst = format!("{TARGET_V4}:7000");

    let mut daemon = topo.start_daemon(&[]);
    assert_eq!(
        reply(&topo.probe_connect(Side::Governed, &dst, "one"))["data"],
        "one"
    );
    assert!(echo.line(Duration::from_secs(5)).is_some());
    // Sessions reach the disk within the store's flush interval (100 ms); give it that.
    topo.wait_session_closed();
    std::thread::sleep(Duration::from_millis(300));

    daemon.kill9();
    let refused = topo.probe_connect(Side::Governed, &dst, "two");
    assert_eq!(refused["kind"], "ConnectionRefused", "{refused}");
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        echo.drain_lines().is_empty(),
        "a governed connection reached the target without the daemon"
    );
    let status = topo.status_while_stopped();
    assert!(status["daemon"].is_null(), "{status}");
    assert_eq!(status["programs_attached"], true, "{status}");
    // connect4/6, sock_ops, getpeername4/6, sendmsg4/6, recvmsg4/6, the socket filter, the
    // UDP egress counter, and on Linux 6.7+ connect_unix and sendmsg_unix.
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    let mut version = release
        .split(['.', '-'])
        .map(|p| p.parse::<u32>().unwrap_or(0));
    let (major, minor) = (version.next().unwrap_or(0), version.next().unwrap_or(0));
    let links = if (major, minor) >= (6, 7) { 13 } else { 11 };
    assert_eq!(status["pinned_links"], links, "{status}");

    let _daemon = topo.start_daemon(&[]);
    assert_eq!(
        reply(&topo.probe_connect(Side::Governed, &dst, "three"))["data"],
        "three"
    );
    assert!(echo.line(Duration::from_secs(5)).is_some());
    let status = topo.run_cli(&["status", "--json"]).unwrap();
    assert_eq!(
        status["pinned_links"], links,
        "the old links were replaced, not added to: {status}"
    );
    let sessions = topo.sessions();
    let kinds: Vec<&str> = sessions
        .iter()
        .map(|s| s["outcome"]["kind"].as_str().unwrap())
        .collect();
    assert_eq!(
        sessions.len(),
        2,
        "two governed sessions, none for the refused connect: {kinds:?}"
    );
}

#[test]
fn fail_open_mode_detaches_when_the_daemon_dies() {
    require_root();
    let topo = Topology::new("");
    topo.allow_opaque_tcp();
    let mut echo = topo.echo_server(Side::Target, format!("{TARGET_V4}:7000").parse().unwrap());
    let dst = format!("{TARGET_V4}:7000");
    let mut daemon = topo.start_daemon(&["--fail-open"]);
    let through = topo.probe_connect(Side::Governed, &dst, "governed");
    assert!(
        through["local"].as_str().unwrap().starts_with("127.0.0.1:"),
        "{through}"
    );
    assert!(echo.line(Duration::from_secs(5)).is_some());

    daemon.kill9();
    // The kernel drops the links with the daemon's descriptors.
    assert_direct(&topo, Side::Governed, &dst, "direct");
    let status = topo.status_while_stopped();
    assert_eq!(status["programs_attached"], false, "{status}");
}

#[test]
fn a_connect_refused_while_the_daemon_was_down_lends_its_identity_to_nobody() {
    require_root();
    let topo = Topology::new("");
    // The policy would let the governed connection through: only the missing record may
    // refuse the sneak below.
    topo.allow_opaque_tcp();
    let dst = format!("{TARGET_V4}:7000");
    let mut echo = topo.echo_server(Side::Target, dst.parse().unwrap());
    let mut daemon = topo.start_daemon(&[]);
    daemon.kill9();
    // Fail closed: redirected to the listener, where nothing listens. The local port is fixed
    // (this topology has its own network namespace), so it can be used again below.
    let local = "127.0.0.1:41234";
    let mut cmd = Command::new(topo.probe());
    cmd.args(["connect", &dst, "governed", local]);
    let refused = parse_probe(&topo.output(Side::Governed, cmd));
    assert_eq!(refused["kind"], "ConnectionRefused", "{refused}");

    // Outside the cgroup, straight to the listener, from the same local address and port: the
    // refused connect's kernel record must not make this a governed session.
    let _daemon = topo.start_daemon(&[]);
    topo.assert_sneak_refused(local, &mut echo);
}

#[test]
fn a_connection_to_the_listener_without_a_redirect_is_refused_and_recorded() {
    require_root();
    let topo = Topology::new("");
    let _daemon = topo.start_daemon(&[]);
    // Straight to the listener, from outside the cgroup: there is no kernel record.
    let out = topo.probe_connect(
        Side::Host,
        &format!("127.0.0.1:{}", bulkhead_tests::LISTENER_PORT),
        "sneak",
    );
    // Closed without an answer: an empty reply, or an error (reset, not connected, broken
    // pipe) depending on how far the client got before the gateway closed.
    assert!(
        out["reply"] == "" || (out["reply"].is_null() && out["error"].is_string()),
        "{out}"
    );
    let session = topo.wait_session_closed();
    assert_eq!(session["outcome"]["kind"], "refused", "{session}");
}

#[test]
fn status_and_sessions_work_with_the_daemon_running_and_stopped() {
    require_root();
    let topo = Topology::new("[[target]]\nname = \"echo\"\naddresses = [\"10.201.0.2:7000\"]\n");
    topo.allow_opaque_tcp();
    let _echo = topo.echo_server(Side::Target, format!("{TARGET_V4}:7000").parse().unwrap());
    let mut daemon = topo.start_daemon(&[]);
    let status = topo.run_cli(&["status", "--json"]).unwrap();
    assert_eq!(status["daemon"]["mode"], "fail-closed");
    assert_eq!(status["governed_cgroup"], topo.cgroup.display().to_string());
    assert_eq!(status["programs_attached"], true);
    let listeners = status["daemon"]["listeners"].as_array().unwrap();
    let listener = format!("127.0.0.1:{}", bulkhead_tests::LISTENER_PORT);
    assert!(listeners.iter().any(|l| *l == listener), "{status}");

    topo.probe_connect(Side::Governed, &format!("{TARGET_V4}:7000"), "x");
    let session = topo.wait_session_closed();
    assert_eq!(session["target"], "echo");
    let status = topo.run_cli(&["status", "--json"]).unwrap();
    assert_eq!(status["store"]["sessions"], 1, "{status}");
    assert_eq!(
        status["store"]["events"], 3,
        "connect, the connection's decision, close: {status}"
    );
    assert_eq!(status["daemon"]["connections"]["accepted"], 1, "{status}");
    // The pinned redirect points at this daemon's listeners, and is ready.
    assert_eq!(status["redirect"]["this_daemon"], true, "{status}");
    assert_eq!(status["redirect"]["ready"], true, "{status}");
    assert!(
        status["redirect"]["to"]
            .as_array()
            .unwrap()
            .contains(&serde_json::json!(listener)),
        "{status}"
    );

    // Stopped cleanly: the CLI reads the store itself.
    daemon.terminate();
    let sessions = topo.sessions();
    assert_eq!(sessions.len(), 1);
    assert_eq!(sessions[0]["id"], session["id"]);
    let shown = topo
        .run_cli(&["sessions", "show", &session["id"].to_string(), "--json"])
        .unwrap();
    assert_eq!(shown["session"]["identity"], session["identity"]);
    let kinds: Vec<&str> = shown["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["type"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, vec!["connect", "request", "close"]);
    let out = topo.output(Side::Host, topo.bulkhead(&["sessions", "list"]));
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("10.201.0.2:7000") && table.contains("bh-probe") && table.contains("echo"),
        "{table}"
    );
    let out = topo.output(Side::Host, topo.bulkhead(&["status"]));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("not running") && text.contains("refused until the daemon runs"),
        "{text}"
    );
    assert!(
        text.contains(&format!("redirect:    governed connects go to {listener}")),
        "{text}"
    );
}

#[test]
fn bad_configuration_is_reported_with_the_key_and_the_problem() {
    let dir = std::env::temp_dir().join(format!("bulkhead-badconfig-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cases = [
        ("[listener]\nprot = 15001\n", &["prot"][..]),
        (
            "[listener]\nipv4 = \"10.0.0.1\"\n",
            &["listener.ipv4", "loopback"][..],
        ),
        (
            "[governed]\ncgroup = \"/\"\n",
            &["governed.cgroup", "root"][..],
        ),
        (
            "[capture]\nexclude = [\"10.0.0.0/40\"]\n",
            &["capture.exclude[0]", "/40"][..],
        ),
        (
            "[[target]]\nname = \"db\"\naddresses = [\"db:5432\"]\n",
            &["target[0].addresses[0]"][..],
        ),
        ("[listener\n", &["line 1"][..]),
    ];
    for (i, (text, needles)) in cases.iter().enumerate() {
        let path = dir.join(format!("bad{i}.toml"));
        std::fs::write(&path, text).unwrap();
        let out = Command::new(bulkhead_tests::bulkhead_bin())
            .arg("--config")
            .arg(&path)
            .arg("daemon")
            .output()
            .unwrap();
        assert!(!out.status.success(), "{text:?} was accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(&path.display().to_string()),
            "error names the file: {err}"
        );
        for n in *needles {
            assert!(
                err.contains(n),
                "error for {text:?} should mention {n:?}: {err}"
            );
        }
    }
    let missing = Command::new(bulkhead_tests::bulkhead_bin())
        .args(["--config", "/nonexistent/bulkhead.toml", "status"])
        .output()
        .unwrap();
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("/nonexistent/bulkhead.toml"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_second_daemon_for_the_same_cgroup_and_pins_refuses_to_start_and_names_the_first() {
    require_root();
    let topo = Topology::new("");
    topo.allow_opaque_tcp();
    let _echo = topo.echo_server(Side::Target, format!("{TARGET_V4}:7000").parse().unwrap());
    let daemon = topo.start_daemon(&[]);
    // Same cgroup and pins; its own port, state and control socket, so nothing else stops it.
    let first = std::fs::read_to_string(&topo.config_path).unwrap();
    let second = topo.dir.join("second.toml");
    std::fs::write(
        &second,
        first
            .replace(
                &topo.dir.join("state").display().to_string(),
                &topo.dir.join("state2").display().to_string(),
            )
            .replace(
                &topo.dir.join("run").display().to_string(),
                &topo.dir.join("run2").display().to_string(),
            )
            + "[listener]\nport = 15002\n",
    )
    .unwrap();
    let mut cmd = Command::new(bulkhead_tests::bulkhead_bin());
    cmd.arg("--config").arg(&second).arg("daemon");
    let mut second = topo.spawn(Side::Host, "second-daemon", cmd);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = second.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the second daemon kept running: {}",
            second.stderr()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let _ = second.wait();
    let stderr = second.stderr();
    assert!(!status.success(), "{stderr}");
    assert!(
        stderr.contains("held by another bulkhead daemon")
            && stderr.contains(&format!("(pid {})", daemon.pid())),
        "{stderr}"
    );
    // The first still governs: a governed connection reaches the target through it.
    let client = topo.probe_connect(Side::Governed, &format!("{TARGET_V4}:7000"), "still here");
    assert_eq!(reply(&client)["data"], "still here", "{client}");
}

#[test]
fn uninstall_programs_removes_a_stopped_daemons_pins_and_is_refused_while_one_runs() {
    require_root();
    let topo = Topology::new("");
    topo.allow_opaque_tcp();
    let _echo = topo.echo_server(Side::Target, format!("{TARGET_V4}:7000").parse().unwrap());
    let dst = format!("{TARGET_V4}:7000");
    let mut daemon = topo.start_daemon(&[]);
    let out = topo.output(Side::Host, topo.bulkhead(&["uninstall-programs"]));
    assert!(
        !out.status.success(),
        "removed under a running daemon: {out:?}"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("(pid {})", daemon.pid())) && err.contains("stop the daemon first"),
        "{err}"
    );

    // Killed: the pins stay and governed connections are refused (fail closed) ...
    daemon.kill9();
    let refused = topo.probe_connect(Side::Governed, &dst, "x");
    assert_eq!(refused["kind"], "ConnectionRefused", "{refused}");
    // ... until the admin removes them: then governed processes connect directly.
    let out = topo.output(Side::Host, topo.bulkhead(&["uninstall-programs"]));
    assert!(out.status.success(), "{out:?}");
    assert!(!topo.pin_dir.exists(), "the pin directory is gone");
    assert_direct(&topo, Side::Governed, &dst, "direct");
    assert_eq!(topo.status_while_stopped()["programs_attached"], false);
}

#[test]
fn a_listener_port_in_use_is_reported_with_its_key() {
    require_root();
    let topo = Topology::new("");
    // Something else holds the gateway's port on the governed side's loopback.
    let mut holder = Command::new(topo.probe());
    let port = bulkhead_tests::LISTENER_PORT;
    holder.args(["serve", &format!("127.0.0.1:{port}")]);
    let mut holder = topo.spawn(Side::Host, "port-holder", holder);
    assert_eq!(
        holder.line(Duration::from_secs(10)).as_deref(),
        Some("ready")
    );
    let mut cmd = topo.bulkhead(&["daemon"]);
    cmd.env("RUST_LOG", "error");
    let out = topo.output(Side::Host, cmd);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("127.0.0.1:{port}")) && err.contains("`listener.port`"),
        "{err}"
    );
    // The cause once, though the message goes on after it (the hint).
    assert_eq!(err.matches("(os error 98)").count(), 1, "{err}");
}
