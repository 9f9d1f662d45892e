//! The session record and the admin CLI against a real daemon: events, filters, export,
//! tail, who may use the control socket, durability across `kill -9`, and retention.

use std::{
    process::Command,
    time::{Duration, Instant},
};

use bulkhead::record::{EventKind, NewSession, SessionEnd, SessionStore as _, SledStore};
use bulkhead_tests::{require_root, Side, Topology, TARGET_V4};
use serde_json::Value;

const ECHO: &str = "[[target]]\nname = \"echo\"\naddresses = [\"10.201.0.2:7000\"]\n";

fn governed_connect(topo: &Topology, addr: &str, user: Option<(u32, u32)>) -> Value {
    let mut cmd = Command::new(topo.probe());
    cmd.args(["connect", addr, "payload"]);
    let out = topo.output_as(Side::Governed, user, cmd);
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.lines().last().unwrap_or_default())
        .unwrap_or_else(|e| panic!("{stdout:?}: {e}"))
}

fn ids(v: &Value) -> Vec<u64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_u64().unwrap())
        .collect()
}

/// Waits until `n` sessions are recorded and closed.
fn wait_closed_sessions(topo: &Topology, n: usize) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = topo.sessions();
        if s.len() >= n && s.iter().all(|x| x["outcome"]["kind"] != "open") {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "wanted {n} closed sessions: {s:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn sessions_carry_their_events_and_filters_select_them() {
    require_root();
    let topo = Topology::new(&format!("[capture]\nunmatched = \"refuse\"\n{ECHO}"));
    topo.allow_opaque_tcp();
    let _echo = topo.echo_server(Side::Target, format!("{TARGET_V4}:7000").parse().unwrap());
    let _daemon = topo.start_daemon(&[]);

    let as_root = governed_connect(&topo, &format!("{TARGET_V4}:7000"), None);
    let as_nobody = governed_connect(&topo, &format!("{TARGET_V4}:7000"), Some((65534, 65534)));
    let refused = governed_connect(&topo, &format!("{TARGET_V4}:7001"), None);
    assert!(
        refused["reply"] == "" || refused["error"].is_string(),
        "{refused}"
    );
    let all = wait_closed_sessions(&topo, 3);
    let all_ids = ids(&Value::Array(all.clone()));
    assert!(
        all_ids.windows(2).all(|w| w[0] > w[1]),
        "newest first: {all_ids:?}"
    );

    let list = |args: &[&str]| {
        let mut a = vec!["sessions", "list", "--json"];
        a.extend_from_slice(args);
        ids(&topo.run_cli(&a).unwrap())
    };
    let by_pid = |pid: &Value| {
        all.iter()
            .find(|s| s["identity"]["pid"] == *pid)
            .map(|s| s["id"].as_u64().unwrap())
            .unwrap()
    };
    let (root_id, nobody_id, refused_id) = (
        by_pid(&as_root["pid"]),
        by_pid(&as_nobody["pid"]),
        by_pid(&refused["pid"]),
    );

    assert_eq!(list(&["--target", "echo"]), vec![nobody_id, root_id]);
    assert_eq!(list(&["--uid", "65534"]), vec![nobody_id]);
    assert_eq!(list(&["--verdict", "denied"]), vec![refused_id]);
    assert_eq!(list(&["--process", "bh-probe"]).len(), 3);
    assert_eq!(list(&["--protocol", "tcp"]).len(), 3);
    assert!(list(&["--protocol", "ssh"]).is_empty());
    assert_eq!(list(&["--since", "1h"]).len(), 3);
    assert!(list(&["--since", "2099-01-01T00:00:00Z"]).is_empty());
    assert_eq!(list(&["--limit", "1"]), vec![all_ids[0]]);

    let shown = topo
        .run_cli(&["sessions", "show", &root_id.to_string(), "--json"])
        .unwrap();
    let events = shown["events"].as_array().unwrap();
    assert_eq!(events[0]["type"], "connect");
    assert_eq!(events[0]["pid"], as_root["pid"]);
    assert_eq!(events[0]["destination"], format!("{TARGET_V4}:7000"));
    // The connection's decision, before any byte moved.
    assert_eq!(events[1]["type"], "request");
    assert_eq!(events[1]["class"], "connect");
    assert_eq!(events[1]["text"], format!("connect {TARGET_V4}:7000"));
    assert_eq!(events[1]["verdict"], "allow");
    assert_eq!(
        events[1]["rules"],
        serde_json::json!(["target:echo:default"])
    );
    assert_eq!(events[2]["type"], "close");
    assert_eq!(events[2]["outcome"]["kind"], "closed");
    assert_eq!(events[2]["bytes_to_target"], 7);
    assert_eq!(events.len(), 3, "{events:?}");

    // The human forms work too.
    let out = topo.output(
        Side::Host,
        topo.bulkhead(&["sessions", "show", &refused_id.to_string()]),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("refused")
            && text.contains("matches no configured target")
            && text.contains("timeline:"),
        "{text}"
    );
    let out = topo.output(Side::Host, topo.bulkhead(&["sessions", "show", "424242"]));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no session with id 424242"));
    let out = topo.output(
        Side::Host,
        topo.bulkhead(&["sessions", "replay", &root_id.to_string(), "--speed", "100"]),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("connect") && text.contains("close"), "{text}");
}

#[test]
fn export_round_trips_as_json_lines_with_the_daemon_running_and_stopped() {
    require_root();
    let topo = Topology::new(ECHO);
    topo.allow_opaque_tcp();
    let _echo = topo.echo_server(Side::Target, format!("{TARGET_V4}:7000").parse().unwrap());
    let mut daemon = topo.start_daemon(&[]);
    for _ in 0..3 {
        governed_connect(&topo, &format!("{TARGET_V4}:7000"), None);
    }
    let sessions = wait_closed_sessions(&topo, 3);

    let export = |args: &[&str]| -> Vec<Value> {
        let mut a = vec!["sessions", "export"];
        a.extend_from_slice(args);
        let out = topo.output(Side::Host, topo.bulkhead(&a));
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l:?}: {e}")))
            .collect()
    };
    let all = export(&["--since", "1h"]);
    assert_eq!(
        all.len(),
        9,
        "connect, the connection's decision and close for each session"
    );
    assert!(all.iter().all(|e| e["v"] == 1
        && e["session"].is_u64()
        && e["at_us"].is_u64()
        && e["type"].is_string()));
    let event_ids: Vec<u64> = all.iter().map(|e| e["id"].as_u64().unwrap()).collect();
    assert!(
        event_ids.windows(2).all(|w| w[0] < w[1]),
        "oldest first: {event_ids:?}"
    );
    let one = sessions[0]["id"].to_string();
    let running = export(&["--session", &one]);
    let shown = topo.run_cli(&["sessions", "show", &one, "--json"]).unwrap();
    assert_eq!(
        Value::Array(running.clone()),
        shown["events"],
        "export equals show"
    );
    assert!(export(&["--until", "2000-01-01T00:00:00Z"]).is_empty());

    daemon.terminate();
    let stopped = export(&["--session", &one]);
    assert_eq!(
        stopped, running,
        "the store read directly gives the same lines"
    );
    assert_eq!(export(&["--since", "1h"]).len(), 9);
}

#[test]
fn tail_follows_new_events() {
    require_root();
    let topo = Topology::new(ECHO);
    topo.allow_opaque_tcp();
    let _echo = topo.echo_server(Side::Target, format!("{TARGET_V4}:7000").parse().unwrap());
    let _daemon = topo.start_daemon(&[]);
    let mut tail = topo.spawn(
        Side::Host,
        "tail",
        topo.bulkhead(&["sessions", "tail", "--json"]),
    );
    // The tail is subscribed once its first answer is in; give it a moment.
    std::thread::sleep(Duration::from_millis(300));
    let client = governed_connect(&topo, &format!("{TARGET_V4}:7000"), None);
    let mut seen = Vec::new();
    while seen.len() < 3 {
        let line = tail
            .line(Duration::from_secs(5))
            .unwrap_or_else(|| panic!("tail printed {seen:?}; stderr {}", tail.stderr()));
        let e: Value = serde_json::from_str(&line).unwrap();
        seen.push(e);
    }
    assert_eq!(seen[0]["type"], "connect");
    assert_eq!(seen[0]["pid"], client["pid"]);
    assert_eq!(seen[1]["type"], "request");
    assert_eq!(seen[2]["type"], "close");
    assert!(
        seen.iter().all(|e| e["session"] == seen[0]["session"]),
        "{seen:?}"
    );
}

#[test]
fn the_control_socket_admits_admins_outside_the_governed_cgroup_only() {
    require_root();
    // `nogroup` plays the admin group, so the test needs no group of its own.
    let topo = Topology::new("");
    let mut text = std::fs::read_to_string(&topo.config_path).unwrap();
    text = text.replace("[governed]", "admin_group = \"nogroup\"\n[governed]");
    std::fs::write(&topo.config_path, text).unwrap();
    // A loaded policy, so `status` answers 0 (it answers 3 while no policy loads).
    topo.allow_opaque_tcp();
    let _daemon = topo.start_daemon(&[]);

    let status_as = |side: Side, user: Option<(u32, u32)>| {
        topo.output_as(side, user, topo.bulkhead(&["status", "--json"]))
    };

    let member = status_as(Side::Host, Some((65534, 65534)));
    assert!(
        member.status.success(),
        "a member of the admin group: {}",
        String::from_utf8_lossy(&member.stderr)
    );
    let v: Value = serde_json::from_slice(&member.stdout).unwrap();
    assert!(v["daemon"].is_object());

    let outsider = status_as(Side::Host, Some((65534, 4242)));
    assert!(!outsider.status.success());
    let err = String::from_utf8_lossy(&outsider.stderr);
    assert!(
        err.contains("permission denied") && err.contains("`nogroup`"),
        "{err}"
    );
    // Nor may the outsider read the record directly.
    let list = topo.output_as(
        Side::Host,
        Some((65534, 4242)),
        topo.bulkhead(&["sessions", "list"]),
    );
    assert!(
        !list.status.success(),
        "{}",
        String::from_utf8_lossy(&list.stdout)
    );

    for user in [None, Some((65534, 65534))] {
        let governed = status_as(Side::Governed, user);
        assert!(
            !governed.status.success(),
            "a governed process ({user:?}) was let in"
        );
        let err = String::from_utf8_lossy(&governed.stderr);
        assert!(err.contains("governed cgroup"), "{user:?}: {err}");
    }
}

#[test]
fn events_older_than_the_flush_interval_survive_kill_9() {
    require_root();
    let topo = Topology::new(ECHO);
    topo.allow_opaque_tcp();
    let _echo = topo.echo_server(Side::Target, format!("{TARGET_V4}:7000").parse().unwrap());
    let mut daemon = topo.start_daemon(&[]);
    for _ in 0..10 {
        governed_connect(&topo, &format!("{TARGET_V4}:7000"), None);
    }
    let before = wait_closed_sessions(&topo, 10);
    // The store flushes every 100 ms; wait past that, then kill without warning.
    std::thread::sleep(Duration::from_millis(300));
    daemon.kill9();
    let after = topo.sessions();
    assert_eq!(
        after, before,
        "every session, as it was, read from the store after kill -9"
    );
    let out = topo.output(
        Side::Host,
        topo.bulkhead(&["sessions", "export", "--since", "1h"]),
    );
    // Connect, the connection's decision and close, for each of the ten.
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 30);
}

#[test]
fn retention_prunes_oldest_sessions_by_size_and_by_age() {
    require_root();
    let by_size = Topology::new(&format!(
        "[store]\nmax_size = \"6KiB\"\nmax_age = \"\"\nprune_interval = \"200ms\"\n{ECHO}"
    ));
    by_size.allow_opaque_tcp();
    let _echo = by_size.echo_server(Side::Target, format!("{TARGET_V4}:7000").parse().unwrap());
    let _daemon = by_size.start_daemon(&[]);
    let mut pids = Vec::new();
    for _ in 0..20 {
        pids.push(governed_connect(&by_size, &format!("{TARGET_V4}:7000"), None)["pid"].clone());
    }
    std::thread::sleep(Duration::from_millis(800));
    let status = by_size.run_cli(&["status", "--json"]).unwrap();
    assert!(
        status["store"]["recorded_bytes"].as_u64().unwrap() <= 6 * 1024,
        "{status}"
    );
    let left = by_size.sessions();
    assert!(
        !left.is_empty() && left.len() < 20,
        "{} sessions left",
        left.len()
    );
    assert_eq!(
        left[0]["identity"]["pid"],
        *pids.last().unwrap(),
        "the newest stays"
    );
    let left_pids: Vec<&Value> = left.iter().map(|s| &s["identity"]["pid"]).collect();
    assert!(!left_pids.contains(&&pids[0]), "the oldest went first");

    let by_age = Topology::new(&format!(
        "[store]\nmax_age = \"1s\"\nprune_interval = \"200ms\"\n{ECHO}"
    ));
    by_age.allow_opaque_tcp();
    let _echo = by_age.echo_server(Side::Target, format!("{TARGET_V4}:7000").parse().unwrap());
    let _daemon = by_age.start_daemon(&[]);
    governed_connect(&by_age, &format!("{TARGET_V4}:7000"), None);
    wait_closed_sessions(&by_age, 1);
    std::thread::sleep(Duration::from_millis(1800));
    assert!(
        by_age.sessions().is_empty(),
        "a session older than max_age was kept"
    );
    governed_connect(&by_age, &format!("{TARGET_V4}:7000"), None);
    assert_eq!(wait_closed_sessions(&by_age, 1).len(), 1);
}

#[test]
fn terminal_sessions_export_as_asciicast_that_asciinema_plays() {
    // Terminal events come from the SSH gateway; here they are written through the store's
    // own API, and the CLI reads the store of a daemon that is not running.
    let dir = std::env::temp_dir().join(format!("bulkhead-asciicast-{}", std::process::id()));
    let state = dir.join("state");
    std::fs::create_dir_all(&state).unwrap();
    let config = dir.join("bulkhead.toml");
    std::fs::write(
        &config,
        format!(
            "[daemon]\nstate_dir = \"{}\"\nrun_dir = \"{}\"\n",
            state.display(),
            dir.join("run").display()
        ),
    )
    .unwrap();
    let id;
    {
        let store = SledStore::open(&state.join("sessions.sled")).unwrap();
        id = store
            .open(NewSession {
                started_at_us: bulkhead::record::now_micros(),
                client: bulkhead::net::ClientAddr("127.0.0.1:40000".parse().unwrap()),
                destination: bulkhead::net::OrigDstAddr("10.201.0.2:22".parse().unwrap()),
                target: Some("bastion".into()),
                protocol: bulkhead::protocol::Protocol::Ssh,
                identity: bulkhead::identity::ProcessIdentity::default(),
            })
            .unwrap();
        for chunk in ["$ ls\r\n", "README.md  src\r\n", "$ exit\r\n"] {
            store
                .append(id, EventKind::TerminalOutput { data: chunk.into() })
                .unwrap();
            std::thread::sleep(Duration::from_millis(20));
        }
        store
            .close(
                id,
                SessionEnd {
                    ended_at_us: bulkhead::record::now_micros(),
                    bytes_to_target: 0,
                    bytes_from_target: 0,
                    outcome: bulkhead::record::Outcome::Closed,
                },
            )
            .unwrap();
        store.flush().unwrap();
    }
    let cast = dir.join("session.cast");
    let out = Command::new(bulkhead_tests::bulkhead_bin())
        .arg("--config")
        .arg(&config)
        .args([
            "sessions",
            "export",
            "--session",
            &id.to_string(),
            "--format",
            "asciicast",
            "-o",
        ])
        .arg(&cast)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&cast).unwrap();
    let header: Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    assert_eq!(header["version"], 2);
    let frames: Vec<Value> = text
        .lines()
        .skip(1)
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(frames.len(), 3);
    assert!(
        frames
            .windows(2)
            .all(|w| w[0][0].as_f64() < w[1][0].as_f64()),
        "timed: {frames:?}"
    );

    // `asciinema cat` insists on a terminal: give it one with script(1). The pty turns "\n"
    // into "\r\n", so compare without carriage returns.
    let played = Command::new("script")
        .args([
            "-qec",
            &format!("asciinema cat {}", cast.display()),
            "/dev/null",
        ])
        .output()
        .expect("script (util-linux) and asciinema (installed by scripts/setup.sh)");
    assert!(
        played.status.success(),
        "{}{}",
        String::from_utf8_lossy(&played.stdout),
        String::from_utf8_lossy(&played.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&played.stdout).replace('\r', ""),
        "$ ls\nREADME.md  src\n$ exit\n"
    );

    // Replay prints the same output, paced.
    let replay = Command::new(bulkhead_tests::bulkhead_bin())
        .arg("--config")
        .arg(&config)
        .args(["sessions", "replay", &id.to_string(), "--speed", "10"])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&replay.stdout),
        "$ ls\r\nREADME.md  src\r\n$ exit\r\n"
    );

    // A session without terminal output is refused as asciicast, with a hint.
    let plain;
    {
        let store =
            SledStore::open_waiting(&state.join("sessions.sled"), Duration::from_secs(5)).unwrap();
        plain = store
            .open(NewSession {
                started_at_us: bulkhead::record::now_micros(),
                client: bulkhead::net::ClientAddr("127.0.0.1:40001".parse().unwrap()),
                destination: bulkhead::net::OrigDstAddr("10.201.0.2:5432".parse().unwrap()),
                target: None,
                protocol: bulkhead::protocol::Protocol::Tcp,
                identity: bulkhead::identity::ProcessIdentity::default(),
            })
            .unwrap();
        store.flush().unwrap();
    }
    let out = Command::new(bulkhead_tests::bulkhead_bin())
        .arg("--config")
        .arg(&config)
        .args([
            "sessions",
            "export",
            "--session",
            &plain.to_string(),
            "--format",
            "asciicast",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--format jsonl"));
    let _ = std::fs::remove_dir_all(&dir);
}

/// The next `n` JSON events a follower prints.
fn next_events(tail: &mut bulkhead_tests::Proc, n: usize) -> Vec<Value> {
    (0..n)
        .map(|_| {
            let line = tail
                .line(Duration::from_secs(10))
                .unwrap_or_else(|| panic!("tail printed nothing more; stderr {}", tail.stderr()));
            serde_json::from_str(&line).unwrap()
        })
        .collect()
}

#[test]
fn tail_shows_the_history_since_and_follows_across_a_daemon_restart() {
    require_root();
    let topo = Topology::new(ECHO);
    topo.allow_opaque_tcp();
    let _echo = topo.echo_server(Side::Target, format!("{TARGET_V4}:7000").parse().unwrap());
    let mut daemon = topo.start_daemon(&[]);
    let before = governed_connect(&topo, &format!("{TARGET_V4}:7000"), None);
    wait_closed_sessions(&topo, 1);

    // --since: the recorded session first.
    let mut tail = topo.spawn(
        Side::Host,
        "tail",
        topo.bulkhead(&["sessions", "tail", "--since", "10m", "--json"]),
    );
    let history = next_events(&mut tail, 3);
    assert_eq!(history[0]["type"], "connect", "{history:?}");
    assert_eq!(history[0]["pid"], before["pid"]);
    assert_eq!(history[2]["type"], "close");

    // The daemon restarts: the tail says so, waits, and goes on with the new daemon's events.
    daemon.terminate();
    let mut daemon = topo.start_daemon(&[]);
    let after = governed_connect(&topo, &format!("{TARGET_V4}:7000"), None);
    let mut events = next_events(&mut tail, 3);
    // Sessions the restart marked interrupted are none here; only the new session's events.
    events.retain(|e| e["session"] != history[0]["session"]);
    assert_eq!(events.len(), 3, "an event was shown twice: {events:?}");
    assert_eq!(events[0]["type"], "connect");
    assert_eq!(events[0]["pid"], after["pid"]);
    assert!(
        tail.stderr().contains("the daemon went away") && tail.stderr().contains("reconnected"),
        "{}",
        tail.stderr()
    );
    daemon.terminate();
}

/// `2026-12-01T05:40:12Z` (`millis`: `2026-12-01T05:40:12.345Z`) at the start of `text`.
fn starts_with_rfc3339(text: &str, millis: bool) -> bool {
    let b = text.as_bytes();
    let digits = |r: std::ops::Range<usize>| {
        r.into_iter()
            .all(|i| b.get(i).is_some_and(u8::is_ascii_digit))
    };
    let at = |i: usize, c: u8| b.get(i) == Some(&c);
    let date_time = digits(0..4)
        && at(4, b'-')
        && digits(5..7)
        && at(7, b'-')
        && digits(8..10)
        && at(10, b'T')
        && digits(11..13)
        && at(13, b':')
        && digits(14..16)
        && at(16, b':')
        && digits(17..19);
    date_time
        && if millis {
            at(19, b'.') && digits(20..23) && at(23, b'Z')
        } else {
            at(19, b'Z')
        }
}

/// The text views (`sessions list`, `show`, `tail`) print times as RFC 3339 UTC and say why a
/// session was refused; `--since`/`--until` take RFC 3339 times and durations ago. A target
/// that refuses the connection (a closed port) is recorded `refused` with its reason, not as
/// a denial, and the tool sees a reset.
#[test]
fn text_views_show_rfc3339_times_and_why_sessions_were_refused() {
    require_root();
    let topo = Topology::new(&format!(
        "[capture]\nunmatched = \"refuse\"\n{ECHO}\
         [[target]]\nname = \"closed\"\naddresses = [\"10.201.0.2:7002\"]\n"
    ));
    topo.allow_opaque_tcp();
    let _echo = topo.echo_server(Side::Target, format!("{TARGET_V4}:7000").parse().unwrap());
    let _daemon = topo.start_daemon(&[]);

    let ok = governed_connect(&topo, &format!("{TARGET_V4}:7000"), None);
    assert_eq!(bulkhead_tests::reply(&ok)["data"], "payload", "{ok}");
    let unmatched = governed_connect(&topo, &format!("{TARGET_V4}:7001"), None);
    // Nothing listens on 7002: the target refuses. The tool's connect succeeded (the gateway
    // accepted it); what it sees is a reset, not an empty answer.
    let closed = governed_connect(&topo, &format!("{TARGET_V4}:7002"), None);
    assert_eq!(closed["kind"], "ConnectionReset", "{closed}");
    let all = wait_closed_sessions(&topo, 3);
    let id_of = |probe: &Value| {
        all.iter()
            .find(|s| s["identity"]["pid"] == probe["pid"])
            .and_then(|s| s["id"].as_u64())
            .unwrap_or_else(|| panic!("no session of {probe}: {all:?}"))
    };
    let (ok_id, unmatched_id, closed_id) = (id_of(&ok), id_of(&unmatched), id_of(&closed));
    let closed_session = all.iter().find(|s| s["id"] == closed_id).unwrap();
    assert_eq!(
        closed_session["outcome"]["kind"], "target_refused",
        "{closed_session}"
    );
    assert!(
        closed_session["outcome"]["reason"]
            .as_str()
            .unwrap()
            .contains("10.201.0.2:7002 refused the connection"),
        "{closed_session}"
    );

    let text = |args: &[&str]| {
        let out = topo.output(Side::Host, topo.bulkhead(args));
        assert!(out.status.success(), "bulkhead {args:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let list = text(&["sessions", "list"]);
    let row = |id: u64| {
        list.lines()
            .find(|l| l.trim_start().starts_with(&format!("{id} ")))
            .unwrap_or_else(|| panic!("no row for session {id}:\n{list}"))
            .to_string()
    };
    for id in [ok_id, unmatched_id, closed_id] {
        let row = row(id);
        let started = row.trim_start()[id.to_string().len()..].trim_start();
        assert!(starts_with_rfc3339(started, false), "{row}");
    }
    assert!(row(ok_id).ends_with("closed"), "{list}");
    assert!(
        row(unmatched_id).contains("refused")
            && row(unmatched_id).contains("matches no configured target"),
        "{list}"
    );
    assert!(
        row(closed_id).contains("refused: 10.201.0.2:7002 refused the connection"),
        "{list}"
    );
    let shown = text(&["sessions", "show", &closed_id.to_string()]);
    assert!(
        shown.contains("reason:      10.201.0.2:7002 refused the connection"),
        "{shown}"
    );
    let started = shown
        .lines()
        .find_map(|l| l.strip_prefix("  started:     "))
        .unwrap_or_else(|| panic!("{shown}"));
    assert!(starts_with_rfc3339(started, false), "{shown}");
    assert!(
        shown
            .contains("close       refused (0 up, 0 down): 10.201.0.2:7002 refused the connection"),
        "{shown}"
    );
    // A closed port is not a policy's denial.
    let denied = ids(&topo
        .run_cli(&["sessions", "list", "--json", "--verdict", "denied"])
        .unwrap());
    assert_eq!(denied, vec![unmatched_id]);
    time_filters_take_rfc3339_times_dates_and_durations(&topo);
    tail_lines_start_with_the_time_and_say_why(&topo, closed_id);
}

/// `sessions list --since/--until` over the three sessions of the test above, all started in
/// the last minute.
fn time_filters_take_rfc3339_times_dates_and_durations(topo: &Topology) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let rfc3339 = |secs: u64| {
        let out = Command::new("date")
            .args(["-u", "-d", &format!("@{secs}"), "+%Y-%m-%dT%H:%M:%SZ"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let count = |args: &[&str]| {
        let mut a = vec!["sessions", "list", "--json"];
        a.extend_from_slice(args);
        ids(&topo.run_cli(&a).unwrap()).len()
    };
    let (hour_ago, in_an_hour) = (rfc3339(now - 3600), rfc3339(now + 3600));
    assert_eq!(count(&["--since", &hour_ago, "--until", &in_an_hour]), 3);
    assert_eq!(count(&["--since", "10m", "--until", &in_an_hour]), 3);
    assert_eq!(
        count(&["--until", "10m"]),
        0,
        "nothing started 10 minutes ago"
    );
    assert_eq!(count(&["--until", &hour_ago]), 0);
    assert_eq!(
        count(&["--since", &hour_ago[..10], "--until", "2099-01-01"]),
        3
    );
    let out = topo.output(
        Side::Host,
        topo.bulkhead(&["sessions", "list", "--since", "yesterday"]),
    );
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("2026-11-26T14:00:00Z"),
        "{out:?}"
    );
}

/// `sessions tail --since 10m`: every line starts with the event's time to the millisecond;
/// refusals say why.
fn tail_lines_start_with_the_time_and_say_why(topo: &Topology, closed_id: u64) {
    let mut tail = topo.spawn(
        Side::Host,
        "tail",
        topo.bulkhead(&["sessions", "tail", "--since", "10m"]),
    );
    let mut lines = Vec::new();
    while !lines.iter().any(|l: &String| {
        l.contains(&format!("session {closed_id:>8}")) && l.contains("close     ")
    }) {
        let line = tail
            .line(Duration::from_secs(10))
            .unwrap_or_else(|| panic!("tail stopped: {lines:?} {}", tail.stderr()));
        lines.push(line);
    }
    for l in &lines {
        assert!(starts_with_rfc3339(l, true), "{l}");
    }
    assert!(
        lines.iter().any(
            |l| l.contains("close       refused") && l.contains("matches no configured target")
        ),
        "{lines:?}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.contains("10.201.0.2:7002 refused the connection")),
        "{lines:?}"
    );
}

/// A PostgreSQL target whose port is closed: psql is told in its own protocol (a FATAL), and
/// the session is recorded `refused` with the target's reason, not as a denial.
#[test]
fn a_postgres_target_that_refuses_the_connection_is_recorded_refused() {
    require_root();
    let topo = Topology::new(
        "[[target]]\nname = \"db\"\nprotocol = \"postgres\"\naddresses = [\"10.201.0.2:5499\"]\n\
         [target.postgres]\nauth = [\"none\"]\n",
    );
    topo.policy(
        "db.toml",
        "[[target]]\nname = \"db\"\nprotocol = \"postgres\"\ndefault = \"allow\"\n",
    );
    let _daemon = topo.start_daemon(&[]);
    let mut psql = Command::new("psql");
    psql.args([
        "-X", "-h", TARGET_V4, "-p", "5499", "-U", "app", "-d", "postgres", "-c", "SELECT 1",
    ])
    .env("PGSSLMODE", "disable")
    .env("PGCONNECT_TIMEOUT", "10");
    let out = topo.output(Side::Governed, psql);
    assert!(!out.status.success(), "{out:?}");
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("FATAL"), "{said}");
    let session = topo.wait_session_closed();
    assert_eq!(session["outcome"]["kind"], "target_refused", "{session}");
    assert!(
        session["outcome"]["reason"]
            .as_str()
            .unwrap()
            .starts_with("target db refused the connection"),
        "{session}"
    );
    let out = topo.output(Side::Host, topo.bulkhead(&["sessions", "list"]));
    let list = String::from_utf8_lossy(&out.stdout);
    assert!(
        list.contains("refused: target db refused the connection"),
        "{list}"
    );
}
