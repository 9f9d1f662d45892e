//! Containment: a governed process has no way out but the gateway. UDP goes only to the
//! configured resolvers and allowed destinations; sockets that leave without a `connect()` the
//! gateway sees (raw, packet, ping, SCTP, MPTCP, vsock...) are refused at `socket()`; each
//! refusal is recorded. Real processes in the test's own namespaces and cgroup.

use std::{process::Command, time::Duration};

use bulkhead_tests::{
    parse_probe, require_root, Side, Topology, LISTENER_PORT, TARGET_V4, TARGET_V6,
};

/// A UDP echo server on `addr` in the target namespace (a stand-in resolver or service).
fn udp_echo(topo: &Topology, addr: &str) -> bulkhead_tests::Proc {
    let (host, port) = addr.rsplit_once(':').unwrap();
    let host = host.trim_matches(|c| c == '[' || c == ']');
    let family = if host.contains(':') {
        "AF_INET6"
    } else {
        "AF_INET"
    };
    let mut cmd = Command::new("python3");
    cmd.args([
        "-u",
        "-c",
        &format!(
            "import socket\n\
             s = socket.socket(socket.{family}, socket.SOCK_DGRAM)\n\
             s.bind(('{host}', {port}))\n\
             print('ready', flush=True)\n\
             while True:\n\
             \x20   data, peer = s.recvfrom(2048)\n\
             \x20   s.sendto(b'echo:' + data, peer)\n"
        ),
    ]);
    let mut p = topo.spawn(Side::Target, &format!("udp-echo-{port}"), cmd);
    assert_eq!(
        p.line(Duration::from_secs(10)).as_deref(),
        Some("ready"),
        "udp echo on {addr}: {}",
        p.stderr()
    );
    p
}

/// Runs a Python snippet on `side`; it prints one JSON object.
fn python(topo: &Topology, side: Side, code: &str) -> serde_json::Value {
    let mut cmd = Command::new("python3");
    cmd.args(["-c", &format!("import errno, json, socket\n{code}")]);
    let out = topo.output(side, cmd);
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.trim()).unwrap_or_else(|e| {
        panic!(
            "python on {side:?}: {e}: {text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// Python: `udp(family, host, port, connected)` returns the echo's reply or the errno name.
const UDP_FN: &str = "def udp(family, host, port, connected):\n\
    \x20   s = socket.socket(family, socket.SOCK_DGRAM)\n\
    \x20   s.settimeout(3)\n\
    \x20   try:\n\
    \x20       if connected:\n\
    \x20           s.connect((host, port)); s.send(b'q')\n\
    \x20       else:\n\
    \x20           s.sendto(b'q', (host, port))\n\
    \x20       return s.recv(2048).decode()\n\
    \x20   except OSError as e:\n\
    \x20       return errno.errorcode.get(e.errno, str(e))\n\
    \x20   finally:\n\
    \x20       s.close()\n";

fn wait_for_sessions(
    topo: &Topology,
    want: impl Fn(&[serde_json::Value]) -> bool,
) -> Vec<serde_json::Value> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let sessions = topo.sessions();
        if want(&sessions) || std::time::Instant::now() > deadline {
            return sessions;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn udp_leaves_only_for_the_configured_resolver_and_allowed_destinations_and_refusals_are_recorded()
{
    require_root();
    let topo = Topology::new(&format!(
        "[capture]\ndns = [\"{TARGET_V4}\"]\nudp_allow = [\"{TARGET_V4}/32:7001\"]\n"
    ));
    let _resolver = udp_echo(&topo, &format!("{TARGET_V4}:53"));
    let _allowed = udp_echo(&topo, &format!("{TARGET_V4}:7001"));
    let _other = udp_echo(&topo, &format!("{TARGET_V4}:7002"));
    let _other_resolver = udp_echo(&topo, &format!("[{TARGET_V6}]:53"));
    let _daemon = topo.start_daemon(&[]);

    let code = format!(
        "{UDP_FN}\
         print(json.dumps({{\n\
         'resolver': udp(socket.AF_INET, '{TARGET_V4}', 53, False),\n\
         'resolver_connected': udp(socket.AF_INET, '{TARGET_V4}', 53, True),\n\
         'allowed': udp(socket.AF_INET, '{TARGET_V4}', 7001, False),\n\
         'other': udp(socket.AF_INET, '{TARGET_V4}', 7002, False),\n\
         'other_connected': udp(socket.AF_INET, '{TARGET_V4}', 7002, True),\n\
         'other_resolver': udp(socket.AF_INET6, '{TARGET_V6}', 53, False),\n\
         'mapped_other': udp(socket.AF_INET6, '::ffff:{TARGET_V4}', 7002, False),\n\
         }}))\n"
    );
    let governed = python(&topo, Side::Governed, &code);
    // The resolver's datagrams go through the DNS forwarder, which relays DNS queries only
    // (tests/tests/dns.rs): this one is not.
    assert_eq!(governed["resolver"], "timed out", "{governed}");
    assert_eq!(governed["resolver_connected"], "timed out", "{governed}");
    assert_eq!(governed["allowed"], "echo:q", "{governed}");
    for refused in ["other", "other_connected", "other_resolver", "mapped_other"] {
        assert_eq!(governed[refused], "EPERM", "{refused}: {governed}");
    }
    // Outside the governed cgroup nothing changes.
    let outside = python(&topo, Side::Host, &code);
    for key in ["other", "other_connected", "other_resolver", "mapped_other"] {
        assert!(
            outside[key].as_str().unwrap().starts_with("echo:"),
            "{key}: {outside}"
        );
    }

    // Recorded: one refused udp session per destination, with the attempts counted.
    let sessions = wait_for_sessions(&topo, |s| {
        s.iter()
            .filter(|s| s["protocol"] == "udp" && s["outcome"]["kind"] == "refused")
            .count()
            >= 2
    });
    let udp: Vec<_> = sessions.iter().filter(|s| s["protocol"] == "udp").collect();
    let to_7002 = udp
        .iter()
        .find(|s| s["destination"] == format!("{TARGET_V4}:7002"))
        .unwrap_or_else(|| panic!("no session for {TARGET_V4}:7002: {sessions:?}"));
    assert_eq!(to_7002["outcome"]["kind"], "refused", "{to_7002}");
    let reason = to_7002["outcome"]["reason"].as_str().unwrap();
    assert!(reason.ends_with("refused 3 times"), "{reason}");
    assert_eq!(to_7002["identity"]["comm"], "python3", "{to_7002}");
    assert!(
        udp.iter()
            .any(|s| s["destination"] == format!("[{TARGET_V6}]:53")),
        "the other resolver's refusal: {sessions:?}"
    );
    assert!(
        !udp.iter()
            .any(|s| (s["destination"] == format!("{TARGET_V4}:53")
                || s["destination"] == format!("{TARGET_V4}:7001"))
                && s["outcome"]["kind"] == "refused"),
        "allowed datagrams are not refusals: {sessions:?}"
    );
    let events = topo.events(&to_7002["id"]);
    assert!(
        events.iter().any(|e| e["type"] == "request"
            && e["text"] == format!("udp {TARGET_V4}:7002")
            && e["verdict"] == "deny"),
        "{events:?}"
    );

    let (_, status) = topo.status();
    let udp_line = &status["daemon"]["containment"];
    assert_eq!(udp_line["dns"][0], format!("{TARGET_V4}:53"), "{status}");
}

/// Python: `sock(family, type, proto)` returns "ok" or the errno name.
const SOCK_FN: &str = "def sock(family, type, proto=0):\n\
    \x20   try:\n\
    \x20       socket.socket(family, type, proto).close()\n\
    \x20       return 'ok'\n\
    \x20   except OSError as e:\n\
    \x20       return errno.errorcode.get(e.errno, str(e))\n";

const SOCKETS: &str = "print(json.dumps({\n\
    'tcp': sock(socket.AF_INET, socket.SOCK_STREAM),\n\
    'tcp6': sock(socket.AF_INET6, socket.SOCK_STREAM),\n\
    'udp': sock(socket.AF_INET, socket.SOCK_DGRAM),\n\
    'unix': sock(socket.AF_UNIX, socket.SOCK_STREAM),\n\
    'netlink': sock(socket.AF_NETLINK, socket.SOCK_RAW, 0),\n\
    'raw': sock(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP),\n\
    'raw6': sock(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6),\n\
    'raw_nonblock': sock(socket.AF_INET, socket.SOCK_RAW | socket.SOCK_NONBLOCK, 255),\n\
    'ping': sock(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP),\n\
    'sctp': sock(socket.AF_INET, socket.SOCK_STREAM, 132),\n\
    'sctp_seqpacket': sock(socket.AF_INET, socket.SOCK_SEQPACKET, 132),\n\
    'mptcp': sock(socket.AF_INET, socket.SOCK_STREAM, 262),\n\
    'udplite': sock(socket.AF_INET, socket.SOCK_DGRAM, 136),\n\
    'packet': sock(socket.AF_PACKET, socket.SOCK_RAW, 0),\n\
    'vsock': sock(40, socket.SOCK_STREAM),\n\
}))\n";

/// Lets every group open ICMP echo sockets in the governed namespace (the test's own), so a
/// refused ping socket is the filter's doing, not the sysctl's.
fn allow_ping_sockets(topo: &Topology) {
    bulkhead_tests::sh(
        "ip",
        &[
            "netns",
            "exec",
            &topo.gov_ns,
            "sysctl",
            "-qw",
            "net.ipv4.ping_group_range=0 2147483647",
        ],
    );
}

/// Which filter the daemon attached: the BPF LSM one (every family) or the inet-only one.
fn lsm_filter(topo: &Topology) -> bool {
    let (_, status) = topo.status();
    let filter = status["daemon"]["containment"]["socket_filter"]
        .as_str()
        .unwrap_or_else(|| panic!("{status}"))
        .to_string();
    if filter.starts_with("inet and inet6 only") {
        eprintln!(
            "note: the BPF LSM does not load here ({filter}); packet and vsock sockets are \
             checked only where it does"
        );
        false
    } else {
        assert_eq!(filter, "every address family (BPF LSM)");
        true
    }
}

#[test]
fn sockets_that_leave_without_the_gateway_are_refused_at_creation_and_recorded() {
    require_root();
    let topo = Topology::new("");
    allow_ping_sockets(&topo);
    let _daemon = topo.start_daemon(&[]);
    let code = format!("{SOCK_FN}{SOCKETS}");
    let governed = python(&topo, Side::Governed, &code);
    for ok in ["tcp", "tcp6", "udp", "unix", "netlink"] {
        assert_eq!(governed[ok], "ok", "{ok}: {governed}");
    }
    let mut refused = vec!["raw", "raw6", "raw_nonblock", "ping", "mptcp", "udplite"];
    if lsm_filter(&topo) {
        refused.extend(["packet", "vsock", "sctp", "sctp_seqpacket"]);
    }
    for kind in &refused {
        assert_eq!(governed[kind], "EPERM", "{kind}: {governed}");
    }
    // Without the LSM, SCTP is refused by the inet filter only where the kernel has SCTP (this
    // machine has no modules: EPROTONOSUPPORT everywhere); it is never opened.
    for kind in ["sctp", "sctp_seqpacket"] {
        assert_ne!(governed[kind], "ok", "{kind}: {governed}");
    }
    // The same root process outside the cgroup may open them: the filter is the cgroup's.
    let outside = python(&topo, Side::Host, &code);
    for kind in ["raw", "raw6", "raw_nonblock", "ping", "udplite", "packet"] {
        assert_eq!(outside[kind], "ok", "{kind}: {outside}");
    }

    let sessions = wait_for_sessions(&topo, |s| {
        s.iter().filter(|s| s["protocol"] == "socket").count() >= refused.len()
    });
    let texts: Vec<String> = sessions
        .iter()
        .filter(|s| s["protocol"] == "socket")
        .flat_map(|s| topo.events(&s["id"]))
        .filter(|e| e["type"] == "request")
        .map(|e| e["text"].as_str().unwrap().to_string())
        .collect();
    for want in [
        "socket(AF_INET, SOCK_RAW, 1)",
        "socket(AF_INET6, SOCK_RAW, 58)",
        "socket(AF_INET, SOCK_DGRAM, 1)",
        "socket(AF_INET, SOCK_STREAM, 262)",
    ] {
        assert!(texts.iter().any(|t| t == want), "{want} in {texts:?}");
    }
    // SOCK_NONBLOCK is not a different kind of socket.
    assert!(
        texts.iter().any(|t| t == "socket(AF_INET, SOCK_RAW, 255)"),
        "{texts:?}"
    );
}

#[test]
fn socket_kinds_the_configuration_allows_can_be_opened() {
    require_root();
    let topo = Topology::new("[capture]\nsockets = [\"raw\", \"ping\"]\n");
    allow_ping_sockets(&topo);
    let _daemon = topo.start_daemon(&[]);
    let governed = python(&topo, Side::Governed, &format!("{SOCK_FN}{SOCKETS}"));
    for ok in ["raw", "raw6", "ping"] {
        assert_eq!(governed[ok], "ok", "{ok}: {governed}");
    }
    for refused in ["mptcp", "udplite"] {
        assert_eq!(governed[refused], "EPERM", "{refused}: {governed}");
    }
}

#[test]
fn loopback_services_are_captured_by_default() {
    require_root();
    let topo = Topology::new("");
    // A service next to the tool, on the governed side's loopback (an SSH daemon, a database).
    let mut local = topo.echo_server(Side::Host, "127.0.0.1:7100".parse().unwrap());
    let _daemon = topo.start_daemon(&[]);
    // No policy allows it: refused at the gateway, not reached directly.
    let out = topo.probe_connect(Side::Governed, "127.0.0.1:7100", "local");
    assert!(out["reply"].is_null() || out["reply"] == "", "{out}");
    let session = topo.wait_session_closed();
    assert_eq!(session["destination"], "127.0.0.1:7100", "{session}");
    assert_eq!(session["outcome"]["kind"], "refused", "{session}");
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        local.drain_lines().is_empty(),
        "the local service saw nothing"
    );
}

#[test]
fn the_listener_port_is_privileged_and_no_user_can_take_it_while_the_daemon_is_down() {
    require_root();
    assert!(
        LISTENER_PORT < 1024,
        "the default listener port is privileged"
    );
    let topo = Topology::new("");
    let dst = format!("{TARGET_V4}:7000");
    let mut echo = topo.echo_server(Side::Target, dst.parse().unwrap());
    let mut daemon = topo.start_daemon(&[]);
    daemon.kill9();
    // Another local user tries to take the port and receive the governed connections the
    // pinned programs still send there.
    let mut thief = Command::new(topo.probe());
    thief.args(["serve", &format!("127.0.0.1:{LISTENER_PORT}")]);
    let mut thief = topo.spawn_as(Side::Host, Some((65534, 65534)), "thief", thief);
    let status = thief.wait();
    assert!(!status.success(), "nobody bound the listener port");
    assert!(
        thief.stderr().contains("Permission denied"),
        "{}",
        thief.stderr()
    );
    let out = topo.probe_connect(Side::Governed, &dst, "governed");
    assert_eq!(out["kind"], "ConnectionRefused", "{out}");
    std::thread::sleep(Duration::from_millis(200));
    assert!(echo.drain_lines().is_empty(), "nothing reached the target");
}

#[test]
fn an_unprivileged_listener_port_is_warned_about() {
    require_root();
    let topo = Topology::new("[listener]\nport = 15001\n");
    let _daemon = topo.start_daemon(&[]);
    let (_, status) = topo.status();
    let warnings = status["daemon"]["warnings"].to_string();
    assert!(
        warnings.contains("listener.port 15001 can be bound by any local user"),
        "{status}"
    );
}

#[test]
fn a_connection_queued_when_the_daemon_stops_lends_its_identity_to_nobody() {
    require_root();
    let topo = Topology::new("");
    topo.allow_opaque_tcp();
    let dst = format!("{TARGET_V4}:7000");
    let mut echo = topo.echo_server(Side::Target, dst.parse().unwrap());
    let mut daemon = topo.start_daemon(&[]);
    // The daemon stops accepting: the governed connect completes into the listener's queue,
    // its kernel record waiting for an accept that never comes.
    bulkhead_tests::sh("kill", &["-STOP", &daemon.pid().to_string()]);
    let local = "127.0.0.1:41235";
    let mut cmd = Command::new(topo.probe());
    cmd.args(["connect", &dst, "governed", local]);
    let mut queued = topo.spawn(Side::Governed, "queued", cmd);
    // Until the handshake completed into the listener's queue: the listener's side of the
    // connection exists (the kernel holds the record), whatever state the client moved on to.
    let queued_in_listener = || {
        let mut ss = Command::new("ss");
        ss.args(["-Htn"]);
        let out = topo.output(Side::Host, ss);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .any(|l| l.split_whitespace().nth(4) == Some(local))
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !queued_in_listener() {
        assert!(
            std::time::Instant::now() < deadline,
            "the governed connect never completed into the stopped daemon's queue"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    daemon.kill9();
    let queued = parse_probe(&std::process::Output {
        status: queued.wait(),
        stdout: queued
            .line(Duration::from_secs(5))
            .unwrap_or_default()
            .into_bytes(),
        stderr: Vec::new(),
    });
    assert!(queued["error"].is_string(), "{queued}");

    // Outside the cgroup, straight to the listener, from the queued connection's local address
    // and port: its record must be gone.
    let _daemon = topo.start_daemon(&[]);
    topo.assert_sneak_refused(local, &mut echo);
}

#[test]
fn governed_users_are_governed_wherever_they_run_below_the_cgroup_and_other_uids_are_not() {
    require_root();
    // `governed.users` at the test's own cgroup (the product's default is the hierarchy's
    // root, which tests never touch): it holds the agent's "service" and a root process.
    let topo = Topology::new("users = [\"nobody\"]\n");
    topo.allow_opaque_tcp();
    let dst = format!("{TARGET_V4}:7000");
    let _echo = topo.echo_server(Side::Target, dst.parse().unwrap());
    let _daemon = topo.start_daemon(&[]);
    let (_, status) = topo.status();
    assert_eq!(status["daemon"]["mode"], "fail-closed", "{status}");

    // A service of the agent's user, started outside `bulkhead run` in a cgroup of its own
    // below the governed one (as systemd would start a user service or a cron job).
    let service = topo.cgroup.join("service");
    std::fs::create_dir_all(&service).unwrap();
    let mut cmd = Command::new("sh");
    cmd.args([
        "-c",
        &format!(
            "echo $$ > {}/cgroup.procs && exec setpriv --reuid=65534 --regid=65534 \
             --clear-groups {} connect {dst} from-the-service",
            service.display(),
            topo.probe().display()
        ),
    ]);
    let out = topo.output(Side::Host, cmd);
    let service_client = parse_probe(&out);
    assert!(
        service_client["local"]
            .as_str()
            .is_some_and(|l| l.starts_with("127.0.0.1:")),
        "the service's connection went through the gateway: {service_client}"
    );
    let session = topo.wait_session_of(&service_client["pid"]);
    assert_eq!(session["identity"]["uid"], 65534, "{session}");

    // Root in the same cgroup is not a governed user: direct, unrecorded, its UDP and raw
    // sockets untouched, and it may use the control socket.
    let root_client = topo.probe_connect(Side::Governed, &dst, "root");
    assert!(
        root_client["local"]
            .as_str()
            .is_some_and(|l| l.starts_with(&format!("{}:", bulkhead_tests::GOVERNED_V4))),
        "root went direct: {root_client}"
    );
    let code = format!(
        "{SOCK_FN}{UDP_FN}print(json.dumps({{'raw': sock(socket.AF_INET, socket.SOCK_RAW, 1), \
         'udp': udp(socket.AF_INET, '{TARGET_V4}', 7009, False)}}))\n"
    );
    let root = python(&topo, Side::Governed, &code);
    assert_eq!(root["raw"], "ok", "{root}");
    assert_ne!(root["udp"], "EPERM", "{root}");
    let mut status = topo.bulkhead(&["status", "--json"]);
    status.env("RUST_LOG", "error");
    let out = topo.output(Side::Governed, status);
    assert!(
        out.status.success(),
        "root below the cgroup, not governed, may use the CLI: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The agent's user in the same cgroup: its UDP is decided.
    let nobody = {
        let mut cmd = Command::new("python3");
        cmd.args(["-c", &format!("import errno, json, socket\n{code}")]);
        let out = topo.output_as(Side::Governed, Some((65534, 65534)), cmd);
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    assert_eq!(nobody["udp"], "EPERM", "{nobody}");
}

#[test]
fn bulkhead_run_refuses_other_socket_families_and_io_uring_whatever_the_kernel_filter() {
    require_root();
    let topo = Topology::new("");
    let _daemon = topo.start_daemon(&[]);
    let code = "import ctypes, errno, json, socket\n\
        def sock(family, type, proto=0):\n\
        \x20   try:\n\
        \x20       socket.socket(family, type, proto).close()\n\
        \x20       return 'ok'\n\
        \x20   except OSError as e:\n\
        \x20       return errno.errorcode.get(e.errno, str(e))\n\
        def pair(family):\n\
        \x20   try:\n\
        \x20       a, b = socket.socketpair(family, socket.SOCK_STREAM)\n\
        \x20       a.close(); b.close()\n\
        \x20       return 'ok'\n\
        \x20   except OSError as e:\n\
        \x20       return errno.errorcode.get(e.errno, str(e))\n\
        libc = ctypes.CDLL(None, use_errno=True)\n\
        params = ctypes.create_string_buffer(120)\n\
        fd = libc.syscall(425, 8, params)\n\
        uring = 'ok' if fd >= 0 else errno.errorcode.get(ctypes.get_errno(), '?')\n\
        print(json.dumps({'vsock': sock(40, socket.SOCK_STREAM), 'tcp': sock(socket.AF_INET, \
        socket.SOCK_STREAM), 'unix_pair': pair(socket.AF_UNIX), 'io_uring': uring}))\n";
    let run = |args: &[&str]| {
        let mut cmd = topo.bulkhead(args);
        cmd.args(["python3", "-c", code]);
        let out = topo.output(Side::Host, cmd);
        serde_json::from_slice::<serde_json::Value>(&out.stdout)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)))
    };
    let governed = run(&["run", "--user", "nobody", "--"]);
    assert_eq!(governed["vsock"], "EPERM", "{governed}");
    assert_eq!(governed["io_uring"], "EPERM", "{governed}");
    assert_eq!(governed["tcp"], "ok", "{governed}");
    assert_eq!(governed["unix_pair"], "ok", "{governed}");
    // The same as nobody without `bulkhead run`: both work (the filter is the command's).
    let mut plain = Command::new("python3");
    plain.args(["-c", code]);
    let out = topo.output_as(Side::Host, Some((65534, 65534)), plain);
    let plain: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(plain["vsock"], "ok", "{plain}");
    assert_eq!(plain["io_uring"], "ok", "{plain}");
}

#[test]
fn bulkhead_run_keeps_the_command_from_abstract_unix_sockets_made_outside_it() {
    require_root();
    let topo = Topology::new("");
    let _daemon = topo.start_daemon(&[]);
    // A service outside, listening on an abstract unix socket (as an X server or a session bus
    // does), answering each connection.
    let name = format!("bh-abstract-{}", topo.id);
    let mut listener = Command::new("python3");
    listener.args([
        "-u",
        "-c",
        &format!(
            "import socket\n\
             s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)\n\
             s.bind('\\0{name}')\n\
             s.listen(8)\n\
             print('ready', flush=True)\n\
             while True:\n\
             \x20   c, _ = s.accept()\n\
             \x20   c.sendall(b'served')\n\
             \x20   c.close()\n"
        ),
    ]);
    let mut service = topo.spawn_as(Side::Host, Some((65534, 65534)), "abstract", listener);
    assert_eq!(
        service.line(Duration::from_secs(10)).as_deref(),
        Some("ready"),
        "{}",
        service.stderr()
    );
    let code = format!(
        "import errno, socket\n\
         s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)\n\
         try:\n\
         \x20   s.connect('\\0{name}')\n\
         \x20   print(s.recv(16).decode())\n\
         except OSError as e:\n\
         \x20   print(errno.errorcode.get(e.errno, str(e)))\n"
    );
    let mut governed = topo.bulkhead(&["run", "--user", "nobody", "--"]);
    governed.args(["python3", "-c", &code]);
    let out = topo.output(Side::Host, governed);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "EPERM",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut plain = Command::new("python3");
    plain.args(["-c", &code]);
    let out = topo.output_as(Side::Host, Some((65534, 65534)), plain);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "served");
}

/// A unix stream server at `address` (a path, or `\0name`) that answers "served".
fn unix_server(topo: &Topology, address: &str) -> bulkhead_tests::Proc {
    let mut cmd = Command::new("python3");
    cmd.args([
        "-u",
        "-c",
        &format!(
            "import os, socket\n\
             a = {address:?}.replace('@', '\\0', 1) if {address:?}.startswith('@') else {address:?}\n\
             s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)\n\
             s.bind(a)\n\
             if not a.startswith('\\0'): os.chmod(a, 0o777)\n\
             s.listen(8)\n\
             print('ready', flush=True)\n\
             while True:\n\
             \x20   c, _ = s.accept()\n\
             \x20   c.sendall(b'served')\n\
             \x20   c.close()\n"
        ),
    ]);
    let mut p = topo.spawn(Side::Host, "unix-server", cmd);
    assert_eq!(
        p.line(Duration::from_secs(10)).as_deref(),
        Some("ready"),
        "{}",
        p.stderr()
    );
    p
}

#[test]
fn unix_sockets_reach_only_the_allowed_addresses_and_refusals_are_recorded() {
    require_root();
    let dir = std::env::temp_dir().join(format!("bh-unix-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let allowed = dir.join("allowed.sock");
    let service = dir.join("service.sock");
    let abstract_name = format!("@bh-unix-allowed-{}", std::process::id());
    let topo = Topology::new(&format!(
        "[capture]\nunix_allow = [{:?}, {:?}]\n",
        allowed.display().to_string(),
        abstract_name
    ));
    let _daemon = topo.start_daemon(&[]);
    let (_, status) = topo.status();
    let unix = status["daemon"]["containment"]["unix"]
        .as_str()
        .unwrap()
        .to_string();
    if unix.starts_with("NOT governed") {
        panic!("this kernel (6.7+) should take cgroup/connect_unix: {unix}");
    }
    let _a = unix_server(&topo, &allowed.display().to_string());
    let _s = unix_server(&topo, &service.display().to_string());
    let _ab = unix_server(&topo, &abstract_name);
    let _other_ab = unix_server(&topo, &format!("@bh-unix-other-{}", std::process::id()));
    let code = format!(
        "import errno, json, socket\n\
         def conn(a):\n\
         \x20   a = a.replace('@', '\\0', 1) if a.startswith('@') else a\n\
         \x20   s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)\n\
         \x20   try:\n\
         \x20       s.connect(a)\n\
         \x20       return s.recv(16).decode()\n\
         \x20   except OSError as e:\n\
         \x20       return errno.errorcode.get(e.errno, str(e))\n\
         print(json.dumps({{'allowed': conn({allowed:?}), 'service': conn({service:?}), \
         'abstract': conn({abstract_name:?}), 'other_abstract': conn('@bh-unix-other-{pid}')}}))\n",
        allowed = allowed.display().to_string(),
        service = service.display().to_string(),
        pid = std::process::id(),
    );
    let governed = python(&topo, Side::Governed, &code);
    assert_eq!(governed["allowed"], "served", "{governed}");
    assert_eq!(governed["abstract"], "served", "{governed}");
    assert_eq!(governed["service"], "EPERM", "{governed}");
    assert_eq!(governed["other_abstract"], "EPERM", "{governed}");
    let outside = python(&topo, Side::Host, &code);
    assert_eq!(outside["service"], "served", "{outside}");
    assert_eq!(outside["other_abstract"], "served", "{outside}");

    let sessions = wait_for_sessions(&topo, |s| {
        s.iter().filter(|s| s["protocol"] == "unix").count() >= 2
    });
    let texts: Vec<String> = sessions
        .iter()
        .filter(|s| s["protocol"] == "unix")
        .flat_map(|s| topo.events(&s["id"]))
        .filter(|e| e["type"] == "request")
        .map(|e| e["text"].as_str().unwrap().to_string())
        .collect();
    assert!(
        texts.contains(&format!("unix {}", service.display())),
        "{texts:?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn udp_destinations_the_policy_allows_pass_and_follow_reloads() {
    require_root();
    let topo = Topology::new(&format!("[capture]\ndns = [\"{TARGET_V4}\"]\n"));
    let _echo: Vec<_> = [7003, 7004, 7005]
        .iter()
        .map(|p| udp_echo(&topo, &format!("{TARGET_V4}:{p}")))
        .collect();
    topo.policy(
        "udp.toml",
        &format!(
            "[[target]]\nname = \"{TARGET_V4}:7003\"\nprotocol = \"udp\"\ndefault = \"allow\"\n\n\
             [[rule]]\nid = \"root-only\"\nverdict = \"allow\"\n\
             target = {{ name = [\"{TARGET_V4}:7004\"], protocol = [\"udp\"] }}\n\
             identity = {{ uid = [0] }}\n"
        ),
    );
    let _daemon = topo.start_daemon(&[]);
    let code = |ports: &[u16]| {
        let calls: Vec<String> = ports
            .iter()
            .map(|p| format!("'{p}': udp(socket.AF_INET, '{TARGET_V4}', {p}, False)"))
            .collect();
        format!("{UDP_FN}print(json.dumps({{{}}}))\n", calls.join(", "))
    };
    let first = python(&topo, Side::Governed, &code(&[7003, 7004, 7005]));
    assert_eq!(first["7003"], "echo:q", "{first}");
    assert_eq!(
        first["7004"], "EPERM",
        "allowed only to uid 0: the kernel cannot tell, so refused: {first}"
    );
    assert_eq!(first["7005"], "EPERM", "{first}");
    let (_, status) = topo.status();
    let c = &status["daemon"]["containment"];
    assert_eq!(
        c["udp_policy"],
        serde_json::json!([format!("{TARGET_V4}:7003")]),
        "{status}"
    );
    assert!(
        c["udp_policy_notes"].to_string().contains("7004"),
        "{status}"
    );

    // A reload opens 7005 and closes 7003.
    topo.policy(
        "udp.toml",
        &format!(
            "[[rule]]\nid = \"syslog\"\nverdict = \"allow\"\n\
             target = {{ name = [\"{TARGET_V4}:7005\"], protocol = [\"udp\"] }}\n"
        ),
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let after = loop {
        let now = python(&topo, Side::Governed, &code(&[7003, 7005]));
        if now["7005"] == "echo:q" || std::time::Instant::now() > deadline {
            break now;
        }
        std::thread::sleep(Duration::from_millis(300));
    };
    assert_eq!(after["7005"], "echo:q", "{after}");
    assert_eq!(after["7003"], "EPERM", "{after}");

    // Allowed datagrams are counted per process and destination: a closed udp session with
    // the datagrams and payload bytes that left; the refusals are recorded as before.
    let sessions = wait_for_sessions(&topo, |s| {
        let closed_to = |port: u16| {
            s.iter().any(|s| {
                s["destination"] == format!("{TARGET_V4}:{port}")
                    && s["outcome"]["kind"] == "closed"
            })
        };
        closed_to(7003)
            && closed_to(7005)
            && s.iter().any(|s| {
                s["destination"] == format!("{TARGET_V4}:7004") && s["outcome"]["kind"] == "refused"
            })
    });
    let allowed = sessions
        .iter()
        .find(|s| {
            s["destination"] == format!("{TARGET_V4}:7003") && s["outcome"]["kind"] == "closed"
        })
        .unwrap_or_else(|| panic!("no session of the allowed datagram: {sessions:?}"));
    assert_eq!(allowed["protocol"], "udp", "{allowed}");
    assert_eq!(allowed["identity"]["comm"], "python3", "{allowed}");
    assert_eq!(
        allowed["bytes_to_target"], 1,
        "one datagram of one byte: {allowed}"
    );
    let events = topo.events(&allowed["id"]);
    assert!(
        events.iter().any(|e| e["type"] == "request"
            && e["text"] == format!("udp {TARGET_V4}:7003")
            && e["verdict"] == "allow"),
        "{events:?}"
    );
    assert!(
        events
            .iter()
            .any(|e| e["type"] == "response" && e["summary"] == "1 datagram sent, 1 byte"),
        "{events:?}"
    );
    assert!(
        sessions.iter().any(|s| s["protocol"] == "udp"
            && s["destination"] == format!("{TARGET_V4}:7004")
            && s["outcome"]["kind"] == "refused"),
        "{sessions:?}"
    );
}
