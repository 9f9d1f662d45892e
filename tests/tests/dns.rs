//! DNS of governed processes: queries to the configured resolver go through the daemon's DNS
//! forwarder and are recorded (names, types, answers' addresses) before they are relayed and
//! before the answer comes back; the answer still comes from the resolver's address, so
//! glibc's resolver (`getent hosts`) accepts it. A real resolver (a small Python responder) in
//! the target namespace, real clients in the governed cgroup.

use std::{process::Command, time::Duration};

use bulkhead_tests::{require_root, Side, Topology, TARGET_V4, TARGET_V6};

/// The address every A query is answered with.
const ANSWER: &str = "10.201.0.77";

/// A DNS responder on `host:53` (`TARGET_V4` or `TARGET_V6`): A queries get `ANSWER`, names
/// under `nx.` get NXDOMAIN, other types an empty answer.
fn resolver(topo: &Topology, host: &str) -> bulkhead_tests::Proc {
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
            "import socket, struct\n\
             s = socket.socket(socket.{family}, socket.SOCK_DGRAM)\n\
             s.bind(('{host}', 53))\n\
             print('ready', flush=True)\n\
             while True:\n\
             \x20   data, peer = s.recvfrom(4096)\n\
             \x20   if len(data) < 17: continue\n\
             \x20   qid = struct.unpack('!H', data[:2])[0]\n\
             \x20   i, labels = 12, []\n\
             \x20   while data[i] != 0:\n\
             \x20       labels.append(data[i + 1:i + 1 + data[i]].decode()); i += 1 + data[i]\n\
             \x20   qtype = struct.unpack('!H', data[i + 1:i + 3])[0]\n\
             \x20   name = '.'.join(labels)\n\
             \x20   rcode = 3 if name.startswith('nx.') else 0\n\
             \x20   answer = b''\n\
             \x20   if qtype == 1 and rcode == 0:\n\
             \x20       answer = b'\\xc0\\x0c' + struct.pack('!HHIH', 1, 1, 60, 4) + socket.inet_aton('{ANSWER}')\n\
             \x20   header = struct.pack('!HHHHHH', qid, 0x8180 | rcode, 1, 1 if answer else 0, 0, 0)\n\
             \x20   s.sendto(header + data[12:i + 5] + answer, peer)\n"
        ),
    ]);
    let mut p = topo.spawn(Side::Target, &format!("dns-responder-{host}"), cmd);
    assert_eq!(
        p.line(Duration::from_secs(10)).as_deref(),
        Some("ready"),
        "resolver: {}",
        p.stderr()
    );
    p
}

/// Python: `ask(name, connected)` sends an A query for `name` to the resolver and returns the
/// reply's source, answer and rcode, the socket's peer, or the error.
fn asker() -> String {
    format!(
        "import errno, json, socket, struct\n\
         def query(name, qid):\n\
         \x20   q = struct.pack('!HHHHHH', qid, 0x0100, 1, 0, 0, 0)\n\
         \x20   for part in name.split('.'):\n\
         \x20       q += bytes([len(part)]) + part.encode()\n\
         \x20   return q + b'\\0' + struct.pack('!HH', 1, 1)\n\
         def ask(payload, connected, host='{TARGET_V4}'):\n\
         \x20   s = socket.socket(socket.AF_INET6 if ':' in host else socket.AF_INET, socket.SOCK_DGRAM)\n\
         \x20   s.settimeout(2)\n\
         \x20   try:\n\
         \x20       peer = None\n\
         \x20       if connected:\n\
         \x20           s.connect((host, 53)); s.send(payload)\n\
         \x20           peer = '%s:%d' % s.getpeername()[:2]\n\
         \x20       else:\n\
         \x20           s.sendto(payload, (host, 53))\n\
         \x20       data, src = s.recvfrom(4096)\n\
         \x20       answers = struct.unpack('!H', data[6:8])[0]\n\
         \x20       return {{'from': '%s:%d' % src[:2], 'peer': peer, 'rcode': data[3] & 15,\n\
         \x20               'answer': socket.inet_ntoa(data[-4:]) if answers else None}}\n\
         \x20   except OSError as e:\n\
         \x20       return errno.errorcode.get(e.errno, str(e))\n\
         \x20   finally:\n\
         \x20       s.close()\n"
    )
}

fn python(topo: &Topology, side: Side, code: &str) -> serde_json::Value {
    let mut cmd = Command::new("python3");
    cmd.args(["-c", code]);
    let out = topo.output(side, cmd);
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.trim()).unwrap_or_else(|e| {
        panic!(
            "python on {side:?}: {e}: {text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

fn wait_for(
    topo: &Topology,
    want: impl Fn(&[serde_json::Value]) -> bool,
) -> Vec<serde_json::Value> {
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let sessions = topo.sessions();
        if want(&sessions) || std::time::Instant::now() > deadline {
            return sessions;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Request and response lines of a session: `request TEXT VERDICT [ERROR]`, `response SUMMARY`.
fn lines(topo: &Topology, id: &serde_json::Value) -> Vec<String> {
    topo.events(id)
        .iter()
        .filter_map(|e| match e["type"].as_str()? {
            "request" => Some(format!(
                "request {} {}{}",
                e["text"].as_str()?,
                e["verdict"].as_str()?,
                e["error"]
                    .as_str()
                    .map(|x| format!(" [{x}]"))
                    .unwrap_or_default()
            )),
            "response" => Some(format!(
                "response {}",
                e["summary"].as_str().or(e["error"].as_str())?
            )),
            _ => None,
        })
        .collect()
}

#[test]
fn queries_to_the_resolver_are_recorded_with_names_and_answers_and_answered_from_the_resolver() {
    require_root();
    let topo = Topology::new(&format!("[capture]\ndns = [\"{TARGET_V4}\"]\n"));
    let _resolver = resolver(&topo, TARGET_V4);
    let _daemon = topo.start_daemon(&[]);

    let code = format!(
        "{}print(json.dumps({{\n\
         'connected': ask(query('db.internal.example', 0x1111), True),\n\
         'sent_to': ask(query('api.internal.example', 0x2222), False),\n\
         'nx': ask(query('nx.internal.example', 0x3333), False),\n\
         'not_dns': ask(b'hello resolver', False),\n\
         }}))\n",
        asker()
    );
    let governed = python(&topo, Side::Governed, &code);
    let resolver_addr = format!("{TARGET_V4}:53");
    for key in ["connected", "sent_to"] {
        assert_eq!(governed[key]["answer"], ANSWER, "{key}: {governed}");
        assert_eq!(
            governed[key]["from"], resolver_addr,
            "{key}: the answer shows the resolver as its source: {governed}"
        );
    }
    assert_eq!(
        governed["connected"]["peer"], resolver_addr,
        "getpeername shows the resolver: {governed}"
    );
    assert_eq!(governed["nx"]["rcode"], 3, "{governed}");
    assert_eq!(
        governed["not_dns"], "timed out",
        "what is not a DNS query is not relayed: {governed}"
    );

    // glibc's resolver, which checks the answer's source, through a resolv.conf naming the
    // test resolver (bind-mounted in a mount namespace of its own).
    let resolv = topo.dir.join("resolv.conf");
    std::fs::write(
        &resolv,
        format!("nameserver {TARGET_V4}\noptions attempts:1 timeout:3\n"),
    )
    .unwrap();
    let mut getent = Command::new("unshare");
    getent.args([
        "-m",
        "sh",
        "-c",
        &format!(
            "mount --bind {} /etc/resolv.conf && exec getent hosts tool.internal.example",
            resolv.display()
        ),
    ]);
    let out = topo.output(Side::Governed, getent);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success()
            && stdout.starts_with(ANSWER)
            && stdout.contains("tool.internal.example"),
        "getent hosts: {out:?}"
    );

    // Outside the governed cgroup the resolver is asked directly and nothing is recorded.
    let outside = python(
        &topo,
        Side::Host,
        &format!(
            "{}print(json.dumps({{'a': ask(query('outside.example', 0x4444), False)}}))\n",
            asker()
        ),
    );
    assert_eq!(outside["a"]["answer"], ANSWER, "{outside}");

    // Recorded: a dns session per process and resolver, every query and answer in it.
    let sessions = wait_for(&topo, |s| {
        s.iter()
            .filter(|s| s["protocol"] == "dns" && s["ended_at_us"].is_u64())
            .count()
            >= 2
    });
    let dns: Vec<_> = sessions.iter().filter(|s| s["protocol"] == "dns").collect();
    let by = |comm: &str| {
        dns.iter()
            .find(|s| s["identity"]["comm"] == comm)
            .unwrap_or_else(|| panic!("no dns session of {comm}: {sessions:?}"))
    };
    let py = by("python3");
    assert_eq!(py["destination"], resolver_addr, "{py}");
    assert_eq!(py["outcome"]["kind"], "closed", "{py}");
    assert!(py["bytes_to_target"].as_u64().unwrap() > 0, "{py}");
    assert!(py["bytes_from_target"].as_u64().unwrap() > 0, "{py}");
    assert!(
        py["ended_at_us"].as_u64() >= py["started_at_us"].as_u64(),
        "{py}"
    );
    let py_lines = lines(&topo, &py["id"]);
    for want in [
        "request db.internal.example A allow".to_string(),
        format!("response NOERROR: db.internal.example A {ANSWER}"),
        "request api.internal.example A allow".to_string(),
        format!("response NOERROR: api.internal.example A {ANSWER}"),
        "request nx.internal.example A allow".to_string(),
        "response NXDOMAIN".to_string(),
    ] {
        assert!(py_lines.contains(&want), "{want:?} missing: {py_lines:#?}");
    }
    assert!(
        py_lines
            .iter()
            .any(|l| l.starts_with("request 14 bytes to the resolver deny [not a DNS message")),
        "{py_lines:#?}"
    );
    assert_eq!(py["denied"], 1, "{py}");
    assert!(
        !py_lines.iter().any(|l| l.contains("outside.example")),
        "{py_lines:#?}"
    );
    let getent = by("getent");
    let getent_lines = lines(&topo, &getent["id"]);
    assert!(
        getent_lines
            .iter()
            .any(|l| l == &format!("response NOERROR: tool.internal.example A {ANSWER}")),
        "{getent_lines:#?}"
    );

    // `sessions show` tells an admin the names and the answers.
    let shown = topo.output(
        Side::Host,
        topo.bulkhead(&["sessions", "show", &getent["id"].to_string()]),
    );
    let text = String::from_utf8_lossy(&shown.stdout);
    assert!(
        text.contains("tool.internal.example A") && text.contains(ANSWER),
        "{text}"
    );

    let (_, status) = topo.status();
    let containment = &status["daemon"]["containment"];
    assert_eq!(containment["dns"][0], resolver_addr, "{status}");
    assert_eq!(
        containment["dns_forwarder"][0], "127.0.0.1:951/udp",
        "{status}"
    );
}

#[test]
fn ipv6_and_ipv4_mapped_queries_go_through_the_forwarder_too() {
    require_root();
    let topo = Topology::new(&format!(
        "[capture]\ndns = [\"{TARGET_V4}\", \"[{TARGET_V6}]:53\"]\n"
    ));
    let _v4 = resolver(&topo, TARGET_V4);
    let _v6 = resolver(&topo, TARGET_V6);
    let _daemon = topo.start_daemon(&[]);
    let code = format!(
        "{}print(json.dumps({{\n\
         'v6': ask(query('six.example', 0x6666), False, '{TARGET_V6}'),\n\
         'v6_connected': ask(query('six-c.example', 0x6667), True, '{TARGET_V6}'),\n\
         'mapped': ask(query('mapped.example', 0x4646), True, '::ffff:{TARGET_V4}'),\n\
         }}))\n",
        asker()
    );
    let governed = python(&topo, Side::Governed, &code);
    for key in ["v6", "v6_connected", "mapped"] {
        assert_eq!(governed[key]["answer"], ANSWER, "{key}: {governed}");
    }
    assert_eq!(
        governed["v6"]["from"],
        format!("{TARGET_V6}:53"),
        "{governed}"
    );
    assert_eq!(
        governed["v6_connected"]["peer"],
        format!("{TARGET_V6}:53"),
        "{governed}"
    );
    assert_eq!(
        governed["mapped"]["from"],
        format!("::ffff:{TARGET_V4}:53"),
        "{governed}"
    );
    let sessions = wait_for(&topo, |s| {
        s.iter()
            .filter(|s| s["protocol"] == "dns" && s["ended_at_us"].is_u64())
            .count()
            >= 2
    });
    let dns: Vec<_> = sessions.iter().filter(|s| s["protocol"] == "dns").collect();
    let to = |dst: String| {
        dns.iter()
            .find(|s| s["destination"] == dst)
            .unwrap_or_else(|| panic!("no dns session to {dst}: {sessions:?}"))
    };
    let six = lines(&topo, &to(format!("[{TARGET_V6}]:53"))["id"]);
    assert!(
        six.contains(&format!("response NOERROR: six-c.example A {ANSWER}")),
        "{six:#?}"
    );
    let mapped = lines(&topo, &to(format!("{TARGET_V4}:53"))["id"]);
    assert!(
        mapped.contains(&format!("response NOERROR: mapped.example A {ANSWER}")),
        "{mapped:#?}"
    );
}
