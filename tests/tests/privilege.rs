//! Privilege and containment: what `bulkhead run` takes away from a governed command (setuid,
//! supplementary groups, the admin's terminal, root), and who may approve a held request.
//!
//! Each test builds its own topology (namespaces, cgroup) and, where it needs them, its own
//! users and groups (removed in `Drop`). Needs root.

use std::{
    path::PathBuf,
    process::{Command, Output},
    time::Duration,
};

use bulkhead_tests::{reply, require_root, sh, Proc, Side, Topology, TARGET_V4};
use serde_json::Value;

/// Groups and a user this test created, removed when dropped.
struct Accounts {
    user: Option<String>,
    groups: Vec<String>,
}

impl Accounts {
    /// Group `name` (created now).
    fn group(&mut self, name: &str) -> u32 {
        sh("groupadd", &[name]);
        self.groups.push(name.into());
        gid_of(name)
    }

    /// User `name` with a group of its own as its primary group and `groups` as supplementary
    /// ones; its uid and primary gid.
    fn user(&mut self, name: &str, groups: &[&str]) -> (u32, u32) {
        let list = groups.join(",");
        let mut args = vec!["-M", "-U", "-s", "/usr/sbin/nologin"];
        if !groups.is_empty() {
            args.extend(["-G", &list]);
        }
        args.push(name);
        sh("useradd", &args);
        self.user = Some(name.into());
        let id = |flag: &str| {
            let out = Command::new("id").args([flag, name]).output().expect("id");
            String::from_utf8_lossy(&out.stdout)
                .trim()
                .parse::<u32>()
                .expect("id")
        };
        (id("-u"), id("-g"))
    }
}

impl Drop for Accounts {
    fn drop(&mut self) {
        if let Some(user) = &self.user {
            let _ = Command::new("userdel").arg(user).output();
        }
        for g in &self.groups {
            let _ = Command::new("groupdel").arg(g).output();
        }
    }
}

fn accounts() -> Accounts {
    Accounts {
        user: None,
        groups: Vec::new(),
    }
}

fn gid_of(group: &str) -> u32 {
    let out = Command::new("getent")
        .args(["group", group])
        .output()
        .expect("getent");
    String::from_utf8_lossy(&out.stdout)
        .split(':')
        .nth(2)
        .and_then(|g| g.trim().parse().ok())
        .unwrap_or_else(|| panic!("no group {group}"))
}

/// A short name unique to this test process (user and group names are limited to 32 bytes).
fn unique(prefix: &str) -> String {
    format!("{prefix}{}", std::process::id())
}

/// The topology's configuration with `admin_group` as `[daemon] admin_group` and `extra`
/// appended (it starts inside `[governed]`).
fn configure(topo: &Topology, admin_group: &str, extra: &str) {
    topo.write_config(extra);
    let text = std::fs::read_to_string(&topo.config_path).expect("config");
    let text = text.replacen(
        "[daemon]\n",
        &format!("[daemon]\nadmin_group = \"{admin_group}\"\n"),
        1,
    );
    std::fs::write(&topo.config_path, text).expect("config");
}

/// `bulkhead run ARGS` from the host side (outside the governed cgroup), as root without sudo.
fn run(topo: &Topology, args: &[&str]) -> Output {
    let mut cmd = topo.bulkhead(&["run"]);
    cmd.args(args).env_remove("SUDO_UID");
    topo.output(Side::Host, cmd)
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn a_command_is_not_run_as_root_unless_allowed() {
    require_root();
    let topo = Topology::new("");
    let marker = topo.dir.join("ran-as-root");
    let touch = ["--", "/usr/bin/touch", marker.to_str().expect("utf-8")];
    let out = run(&topo, &touch);
    assert!(!out.status.success(), "refused: {out:?}");
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("refusing to run a governed command as root")
            && stderr.contains("--allow-root")
            && stderr.contains("leave the governed cgroup"),
        "says why and how: {stderr}"
    );
    assert!(!marker.exists(), "the command did not run");
    // --user root is root too.
    let mut as_root = vec!["--user", "root"];
    as_root.extend(touch);
    assert!(!run(&topo, &as_root).status.success());
    assert!(!marker.exists());

    let mut allowed = vec!["--allow-root"];
    allowed.extend(touch);
    let out = run(&topo, &allowed);
    assert!(out.status.success(), "{out:?}");
    assert!(marker.exists(), "--allow-root runs it");
    assert!(
        text(&out.stderr).contains("runs as root (--allow-root)"),
        "{out:?}"
    );
}

#[test]
fn a_setuid_program_does_not_raise_the_privileges_of_a_governed_command() {
    require_root();
    let topo = Topology::new("");
    // A setuid-root copy of id(1), made by cp (not by this process: a write descriptor of
    // ours, inherited by a child another test forks, would make exec fail with ETXTBSY).
    let suid_id = topo.dir.join("suid-id");
    let path = suid_id.to_str().expect("utf-8");
    sh("cp", &["/usr/bin/id", path]);
    sh("chown", &["root:root", path]);
    sh("chmod", &["4755", path]);
    let nobody = bulkhead_tests::system_user("nobody");
    // Outside bulkhead run it does raise them: the test can fail.
    let mut direct = Command::new(&suid_id);
    direct.arg("-u");
    let out = topo.output_as(Side::Host, Some(nobody), direct);
    assert_eq!(text(&out.stdout).trim(), "0", "setuid works here: {out:?}");

    let out = run(&topo, &["--user", "nobody", "--", path, "-u"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        text(&out.stdout).trim(),
        nobody.0.to_string(),
        "the effective uid stays nobody's: {out:?}"
    );
    // The governed command itself says no_new_privs is set.
    let out = run(
        &topo,
        &[
            "--user",
            "nobody",
            "--",
            "/bin/grep",
            "NoNewPrivs",
            "/proc/self/status",
        ],
    );
    assert!(text(&out.stdout).contains('1'), "{out:?}");
}

#[test]
fn only_the_groups_the_configuration_keeps_are_kept_and_never_the_admin_group() {
    require_root();
    let topo = Topology::new("");
    let mut acc = accounts();
    let (admin, keep, other) = (unique("bhadm"), unique("bhkeep"), unique("bhother"));
    let admin_gid = acc.group(&admin);
    let keep_gid = acc.group(&keep);
    let other_gid = acc.group(&other);
    let user = unique("bhrun");
    let (uid, primary) = acc.user(&user, &[&admin, &keep, &other]);
    // The user is in all three; the configuration keeps two of them, the admin group included.
    configure(
        &topo,
        &admin,
        &format!("uids = [{uid}]\n[run]\nkeep_groups = [\"{keep}\", \"{admin}\"]\n"),
    );
    let out = run(&topo, &["--user", &user, "--", "/usr/bin/id", "-G"]);
    assert!(out.status.success(), "{out:?}");
    let mut groups: Vec<u32> = text(&out.stdout)
        .split_whitespace()
        .map(|g| g.parse().expect("gid"))
        .collect();
    groups.sort_unstable();
    let mut want = vec![primary, keep_gid];
    want.sort_unstable();
    assert_eq!(groups, want, "primary and kept group only: {out:?}");
    assert!(!groups.contains(&admin_gid) && !groups.contains(&other_gid));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains(&format!("not keeping the admin group `{admin}`")),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!(
            "dropped: {admin} (gid {admin_gid}), {other} (gid {other_gid})"
        )),
        "{stderr}"
    );

    // `status` warns that a governed user is in the admin group, and that keep_groups lists it.
    let report = topo.status_while_stopped();
    let warnings = report["warnings"].to_string();
    assert!(
        warnings.contains(&format!(
            "governed user {user} (uid {uid}) is in the admin group"
        )),
        "{report}"
    );
    assert!(
        warnings.contains("run.keep_groups lists the admin group"),
        "{report}"
    );
    let out = topo.output(Side::Host, topo.bulkhead(&["status"]));
    assert!(
        text(&out.stdout).contains(&format!("warning:     governed user {user}")),
        "{out:?}"
    );
}

/// `sh -c 'echo $$; cut -d" " -f6 /proc/$$/stat'` prints the shell's pid and its session id.
const PID_AND_SESSION: &str = "echo $$; cut -d' ' -f6 /proc/$$/stat";

fn pid_and_session(out: &Output) -> (String, String) {
    let stdout = text(&out.stdout);
    let mut lines = stdout.lines().map(|l| l.trim().to_string());
    match (lines.next(), lines.next()) {
        (Some(pid), Some(sid)) => (pid, sid),
        _ => panic!("no pid and session: {out:?}"),
    }
}

#[test]
fn a_command_gets_a_session_of_its_own_unless_the_terminal_is_its_users() {
    require_root();
    let topo = Topology::new("");
    // No terminal: a new session, whose leader is the command.
    let out = run(
        &topo,
        &["--user", "nobody", "--", "/bin/sh", "-c", PID_AND_SESSION],
    );
    let (pid, sid) = pid_and_session(&out);
    assert_eq!(pid, sid, "the command leads a new session: {out:?}");

    // Started as a process group leader (a shell's job): setsid needs a child; bulkhead run
    // waits for it and passes on its exit status.
    let mut cmd = topo.bulkhead(&["run", "--user", "nobody", "--", "/bin/sh", "-c"]);
    cmd.arg(format!("{PID_AND_SESSION}; exit 7"));
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    let out = topo.output(Side::Host, cmd);
    let (pid, sid) = pid_and_session(&out);
    assert_eq!(pid, sid, "{out:?}");
    assert_eq!(out.status.code(), Some(7), "{out:?}");

    // In a terminal (script(1) makes one, owned by root and led by root's shell): kept when the
    // command runs as that terminal's user, not when it runs as another user, unless asked.
    let script_file = topo.dir.join("pid-and-session.sh");
    std::fs::write(&script_file, PID_AND_SESSION).expect("script");
    let in_terminal = |args: &str| {
        let bulkhead = format!(
            "{} --config {} run {args} -- /bin/sh {}",
            topo.dir.join("bulkhead").display(),
            topo.config_path.display(),
            script_file.display()
        );
        let mut script = Command::new("script");
        script
            .args(["-q", "-e", "-c"])
            .arg(format!("/bin/sh -c '{bulkhead}; true'"))
            .arg("/dev/null")
            .env("SHELL", "/bin/sh")
            .env_remove("SUDO_UID");
        let out = topo.output(Side::Host, script);
        let stdout = text(&out.stdout);
        let numbers: Vec<&str> = stdout
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && l.bytes().all(|b| b.is_ascii_digit()))
            .collect();
        assert_eq!(numbers.len(), 2, "pid and session in {out:?}");
        (numbers[0] == numbers[1], stdout)
    };
    let (new_session, stdout) = in_terminal("--allow-root");
    assert!(
        !new_session,
        "root's own terminal is kept for root: {stdout}"
    );
    let (new_session, stdout) = in_terminal("--user nobody");
    assert!(new_session, "another user's terminal is not: {stdout}");
    assert!(
        stdout.contains("another user's process"),
        "says why: {stdout}"
    );
    let (new_session, stdout) = in_terminal("--user nobody --keep-tty");
    assert!(!new_session, "--keep-tty keeps it: {stdout}");
    let (new_session, stdout) = in_terminal("--allow-root --new-session");
    assert!(new_session, "--new-session: {stdout}");
}

/// Target `build-host` (the echo server at `TARGET_V4:7000`) whose connections need approval.
const HELD: &str =
    "[[target]]\nname = \"build-host\"\naddresses = [\"10.201.0.2:7000\"]\nprotocol = \"tcp\"\n";
const HELD_POLICY: &str = r#"
[[target]]
name = "build-host"
default = "deny"

[[rule]]
id = "ask-first"
verdict = "approve"
target = { name = ["build-host"] }
"#;

/// A cgroup beside the topology's (never inside it), removed when dropped.
struct OutsideCgroup(PathBuf);

impl Drop for OutsideCgroup {
    fn drop(&mut self) {
        if let Ok(procs) = std::fs::read_to_string(self.0.join("cgroup.procs")) {
            for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
                // SAFETY: a process in the cgroup this test created, started by this test.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                }
            }
        }
        for _ in 0..100 {
            if std::fs::remove_dir(&self.0).is_ok() || !self.0.exists() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// The approval events of the session of pending request `pending`: (state, `by_uid`, reason).
fn approval_events(topo: &Topology, pending: &Value) -> Vec<(Value, Value, Value)> {
    topo.events(&pending["session"])
        .iter()
        .filter(|e| e["type"] == "approval")
        .map(|e| (e["state"].clone(), e["by_uid"].clone(), e["reason"].clone()))
        .collect()
}

#[test]
#[expect(
    clippy::too_many_lines,
    reason = "one held request through each kind of approver, in order"
)]
fn a_held_request_is_approved_neither_by_its_own_user_nor_from_the_governed_side() {
    require_root();
    let topo = Topology::new("");
    let mut acc = accounts();
    let admin = unique("bhapadm");
    let admin_gid = acc.group(&admin);
    let agent = unique("bhagent");
    // The governed user is (wrongly) in the admin group. Root is governed too, so that a
    // root process in the cgroup (steps 2 and 3) is a governed one: with a uid filter, only
    // the listed uids in the cgroup are governed.
    let (agent_uid, _) = acc.user(&agent, &[&admin]);
    configure(&topo, &admin, &format!("uids = [{agent_uid}, 0]\n{HELD}"));
    topo.policy("held.toml", HELD_POLICY);
    let _echo = topo.echo_server(
        Side::Target,
        format!("{TARGET_V4}:7000").parse().expect("addr"),
    );
    let mut daemon = topo.start_daemon(&[]);
    // The daemon warns at start, in its log and in `status`.
    let status = topo.run_cli(&["status", "--json"]).expect("status");
    assert!(
        status["daemon"]["warnings"].to_string().contains(&format!(
            "governed user {agent} (uid {agent_uid}) is in the admin group"
        )),
        "{status}"
    );
    let log = format!("{}{}", daemon.drain_lines().join("\n"), daemon.stderr());
    assert!(log.contains("is in the admin group"), "{log}");

    // The agent's governed connection waits for approval.
    let mut connect = Command::new(topo.probe());
    connect.args(["connect", &format!("{TARGET_V4}:7000"), "held"]);
    let mut client: Proc = topo.spawn_as(
        Side::Governed,
        Some((agent_uid, admin_gid)),
        "client",
        connect,
    );
    let pending = topo.first_pending();
    let id = pending["id"].to_string();
    assert_eq!(pending["identity"]["uid"], agent_uid, "{pending}");

    // 1. The agent's own uid, from a process outside the governed cgroup, in the admin group
    //    (its primary group here): the socket lets it in, the approval is refused.
    let out = topo.output_as(
        Side::Host,
        Some((agent_uid, admin_gid)),
        topo.bulkhead(&["approvals", "approve", &id, "--reason", "mine"]),
    );
    assert!(!out.status.success(), "self-approval refused: {out:?}");
    assert!(
        text(&out.stderr).contains("is the user whose process made this request"),
        "{out:?}"
    );

    // 2. From inside the governed cgroup, even as root.
    let mut inside = topo.bulkhead(&["approvals", "approve", &id]);
    inside.env_remove("SUDO_UID");
    let out = topo.output(Side::Governed, inside);
    assert!(!out.status.success(), "{out:?}");
    assert!(
        text(&out.stderr).contains("runs in the governed cgroup"),
        "{out:?}"
    );

    // 3. From a root process outside the cgroup whose parent is governed (a governed root
    //    process moved its child out before asking).
    let outside = OutsideCgroup(
        bulkhead_tests::cgroup2_mount().join(format!("bulkhead-test-{}-outside", topo.id)),
    );
    std::fs::create_dir_all(&outside.0).expect("outside cgroup");
    let approve = format!(
        "{} --config {} approvals approve {id}",
        topo.dir.join("bulkhead").display(),
        topo.config_path.display()
    );
    let inner = format!(
        "echo $$ > {}/cgroup.procs && exec {approve}",
        outside.0.display()
    );
    let mut escape = Command::new("/bin/sh");
    escape
        .arg("-c")
        .arg(format!("/bin/sh -c '{inner}'; echo parent-done"))
        .env_remove("SUDO_UID");
    let out = topo.output(Side::Governed, escape);
    assert!(text(&out.stdout).contains("parent-done"), "{out:?}");
    assert!(
        text(&out.stderr).contains("descends from process")
            && text(&out.stderr).contains("which runs in the governed cgroup"),
        "refused: {out:?}"
    );
    assert!(
        client.child.try_wait().expect("wait").is_none(),
        "still held after three refusals"
    );

    // Each attempt is on the record, in the request's session; none approved it.
    let events = approval_events(&topo, &pending);
    let refused: Vec<_> = events
        .iter()
        .filter(|(state, _, _)| state == "approver_refused")
        .collect();
    assert_eq!(refused.len(), 3, "{events:?}");
    assert_eq!(refused[0].1, agent_uid, "{events:?}");
    assert!(
        refused[1]
            .2
            .to_string()
            .contains("runs in the governed cgroup"),
        "{events:?}"
    );
    assert!(
        refused[2].2.to_string().contains("descends from process"),
        "{events:?}"
    );
    assert!(
        !events.iter().any(|(state, _, _)| state == "approved"),
        "{events:?}"
    );

    // 4. An admin (root, outside the cgroup, not the requester) approves it: it goes through.
    let out = topo.output(
        Side::Host,
        topo.bulkhead(&["approvals", "approve", &id, "--reason", "checked"]),
    );
    assert!(out.status.success(), "{out:?}");
    client.wait();
    let line = client
        .line(Duration::from_secs(5))
        .unwrap_or_else(|| panic!("the probe printed nothing: {}", client.stderr()));
    let probe: Value = serde_json::from_str(&line).expect("probe JSON");
    assert_eq!(reply(&probe)["data"], "held", "{probe}");
    let events = approval_events(&topo, &pending);
    assert_eq!(
        events.last().map(|e| (&e.0, &e.1)),
        Some((&Value::from("approved"), &Value::from(0))),
        "{events:?}"
    );
    drop(outside);
}
