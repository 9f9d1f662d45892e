//! The `bulkhead` command line as an admin uses it, without a daemon: pipes, policy commands.

use std::{
    io::Read as _,
    process::{Command, Stdio},
};

use bulkhead_tests::bulkhead_bin;

/// A config file whose policy directory is `policies` (state and run dirs in `dir`).
fn config_in(dir: &std::path::Path, policies: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("bulkhead.toml");
    std::fs::write(
        &path,
        format!(
            "[daemon]\nstate_dir = \"{}\"\nrun_dir = \"{}\"\npolicy_dir = \"{}\"\n",
            dir.join("state").display(),
            dir.join("run").display(),
            policies.display()
        ),
    )
    .unwrap();
    path
}

#[test]
fn a_reader_that_stops_early_ends_the_cli_quietly() {
    use std::os::unix::process::ExitStatusExt as _;
    let dir = tempfile::tempdir().unwrap();
    let policies = dir.path().join("policies");
    let config = config_in(dir.path(), &policies);
    // The reader is gone before the command prints its first line (its startup alone takes
    // longer than closing our end of the pipe).
    let mut child = Command::new(bulkhead_bin())
        .arg("--config")
        .arg(&config)
        .args(["policy", "init"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    let status = child.wait().unwrap();
    assert!(
        !stderr.contains("panicked") && !stderr.contains("Broken pipe"),
        "{stderr}"
    );
    assert!(
        status.success() || status.signal() == Some(libc::SIGPIPE),
        "{status:?}: {stderr}"
    );
}

#[test]
fn policy_commands_use_the_policy_directory_of_the_configuration() {
    let dir = tempfile::tempdir().unwrap();
    let policies = dir.path().join("policies");
    let config = config_in(dir.path(), &policies);
    let bulkhead = |args: &[&str]| {
        Command::new(bulkhead_bin())
            .arg("--config")
            .arg(&config)
            .args(args)
            .output()
            .unwrap()
    };
    let init = bulkhead(&["policy", "init"]);
    assert!(init.status.success(), "{init:?}");
    assert!(policies.join("opaque-tcp.toml").is_file());
    let check = bulkhead(&["policy", "check"]);
    let text = String::from_utf8_lossy(&check.stdout);
    assert!(
        check.status.success() && text.contains(&policies.display().to_string()),
        "{check:?}"
    );
    // --json, with a warning for each rule naming a target this configuration lacks.
    let report: serde_json::Value =
        serde_json::from_slice(&bulkhead(&["policy", "check", "--json"]).stdout).unwrap();
    assert_eq!(report["ok"], true, "{report}");
    let warnings = report["warnings"].to_string();
    assert!(
        warnings.contains("jump-host-needs-approval") && warnings.contains("matches no target"),
        "{warnings}"
    );
    // `policy test` reads the same directory: the jump host of opaque-tcp.toml is held.
    let test = bulkhead(&[
        "policy",
        "test",
        "--target",
        "jump-host",
        "--protocol",
        "tcp",
        "--connect",
    ]);
    let text = String::from_utf8_lossy(&test.stdout);
    assert!(text.contains("verdict:   approve"), "{test:?}");
    assert_eq!(test.status.code(), Some(3), "approve exits 3");
    let allowed = bulkhead(&[
        "policy",
        "test",
        "--target",
        "artifact-cache",
        "--protocol",
        "tcp",
        "--connect",
    ]);
    assert_eq!(allowed.status.code(), Some(0), "{allowed:?}");
    let denied = bulkhead(&["policy", "test", "--target", "10.9.9.9:22", "--connect"]);
    assert_eq!(denied.status.code(), Some(1), "{denied:?}");
    assert!(String::from_utf8_lossy(&denied.stdout).contains("verdict:   deny"));
    // A broken file: the JSON report says so, with the error, and the exit status is 1.
    std::fs::write(
        policies.join("zz-broken.toml"),
        "[[rule]]\nid = \"x\"\nverdict = \"maybe\"\n",
    )
    .unwrap();
    let broken = bulkhead(&["policy", "check", "--json"]);
    assert_eq!(broken.status.code(), Some(1));
    let report: serde_json::Value = serde_json::from_slice(&broken.stdout).unwrap();
    assert_eq!(report["ok"], false, "{report}");
    assert!(
        report["errors"].to_string().contains("zz-broken.toml"),
        "{report}"
    );
    std::fs::remove_file(policies.join("zz-broken.toml")).unwrap();
    // A second init keeps what is there.
    std::fs::write(policies.join("opaque-tcp.toml"), "# edited by the admin\n").unwrap();
    let again = bulkhead(&["policy", "init"]);
    assert!(String::from_utf8_lossy(&again.stdout).contains("kept"));
    assert_eq!(
        std::fs::read_to_string(policies.join("opaque-tcp.toml")).unwrap(),
        "# edited by the admin\n"
    );
}

/// `bulkhead run -- CMD` in a test topology's cgroup (no daemon needed to start a command).
fn run_governed(
    topo: &bulkhead_tests::Topology,
    args: &[&str],
    sudo_caller: Option<&str>,
) -> std::process::Output {
    let mut cmd = topo.bulkhead(&["run"]);
    cmd.args(args);
    if let Some(uid) = sudo_caller {
        cmd.env("SUDO_UID", uid)
            .env("SUDO_GID", uid)
            .env("SUDO_USER", "nobody");
    }
    cmd.env("HOME", "/root")
        .env("USER", "root")
        .env("LOGNAME", "root");
    topo.output(bulkhead_tests::Side::Host, cmd)
}

fn env_of(out: &std::process::Output) -> std::collections::HashMap<String, String> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn run_gives_the_tool_its_users_environment_and_says_when_it_cannot_start_it() {
    bulkhead_tests::require_root();
    let topo = bulkhead_tests::Topology::new("");
    let nobody = |out: &std::process::Output| {
        let env = env_of(out);
        let want = [
            ("HOME", "/nonexistent"),
            ("USER", "nobody"),
            ("LOGNAME", "nobody"),
            ("SHELL", "/usr/sbin/nologin"),
        ];
        for (k, v) in want {
            assert_eq!(env.get(k).map(String::as_str), Some(v), "{k}: {out:?}");
        }
    };
    // Under sudo: the caller's account, not root's HOME.
    let out = run_governed(&topo, &["--", "/usr/bin/env"], Some("65534"));
    assert!(out.status.success(), "{out:?}");
    nobody(&out);
    // No daemon and nothing pinned: it says plainly that connections are not governed.
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("NOT governed"),
        "{out:?}"
    );
    // --user, without sudo.
    let out = run_governed(&topo, &["--user", "nobody", "--", "/usr/bin/env"], None);
    assert!(out.status.success(), "{out:?}");
    nobody(&out);
    let out = run_governed(
        &topo,
        &["--user", "no-such-user-x", "--", "/usr/bin/env"],
        None,
    );
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no such user"),
        "{out:?}"
    );
    // As root: refused unless --allow-root (tests/privilege.rs); with it, it runs and says so.
    let out = run_governed(&topo, &["--", "/usr/bin/true"], None);
    assert!(!out.status.success(), "{out:?}");
    let out = run_governed(&topo, &["--allow-root", "--", "/usr/bin/true"], None);
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("runs as root"),
        "{out:?}"
    );
    // A command that does not exist: 127, as a shell says it.
    let out = run_governed(&topo, &["--", "/no/such/command"], Some("65534"));
    assert_eq!(out.status.code(), Some(127), "{out:?}");
}

#[test]
fn status_lists_targets_startup_problems_and_a_changed_configuration() {
    bulkhead_tests::require_root();
    let topo = bulkhead_tests::Topology::new(
        "[[target]]\nname = \"echo\"\naddresses = [\"10.201.0.2:7000\", \"10.201.0.0/24\"]\n\
         [[target]]\nname = \"db\"\nprotocol = \"postgres\"\naddresses = [\"10.201.0.2:5432\"]\n\
         credentials = { file = \"/nonexistent/bulkhead-test-credentials\" }\n",
    );
    topo.allow_opaque_tcp();
    let mut daemon_proc = topo.start_daemon(&[]);
    let status = topo.run_cli(&["status", "--json"]).unwrap();
    let daemon = &status["daemon"];
    assert_eq!(daemon["targets"][0]["name"], "echo", "{status}");
    assert_eq!(daemon["targets"][0]["protocol"], "tcp");
    assert_eq!(daemon["targets"][0]["addresses"][1], "10.201.0.0/24");
    assert_eq!(daemon["targets"][1]["protocol"], "postgres");
    let logs = daemon_proc.drain_lines().join("\n");
    assert!(
        logs.contains("governing connections"),
        "the log is read: {logs}"
    );
    assert!(
        !logs.contains('\u{1b}'),
        "no terminal colours in a log that is not a terminal: {logs}"
    );
    let warnings = daemon["warnings"].to_string();
    assert!(
        warnings.contains("target db: credentials unreadable"),
        "{warnings}"
    );
    assert_eq!(daemon["config_changed"], false);

    let mut text = std::fs::read_to_string(&topo.config_path).unwrap();
    text.push_str("# an admin's edit\n");
    std::fs::write(&topo.config_path, text).unwrap();
    let status = topo.run_cli(&["status", "--json"]).unwrap();
    assert_eq!(status["daemon"]["config_changed"], true, "{status}");
    let out = topo.output(bulkhead_tests::Side::Host, topo.bulkhead(&["status"]));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("CHANGED since the daemon read it"), "{text}");
    assert!(
        text.contains("echo (tcp) 10.201.0.2:7000, 10.201.0.0/24"),
        "{text}"
    );
    // SIGHUP reads the file again: nothing but a comment changed, so nothing waits.
    hangup(&daemon_proc);
    wait_log(&mut daemon_proc, "configuration reloaded");
    let status = topo.run_cli(&["status", "--json"]).unwrap();
    assert_eq!(status["daemon"]["config_changed"], false, "{status}");
}

/// Sends SIGHUP to a daemon this test started.
fn hangup(daemon: &bulkhead_tests::Proc) {
    // SAFETY: we signal only our own child, by its pid.
    unsafe {
        libc::kill(i32::try_from(daemon.pid()).unwrap(), libc::SIGHUP);
    }
}

/// The daemon's log (stdout) up to the first line containing `until`, which must come.
fn wait_log(daemon: &mut bulkhead_tests::Proc, until: &str) -> String {
    let mut logs = String::new();
    while let Some(line) = daemon.line(std::time::Duration::from_secs(5)) {
        logs.push_str(&line);
        logs.push('\n');
        if line.contains(until) {
            break;
        }
    }
    assert!(logs.contains(until), "{logs}");
    logs
}

#[test]
fn a_sighup_applies_new_targets_to_new_connections_and_names_what_waits_for_a_restart() {
    bulkhead_tests::require_root();
    let topo = bulkhead_tests::Topology::new(
        "[[target]]\nname = \"echo\"\naddresses = [\"10.201.0.2:7000\", \"10.201.0.0/24\"]\n",
    );
    topo.allow_opaque_tcp();
    let mut daemon_proc = topo.start_daemon(&[]);
    let _echo = topo.echo_server(
        bulkhead_tests::Side::Target,
        "10.201.0.2:7001".parse().unwrap(),
    );
    let session_target = || {
        let client = topo.probe_connect(bulkhead_tests::Side::Governed, "10.201.0.2:7001", "hi");
        assert_eq!(bulkhead_tests::reply(&client)["data"], "hi", "{client}");
        topo.wait_session_of(&client["pid"])["target"].clone()
    };
    assert_eq!(
        session_target(),
        "echo",
        "the /24 of target echo, before the reload"
    );
    // A target added to the file applies at the next SIGHUP, to new connections, without a
    // restart; a changed listener port waits for one, and says so.
    let mut config_text = std::fs::read_to_string(&topo.config_path).unwrap();
    config_text.push_str(
        "[[target]]\nname = \"late\"\naddresses = [\"10.201.0.2:7001\"]\n\
         [listener]\nport = 952\n",
    );
    std::fs::write(&topo.config_path, &config_text).unwrap();
    hangup(&daemon_proc);
    let logs = wait_log(&mut daemon_proc, "apply after a restart");
    assert!(logs.contains("configuration reloaded"), "{logs}");
    assert!(logs.contains("late"), "the added target is named: {logs}");
    assert_eq!(
        session_target(),
        "late",
        "new connections use the new target table"
    );
    let status = topo.run_cli(&["status", "--json"]).unwrap();
    let daemon = &status["daemon"];
    assert_eq!(daemon["targets"][1]["name"], "late", "{status}");
    assert_eq!(
        daemon["restart_needed"],
        serde_json::json!(["listener"]),
        "{status}"
    );
    assert_eq!(daemon["config_changed"], true, "{status}");
    assert_eq!(
        daemon["pid"],
        daemon_proc.pid(),
        "the same daemon: {status}"
    );
    let out = topo.output(bulkhead_tests::Side::Host, topo.bulkhead(&["status"]));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("CHANGED in sections that apply after a restart")
            && text.contains("listener"),
        "{text}"
    );
    assert!(text.contains("late (tcp) 10.201.0.2:7001"), "{text}");

    // A file that does not load changes nothing (the good file is put back for the CLI).
    std::fs::write(&topo.config_path, "[[target]\nbroken").unwrap();
    hangup(&daemon_proc);
    wait_log(&mut daemon_proc, "not reloaded");
    std::fs::write(&topo.config_path, &config_text).unwrap();
    assert_eq!(session_target(), "late", "the last good target table stays");
}

#[test]
fn every_command_shows_examples_in_its_help() {
    let commands = bulkhead::cli::leaf_commands();
    assert!(commands.len() >= 15, "{commands:?}");
    for path in commands {
        let out = Command::new(bulkhead_bin())
            .args(&path)
            .arg("--help")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{path:?}: {out:?}");
        let examples = text.split("Examples:").nth(1).unwrap_or_default();
        assert!(
            examples.contains(&format!("bulkhead {}", path.join(" "))),
            "bulkhead {} --help has no example line:\n{text}",
            path.join(" ")
        );
    }
}

#[test]
fn policy_test_judges_the_callers_own_uid_unless_told_otherwise() {
    let dir = tempfile::tempdir().unwrap();
    let policies = dir.path().join("policies");
    std::fs::create_dir_all(&policies).unwrap();
    // SAFETY: getuid has no preconditions.
    let me = unsafe { libc::getuid() };
    std::fs::write(
        policies.join("mine.toml"),
        format!(
            "[[target]]\nname = \"mine\"\nprotocol = \"tcp\"\ndefault = \"deny\"\n\
             [[rule]]\nid = \"me\"\nverdict = \"allow\"\ntarget = {{ name = [\"mine\"] }}\n\
             identity = {{ uid = [{me}] }}\n"
        ),
    )
    .unwrap();
    let config = config_in(dir.path(), &policies);
    let test = |extra: &[&str]| {
        Command::new(bulkhead_bin())
            .arg("--config")
            .arg(&config)
            .args([
                "policy",
                "test",
                "--target",
                "mine",
                "--protocol",
                "tcp",
                "--connect",
            ])
            .args(extra)
            .output()
            .unwrap()
    };
    assert_eq!(test(&[]).status.code(), Some(0), "my own uid is allowed");
    let other = (me + 1).to_string();
    assert_eq!(
        test(&["--uid", &other]).status.code(),
        Some(1),
        "another uid is not"
    );
}

#[test]
fn a_stale_control_socket_is_called_stale_and_errors_say_their_cause_once() {
    let dir = tempfile::tempdir().unwrap();
    let policies = dir.path().join("policies");
    let config = config_in(dir.path(), &policies);
    let run = |args: &[&str]| {
        let out = Command::new(bulkhead_bin())
            .arg("--config")
            .arg(&config)
            .args(args)
            .output()
            .unwrap();
        (
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    // No socket at all: absent, not stale.
    let (_, err) = run(&["approvals", "list"]);
    assert!(err.contains("no control socket at"), "{err}");
    // A socket file nothing listens on, as a killed daemon leaves it.
    std::fs::create_dir_all(dir.path().join("run")).unwrap();
    let socket = dir.path().join("run/control.sock");
    drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
    assert!(socket.exists());
    let (_, err) = run(&["approvals", "list"]);
    assert!(err.contains("stale control socket at"), "{err}");
    let (out, _) = run(&["status"]);
    assert!(out.contains("stale control socket at"), "{out}");

    let out = Command::new(bulkhead_bin())
        .args(["--config", "/nonexistent/bulkhead.toml", "status"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.matches("os error 2").count(), 1, "{err}");
}

#[test]
fn doctor_checks_the_running_daemon_and_says_how_to_fix_what_is_wrong() {
    bulkhead_tests::require_root();
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("db-password");
    std::fs::write(&secret, "test-only\n").unwrap();
    std::fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let topo = bulkhead_tests::Topology::new(&format!(
        "[[target]]\nname = \"db\"\nprotocol = \"postgres\"\naddresses = [\"10.201.0.2:5432\"]\n\
         credentials = {{ file = \"{}\" }}\n",
        secret.display()
    ));
    topo.allow_opaque_tcp();
    let mut daemon = topo.start_daemon(&[]);
    let doctor = |topo: &bulkhead_tests::Topology| {
        let out = topo.output(
            bulkhead_tests::Side::Host,
            topo.bulkhead(&["doctor", "--json"]),
        );
        let checks: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        (out.status.code(), checks)
    };
    let level = |checks: &serde_json::Value, name: &str| {
        checks
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == name)
            .map(|c| (c["level"].as_str().unwrap().to_string(), c.clone()))
            .unwrap_or_else(|| panic!("no {name} check: {checks}"))
    };
    let (code, checks) = doctor(&topo);
    for ok in [
        "cgroup v2",
        "bpffs",
        "daemon",
        "programs",
        "state dir",
        "control",
        "policies",
    ] {
        assert_eq!(level(&checks, ok).0, "ok", "{ok}: {checks}");
    }
    let (l, c) = level(&checks, "credentials");
    assert_eq!(l, "warn", "a world-readable secret: {c}");
    assert!(c["fix"].as_str().unwrap().contains("chmod 600"), "{c}");
    assert_ne!(code, Some(1), "nothing failed: {checks}");

    // Stopped: the pinned programs refuse governed connects, and doctor fails saying so.
    daemon.terminate();
    daemon.wait();
    let (code, checks) = doctor(&topo);
    assert_eq!(code, Some(1), "{checks}");
    assert_eq!(level(&checks, "daemon").0, "fail");
    let (l, c) = level(&checks, "programs");
    assert_eq!(l, "warn", "{c}");
    assert!(
        c["detail"]
            .as_str()
            .unwrap()
            .contains("refused (fail closed)"),
        "{c}"
    );
    // The text form says the same with its fixes.
    let out = topo.output(bulkhead_tests::Side::Host, topo.bulkhead(&["doctor"]));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("FAIL  daemon") && text.contains("fix: "),
        "{text}"
    );

    // A fail-open daemon pins nothing: that is a warning about the mode, not a failure.
    let out = topo.output(
        bulkhead_tests::Side::Host,
        topo.bulkhead(&["uninstall-programs"]),
    );
    assert!(out.status.success(), "{out:?}");
    let _open = topo.start_daemon(&["--fail-open"]);
    let (code, checks) = doctor(&topo);
    let (l, c) = level(&checks, "programs");
    assert_eq!(l, "warn", "{c}");
    assert!(c["detail"].as_str().unwrap().contains("fail open"), "{c}");
    assert_ne!(code, Some(1), "{checks}");
}

#[test]
fn trust_install_puts_the_gateway_ca_in_the_trust_store_and_remove_takes_it_out() {
    bulkhead_tests::require_root();
    let dir = tempfile::tempdir().unwrap();
    let config = config_in(dir.path(), &dir.path().join("policies"));
    let ca_dir = dir.path().join("state/ca");
    std::fs::create_dir_all(&ca_dir).unwrap();
    let made = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
        ])
        .args(["-subj", "/CN=bulkhead trust test CA", "-days", "1"])
        .arg("-keyout")
        .arg(ca_dir.join("ca.key"))
        .arg("-out")
        .arg(ca_dir.join("ca.pem"))
        .output()
        .unwrap();
    assert!(made.status.success(), "{made:?}");
    // A file system tree of its own, so the machine's trust store is never touched.
    let root = dir.path().join("root");
    for d in [
        "etc/ssl/certs",
        "usr/local/share/ca-certificates",
        "etc/ca-certificates/update.d",
    ] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    // One of the machine's own roots, as on a real system (with none, update-ca-certificates
    // never rewrites a bundle that becomes empty).
    let one_root = std::fs::read_to_string("/etc/ca-certificates.conf")
        .unwrap()
        .lines()
        .find(|l| !l.starts_with('#') && !l.starts_with('!') && !l.trim().is_empty())
        .expect("a CA in /etc/ca-certificates.conf")
        .to_string();
    std::fs::write(
        root.join("etc/ca-certificates.conf"),
        format!("{one_root}\n"),
    )
    .unwrap();
    let trust = |what: &str| {
        let out = Command::new(bulkhead_bin())
            .arg("--config")
            .arg(&config)
            .args(["trust", what, "--root"])
            .arg(&root)
            .output()
            .unwrap();
        assert!(out.status.success(), "trust {what}: {out:?}");
        std::fs::read_to_string(root.join("etc/ssl/certs/ca-certificates.crt")).unwrap_or_default()
    };
    let body: String = std::fs::read_to_string(ca_dir.join("ca.pem"))
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect();
    // The SSH CA as the daemon makes it, and an admin's own line that must stay.
    let state = dir.path().join("state");
    let ssh_ca =
        bulkhead::proxy::ssh::ca::SshCa::load_or_create(&bulkhead::proxy::ssh::ca::dir(&state))
            .unwrap();
    let known_hosts = root.join("etc/ssh/ssh_known_hosts");
    std::fs::create_dir_all(known_hosts.parent().unwrap()).unwrap();
    let admins = "build-1.example ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIAdmin\n";
    std::fs::write(&known_hosts, admins).unwrap();

    let bundle: String = trust("install").lines().collect();
    assert!(bundle.contains(&body), "the CA is in the bundle: {bundle}");
    let hosts = std::fs::read_to_string(&known_hosts).unwrap();
    assert_eq!(
        hosts,
        format!("{admins}{}\n", ssh_ca.known_hosts_line()),
        "{hosts}"
    );
    // Installing again replaces the line rather than adding a second.
    trust("install");
    assert_eq!(std::fs::read_to_string(&known_hosts).unwrap(), hosts);

    let bundle: String = trust("remove").lines().collect();
    assert!(!bundle.contains(&body), "the CA left the bundle");
    assert_eq!(std::fs::read_to_string(&known_hosts).unwrap(), admins);
    // No link is left pointing at the removed CA (update-ca-certificates leaves two).
    for entry in std::fs::read_dir(root.join("etc/ssl/certs")).unwrap() {
        let path = entry.unwrap().path();
        assert!(
            std::fs::metadata(&path).is_ok(),
            "dangling {}",
            path.display()
        );
    }
    // A known_hosts file that `install` made holds nothing after `remove`: it goes.
    std::fs::remove_file(&known_hosts).unwrap();
    trust("install");
    assert!(known_hosts.exists());
    trust("remove");
    assert!(!known_hosts.exists(), "an empty known_hosts was left");
}

/// After a daemon exits, `bulkhead run` says what will happen to the tool's connections, and
/// that is what happens: a fail-open daemon's programs went with it (connections go direct,
/// never "refused"); a fail-closed daemon's stay pinned (connections are refused).
#[test]
fn run_says_truly_whether_connections_are_refused_after_the_daemon_exits() {
    use bulkhead_tests::{parse_probe, Side, TARGET_V4};
    bulkhead_tests::require_root();
    let topo = bulkhead_tests::Topology::new("");
    topo.allow_opaque_tcp();
    let dst = format!("{TARGET_V4}:7000");
    let _echo = topo.echo_server(Side::Target, dst.parse().unwrap());
    let probe = topo.probe();
    let probe = probe.to_str().unwrap();
    let run_probe = || {
        let out = run_governed(&topo, &["--", probe, "connect", &dst, "x"], Some("65534"));
        let said = String::from_utf8_lossy(&out.stderr).into_owned();
        (said, parse_probe(&out))
    };

    // Fail open, and it crashed: nothing is left in the kernel.
    let mut daemon = topo.start_daemon(&["--fail-open"]);
    daemon.kill9();
    let (said, probe_result) = run_probe();
    assert!(said.contains("NOT governed"), "{said}");
    assert!(!said.contains("refused"), "{said}");
    assert_eq!(
        bulkhead_tests::reply(&probe_result)["data"],
        "x",
        "{probe_result}"
    );
    // Direct: from the namespace's own address, not redirected to the loopback listener.
    assert!(
        probe_result["local"]
            .as_str()
            .unwrap()
            .starts_with("10.201.0.1:"),
        "it went direct: {probe_result}"
    );

    // Fail closed, stopped: the pinned programs refuse every governed connect.
    let mut daemon = topo.start_daemon(&[]);
    daemon.terminate();
    let (said, probe_result) = run_probe();
    assert!(said.contains("will be refused until it runs"), "{said}");
    assert!(!said.contains("NOT governed"), "{said}");
    assert_eq!(probe_result["kind"], "ConnectionRefused", "{probe_result}");
}

/// A daemon killed with -9 leaves its control socket: the CLI calls it stale (not just
/// "not running"), and the next daemon removes it and says so in its log.
#[test]
fn a_crashed_daemons_control_socket_is_called_stale_and_the_next_daemon_replaces_it() {
    use bulkhead_tests::Side;
    bulkhead_tests::require_root();
    let topo = bulkhead_tests::Topology::new("");
    let mut daemon = topo.start_daemon(&[]);
    daemon.kill9();
    let socket = topo.dir.join("run/control.sock");
    assert!(socket.exists());
    let out = topo.output(Side::Host, topo.bulkhead(&["approvals", "list"]));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("the daemon is not running")
            && err.contains(&format!("stale control socket at {}", socket.display()))
            && err.contains("did not exit cleanly"),
        "{err}"
    );
    let out = topo.output(Side::Host, topo.bulkhead(&["status"]));
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("stale control socket at"), "{text}");

    let mut daemon = topo.start_daemon(&[]);
    let mut logs = String::new();
    while let Some(line) = daemon.line(std::time::Duration::from_secs(5)) {
        logs.push_str(&line);
        logs.push('\n');
        if line.contains("removed a stale control socket") {
            break;
        }
    }
    assert!(
        logs.contains("removed a stale control socket")
            && logs.contains(&socket.display().to_string()),
        "{logs}"
    );
    // It answers on the socket it replaced.
    let out = topo.output(Side::Host, topo.bulkhead(&["approvals", "list"]));
    assert!(out.status.success(), "{out:?}");
}

/// `approvals watch` follows across a daemon restart: it says on stderr that the daemon went
/// away and that it reconnected, instead of ending silently.
#[test]
fn approvals_watch_says_the_daemon_went_away_and_follows_the_next_one() {
    use bulkhead_tests::Side;
    use std::time::{Duration, Instant};
    bulkhead_tests::require_root();
    let topo = bulkhead_tests::Topology::new("");
    let mut daemon = topo.start_daemon(&[]);
    let watch = topo.spawn(Side::Host, "watch", topo.bulkhead(&["approvals", "watch"]));
    // Connected: the watcher holds a unix socket (its connection to the control socket).
    let connected = || {
        let mut ss = std::process::Command::new("ss");
        ss.args(["-x", "-p"]);
        let out = topo.output(Side::Host, ss);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .any(|l| l.contains(&format!("pid={},", watch.pid())))
    };
    let wait = |what: &str, ok: &dyn Fn() -> bool| {
        let deadline = Instant::now() + Duration::from_secs(15);
        while !ok() {
            assert!(Instant::now() < deadline, "{what}: {}", watch.stderr());
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    wait("the watcher connects", &connected);
    daemon.terminate();
    wait("the watcher says the daemon went away", &|| {
        watch.stderr().contains("the daemon went away")
    });
    let _daemon = topo.start_daemon(&[]);
    wait("the watcher reconnects", &|| {
        watch.stderr().contains("reconnected to the daemon")
    });
    assert_eq!(
        watch.stderr().matches("went away").count(),
        1,
        "{}",
        watch.stderr()
    );
}
