//! The PostgreSQL gateway against a real PostgreSQL 15 (Debian's), started by each test on its
//! own target host, with real clients: psql, pgbench, and a raw client that checks what bytes
//! reach the governed side.

use std::{
    process::Command,
    time::{Duration, Instant},
};

use bulkhead_tests::{require_root, PgServer, Side, Topology, GOVERNED_V4, TARGET_V4};
use serde_json::Value;

/// A policy for target `db`: reads and ordinary writes allowed, DDL denied with a message,
/// deletes from `public.precious` held for approval; unknown statements denied.
const POLICY: &str = r#"
[[target]]
name = "db"
protocol = "postgres"
default = "deny"
on_unknown = "deny"

[[rule]]
id = "db-allow"
verdict = "allow"
target = { name = ["db"] }
sql = { class = ["read", "transaction", "session", "insert", "update", "delete", "copy_in", "sequence", "lock", "maintenance"] }

[[rule]]
id = "db-no-ddl"
verdict = "deny"
message = "no DDL through the gateway"
target = { name = ["db"] }
sql = { class = ["ddl", "truncate"] }

[[rule]]
id = "db-precious-deletes"
verdict = "approve"
approval_timeout = "20s"
target = { name = ["db"] }
sql = { class = ["delete"], objects = ["public.precious"] }
"#;

/// Starts PostgreSQL (pg_hba `auth`), writes `policy`, configures target `db` with the held
/// password, and starts the daemon.
fn setup(auth: &str, policy: &str) -> (Topology, PgServer, bulkhead_tests::Proc) {
    let topo = Topology::new("");
    let (pg, daemon) = topo.postgres_target(auth, policy);
    (topo, pg, daemon)
}

/// Runs psql on the governed side with `script` on stdin; returns (status ok, stdout, stderr).
fn psql(topo: &Topology, pg: &PgServer, script: &str) -> (bool, String, String) {
    psql_env(topo, pg, script, &[])
}

/// `psql` with extra environment variables.
fn psql_env(
    topo: &Topology,
    pg: &PgServer,
    script: &str,
    env: &[(&str, &str)],
) -> (bool, String, String) {
    topo.psql(pg, script, env)
}

fn events_of_newest(topo: &Topology) -> Vec<Value> {
    let s = topo.wait_session_closed();
    let shown = topo
        .run_cli(&["sessions", "show", &s["id"].to_string(), "--json"])
        .unwrap();
    shown["events"].as_array().unwrap().clone()
}

#[test]
fn psql_queries_multi_statement_copy_and_a_denied_ddl_that_leaves_the_session_usable() {
    require_root();
    let (topo, pg, _daemon) = setup("scram-sha-256", POLICY);
    // DDL is denied for the client, so the table is made on the server directly.
    pg.admin_sql(&topo, "CREATE TABLE items (id int primary key, name text)");
    std::fs::write(topo.dir.join("in.csv"), "1,apple\n2,pear\n3,plum\n").unwrap();

    let (_, out, err) = psql(
        &topo,
        &pg,
        "SELECT 40 + 2;\n\
         SELECT 'a' AS x; SELECT 'b' AS y;\n\
         CREATE TABLE evil (x int);\n\
         SELECT 'still here';\n\
         \\copy items FROM 'in.csv' WITH (FORMAT csv)\n\
         \\copy (SELECT name FROM items ORDER BY id) TO 'out.csv'\n\
         BEGIN; INSERT INTO items VALUES (4, 'fig'); COMMIT;\n\
         SELECT count(*) FROM items;\n",
    );
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines,
        vec!["42", "a", "b", "still here", "4"],
        "stdout {out:?}, stderr {err:?}"
    );
    assert!(
        err.contains("ERROR:  bulkhead: no DDL through the gateway"),
        "the policy's message reaches psql: {err}"
    );
    assert!(
        !err.contains("BULKHEAD_DENIED"),
        "the stand-in never shows: {err}"
    );
    assert_eq!(
        std::fs::read_to_string(topo.dir.join("out.csv")).unwrap(),
        "apple\npear\nplum\n"
    );

    let events = events_of_newest(&topo);
    let requests: Vec<(&str, &str)> = events
        .iter()
        .filter(|e| e["type"] == "request")
        .map(|e| (e["text"].as_str().unwrap(), e["verdict"].as_str().unwrap()))
        .collect();
    assert!(
        requests.contains(&("CREATE TABLE evil (x int);", "deny")),
        "{requests:?}"
    );
    assert!(
        requests
            .iter()
            .any(|(t, v)| t.starts_with("SELECT 40 + 2") && *v == "allow"),
        "{requests:?}"
    );
    let denied = events
        .iter()
        .find(|e| e["type"] == "request" && e["verdict"] == "deny")
        .unwrap();
    assert_eq!(denied["rules"][0], "db-no-ddl");
    assert_eq!(denied["class"], "ddl");
    // A result is a `response` event, or written into its request while that still waited to
    // be written (docs/EVENTS.md).
    let responses: Vec<&Value> = events
        .iter()
        .filter(|e| {
            e["type"] == "response"
                || (e["type"] == "request" && (e["summary"].is_string() || e["error"].is_string()))
        })
        .collect();
    assert!(
        responses.iter().any(|r| r["summary"]
            .as_str()
            .is_some_and(|s| s.starts_with("SELECT 1"))),
        "{responses:?}"
    );
    assert!(
        responses
            .iter()
            .any(|r| r["error"].as_str().is_some_and(|s| s.contains("no DDL"))),
        "{responses:?}"
    );
    let auth: Vec<&Value> = events.iter().filter(|e| e["type"] == "auth").collect();
    assert_eq!(auth[1]["method"], "scram-sha-256", "{auth:?}");
    // The table the denied DDL named does not exist.
    let (_, out, err) = psql(
        &topo,
        &pg,
        "SELECT count(*) FROM pg_class WHERE relname = 'evil';\n",
    );
    assert_eq!(out.trim(), "0", "{err}");
}

#[test]
fn pgbench_initialises_and_runs_in_simple_extended_and_prepared_modes() {
    require_root();
    let permissive = r#"
[[target]]
name = "db"
protocol = "postgres"
default = "deny"

[[rule]]
id = "bench"
verdict = "allow"
target = { name = ["db"] }
sql = { class = ["read", "transaction", "session", "insert", "update", "delete", "copy_in", "ddl", "truncate", "maintenance", "sequence", "lock"] }
"#;
    let (topo, pg, _daemon) = setup("scram-sha-256", permissive);
    let pgbench = |args: &[&str]| {
        let mut cmd = Command::new("pgbench");
        cmd.args(["-h", TARGET_V4, "-U", &pg.user])
            .args(args)
            .arg("postgres");
        let out = topo.output(Side::Governed, cmd);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "pgbench {args:?}: {text}");
        text
    };
    // The default steps (dtgvp): client-side generation sends `copy ... from stdin with (freeze
    // on)` and the vacuum step `vacuum analyze pgbench_branches`, both outside what the SQL
    // parser reads; the gateway reads them from their tokens (`sql_utility`).
    let init = pgbench(&["-i", "-s", "1", "-q"]);
    assert!(init.contains("done"), "{init}");
    assert!(
        init.contains("vacuuming") && init.contains("generating data (client-side)"),
        "{init}"
    );
    for mode in ["simple", "extended", "prepared"] {
        let text = pgbench(&["-M", mode, "-c", "4", "-j", "2", "-t", "200"]);
        assert!(
            text.contains("number of transactions actually processed: 800/800"),
            "{mode}: {text}"
        );
        assert!(
            text.contains("number of failed transactions: 0"),
            "{mode}: {text}"
        );
    }
    let denied = topo
        .run_cli(&["sessions", "list", "--json", "--verdict", "denied"])
        .unwrap();
    assert_eq!(denied.as_array().unwrap().len(), 0, "{denied}");
}

#[test]
fn a_held_delete_waits_for_an_admin_and_runs_when_approved() {
    require_root();
    let (topo, pg, _daemon) = setup("scram-sha-256", POLICY);
    pg.admin_sql(
        &topo,
        "CREATE TABLE precious (id int); INSERT INTO precious VALUES (1), (2)",
    );

    // psql waits while the DELETE is held.
    let mut client = governed_psql(&topo, &pg, "DELETE FROM precious WHERE id = 1");
    let pending = topo.first_pending();
    assert!(
        client.child.try_wait().unwrap().is_none(),
        "psql is still waiting"
    );
    let text = pending.to_string();
    assert!(
        text.contains("DELETE FROM precious WHERE id = 1") && text.contains("db-precious-deletes"),
        "{text}"
    );

    let id = pending["id"].to_string();
    // The approver sees what the gateway found it does, and the whole text.
    let shown = topo.run_cli(&["approvals", "show", &id, "--json"]).unwrap();
    assert_eq!(
        shown["what"]["classes"],
        serde_json::json!(["delete"]),
        "{shown}"
    );
    assert_eq!(
        shown["what"]["objects"],
        serde_json::json!(["precious"]),
        "{shown}"
    );
    assert_eq!(
        shown["text"], "DELETE FROM precious WHERE id = 1",
        "{shown}"
    );
    // While it waits, psql has been told why and how an admin decides (a NOTICE).
    let told = format!("bulkhead approvals approve {id}");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !client.stderr().contains(&told) {
        assert!(
            Instant::now() < deadline,
            "no notice of the hold: {}",
            client.stderr()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        client.child.try_wait().unwrap().is_none(),
        "psql is still waiting"
    );
    let approved = topo.output(
        Side::Host,
        topo.bulkhead(&["approvals", "approve", &id, "--reason", "cleanup ticket 7"]),
    );
    assert!(
        approved.status.success(),
        "{}",
        String::from_utf8_lossy(&approved.stderr)
    );
    let status = client.wait();
    assert!(status.success(), "{}", client.stderr());
    let (_, out, _) = psql(&topo, &pg, "SELECT count(*) FROM precious;\n");
    assert_eq!(out.trim(), "1", "the delete ran after approval");

    // Denied this time: psql shows the reason, and nothing is deleted.
    let mut client = governed_psql(&topo, &pg, "DELETE FROM precious");
    let pending = topo.first_pending();
    let denied = topo.output(
        Side::Host,
        topo.bulkhead(&[
            "approvals",
            "deny",
            &pending["id"].to_string(),
            "--reason",
            "not today",
        ]),
    );
    assert!(
        denied.status.success(),
        "{}",
        String::from_utf8_lossy(&denied.stderr)
    );
    let status = client.wait();
    assert!(!status.success());
    assert!(client.stderr().contains("not today"), "{}", client.stderr());
    let (_, out, _) = psql(&topo, &pg, "SELECT count(*) FROM precious;\n");
    assert_eq!(out.trim(), "1");
}

#[test]
fn cancelling_a_long_query_stops_it_on_the_target() {
    require_root();
    let (topo, pg, _daemon) = setup("scram-sha-256", POLICY);
    let mut cmd = Command::new("psql");
    let long = "SELECT count(*) FROM generate_series(1, 100000000000::bigint)";
    cmd.args([
        "-X", "-h", TARGET_V4, "-U", &pg.user, "-d", "postgres", "-c", long,
    ]);
    let mut client = topo.spawn(Side::Governed, "psql", cmd);
    std::thread::sleep(Duration::from_millis(1500));
    let started = Instant::now();
    // SAFETY: signalling our own child by pid; psql sends a CancelRequest on SIGINT.
    unsafe {
        libc::kill(i32::try_from(client.pid()).unwrap(), libc::SIGINT);
    }
    let status = client.wait();
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "cancel took {:?}",
        started.elapsed()
    );
    assert!(!status.success());
    assert!(
        client
            .stderr()
            .contains("canceling statement due to user request"),
        "{}",
        client.stderr()
    );
}

#[test]
fn the_client_never_receives_the_held_password() {
    require_root();
    for auth in ["scram-sha-256", "md5", "password"] {
        // md5 and cleartext only where the target's auth allows them (scram-sha-256 is the
        // default).
        let allow = if auth == "scram-sha-256" {
            String::new()
        } else {
            format!("postgres = {{ auth = [\"{auth}\"] }}\n")
        };
        let topo = Topology::new("");
        let (pg, _daemon) = topo.postgres_target_with(auth, POLICY, &allow);
        // A raw client: startup, one query, terminate; print every byte received, hex.
        let script = format!(
            r#"
import socket, struct, sys
s = socket.create_connection(("{TARGET_V4}", 5432))
params = b"user\x00{user}\x00database\x00postgres\x00\x00"
s.sendall(struct.pack("!ii", 8 + len(params), 196608) + params)
q = b"SELECT current_user\x00"
got = b""
def until_ready():
    global got
    while not got.endswith(b"Z\x00\x00\x00\x05I"):
        chunk = s.recv(65536)
        if not chunk:
            break
        got += chunk
until_ready()
s.sendall(b"Q" + struct.pack("!i", 4 + len(q)) + q)
until_ready()
s.sendall(b"X\x00\x00\x00\x04")
sys.stdout.write(got.hex())
"#,
            user = pg.user
        );
        let mut cmd = Command::new("python3");
        cmd.args(["-c", &script]);
        let out = topo.output(Side::Governed, cmd);
        assert!(
            out.status.success(),
            "{auth}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let received = hex_decode(String::from_utf8_lossy(&out.stdout).trim());
        assert!(
            received.windows(5).any(|w| w == b"admin"),
            "{auth}: the query answered (current_user)"
        );
        assert_eq!(
            &received[..9],
            b"R\x00\x00\x00\x08\x00\x00\x00\x00",
            "{auth}: AuthenticationOk first, no password request"
        );
        let pw = pg.password.as_bytes();
        assert!(
            !received.windows(pw.len()).any(|w| w == pw),
            "{auth}: the password reached the client"
        );
        let events = events_of_newest(&topo);
        let upstream = events
            .iter()
            .find(|e| e["type"] == "auth" && e["side"] == "upstream")
            .unwrap();
        assert_eq!(
            upstream["method"],
            if auth == "scram-sha-256" {
                "scram-sha-256"
            } else {
                auth
            },
            "{upstream}"
        );
    }
}

fn hex_decode(s: &str) -> Vec<u8> {
    (0..s.len() / 2)
        .map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap())
        .collect()
}

/// Waits until the server's log (its stderr) contains `text`.
fn wait_for_log(pg: &PgServer, text: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !pg.proc.stderr().contains(text) {
        assert!(
            Instant::now() < deadline,
            "no {text:?} in the server's log: {}",
            pg.proc.stderr()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// psql's login as `user` is refused: its FATAL says each of `says` and the session is
/// recorded as refused. Returns the session's events.
fn assert_login_refused(topo: &Topology, user: &str, says: &[&str]) -> Vec<Value> {
    let out = psql_login(topo, user, "postgres", "SELECT 1");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "logged in: {stderr}");
    for part in says {
        assert!(stderr.contains(part), "{part:?} in {stderr}");
    }
    let session = topo.wait_session_closed();
    assert_eq!(session["outcome"]["kind"], "refused", "{session}");
    events_of_newest(topo)
}

fn assert_no_upstream_login(events: &[Value]) {
    assert!(
        !events
            .iter()
            .any(|e| e["type"] == "auth" && e["side"] == "upstream"),
        "no upstream login was attempted: {events:?}"
    );
}

/// Turns on the server's `log_connections` and waits until it is in force.
fn log_connections(topo: &Topology, pg: &PgServer) {
    pg.admin_sql(topo, "ALTER SYSTEM SET log_connections = on");
    pg.admin_sql(topo, "SELECT pg_reload_conf()");
    wait_for_log(pg, "parameter \"log_connections\" changed to \"on\"");
}

#[test]
fn a_target_asking_for_md5_or_a_cleartext_password_is_refused_unless_its_auth_allows_it() {
    require_root();
    // Allowed (`postgres.auth`), the same servers log the gateway in:
    // the_client_never_receives_the_held_password.
    for auth in ["md5", "password"] {
        let (topo, pg, _daemon) = setup(auth, POLICY);
        log_connections(&topo, &pg);
        let events = assert_login_refused(
            &topo,
            &pg.user,
            &[
                "FATAL:  bulkhead: target db: the server asked for ",
                &format!("(\"{auth}\")"),
                "postgres.auth",
            ],
        );
        let upstream: Vec<&Value> = events
            .iter()
            .filter(|e| e["type"] == "auth" && e["side"] == "upstream")
            .collect();
        assert_eq!(upstream.len(), 1, "{auth}: {events:?}");
        assert_eq!(upstream[0]["ok"], false, "{auth}: {upstream:?}");
        assert_eq!(
            upstream[0]["method"],
            format!("{auth} (refused: not in postgres.auth)"),
            "{auth}: {upstream:?}"
        );
        // The server saw the gateway connect, and neither a login nor a failed one: the
        // gateway answered its request for a password with nothing at all.
        wait_for_log(&pg, &format!("connection received: host={GOVERNED_V4}"));
        std::thread::sleep(Duration::from_millis(300));
        let log = pg.proc.stderr();
        assert!(
            !log.contains("connection authorized") && !log.contains("authentication failed"),
            "{auth}: {log}"
        );
    }
}

/// A fake PostgreSQL server on the target host for one connection: it reads the startup
/// message and asks for `mode`: `password`, `md5`, `none` (AuthenticationOk at once), or
/// `scram-partial` (SCRAM up to the client's proof, then AuthenticationOk without the server's
/// signature, as a server that does not know the password would). Then it prints as hex
/// everything it received after the startup message, once the gateway hangs up or 5 s pass
/// (a password message is answered with an authentication error).
const FAKE_SERVER: &str = r#"
import socket, struct, sys
mode, host = sys.argv[1], sys.argv[2]
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((host, 5432))
srv.listen(1)
print("listening", flush=True)
c, _ = srv.accept()
c.settimeout(5)
got = b""
def read_exact(n):
    global got
    b = b""
    while len(b) < n:
        chunk = c.recv(n - len(b))
        if not chunk:
            print(got.hex(), flush=True)
            sys.exit(0)
        b += chunk
    return b
def auth(code, data=b""):
    c.sendall(b"R" + struct.pack("!ii", 8 + len(data), code) + data)
ready = b"Z" + struct.pack("!i", 5) + b"I"
n = struct.unpack("!i", read_exact(4))[0]
read_exact(n - 4)
if mode == "password":
    auth(3)
elif mode == "md5":
    auth(5, b"salt")
elif mode == "none":
    auth(0)
    c.sendall(ready)
elif mode == "scram-partial":
    auth(10, b"SCRAM-SHA-256\x00\x00")
    head = read_exact(5)
    first = read_exact(struct.unpack("!i", head[1:])[0] - 4)
    got += head + first
    nonce = first.split(b"r=")[1]
    auth(11, b"r=" + nonce + b"impostor,s=c2FsdHNhbHQ=,i=4096")
    head = read_exact(5)
    got += head + read_exact(struct.unpack("!i", head[1:])[0] - 4)
    auth(0)
    c.sendall(ready)
try:
    while True:
        chunk = c.recv(65536)
        if not chunk:
            break
        got += chunk
        if got.endswith(b"X\x00\x00\x00\x04"):
            break
        if mode in ("password", "md5") and got.startswith(b"p"):
            err = b"SFATAL\x00C28P01\x00Mpassword authentication failed\x00\x00"
            c.sendall(b"E" + struct.pack("!i", 4 + len(err)) + err)
            break
except socket.timeout:
    pass
print(got.hex(), flush=True)
"#;

/// What a fake server received after the startup message.
type Received<'a> = &'a dyn Fn(&[u8]) -> bool;

/// The tags of the frontend messages in `bytes`, in order.
fn frontend_tags(mut bytes: &[u8]) -> Vec<u8> {
    let mut tags = Vec::new();
    while bytes.len() >= 5 {
        let len = u32::from_be_bytes(bytes[1..5].try_into().unwrap()) as usize;
        tags.push(bytes[0]);
        bytes = &bytes[(1 + len).min(bytes.len())..];
    }
    tags
}

#[test]
fn a_fake_server_gets_the_password_only_by_an_allowed_method_and_must_finish_scram() {
    require_root();
    let held = format!("held-{}", std::process::id());
    let not_allowed = |m: &str| format!("(\"{m}\"), which the target's postgres.auth");
    // (what the server asks for, the target's postgres table, what it must receive, what the
    // client's FATAL must say: `None` for a login)
    let cases: [(&str, &str, Received, Option<String>); 7] = [
        (
            "password",
            "",
            &|got| got.is_empty(),
            Some(not_allowed("password")),
        ),
        ("md5", "", &|got| got.is_empty(), Some(not_allowed("md5"))),
        ("none", "", &|got| got.is_empty(), Some(not_allowed("none"))),
        // SCRAM is allowed; the proof is sent (SCRAM sends it before the server's
        // signature), the session is not.
        (
            "scram-partial",
            "",
            &|got| frontend_tags(got) == b"pp",
            Some("without proving that it knows the password".into()),
        ),
        // Allowed: the positive controls, proving the fake sees what the gateway sends.
        (
            "password",
            "postgres = { auth = [\"password\"] }\n",
            &|got| got.starts_with(b"p") && got.windows(held.len()).any(|w| w == held.as_bytes()),
            Some("password authentication failed".into()),
        ),
        (
            "md5",
            "postgres = { auth = [\"md5\"] }\n",
            &|got| got.starts_with(b"p") && got[5..].starts_with(b"md5"),
            Some("password authentication failed".into()),
        ),
        (
            "none",
            "postgres = { auth = [\"none\"] }\n",
            &|got| got == b"X\x00\x00\x00\x04",
            None,
        ),
    ];
    for (mode, target_toml, received, refusal) in cases {
        let topo = Topology::new("");
        let mut fake = Command::new("python3");
        fake.args(["-c", FAKE_SERVER, mode, TARGET_V4]);
        let mut server = topo.spawn(Side::Target, "fake-postgres", fake);
        assert_eq!(
            server.line(Duration::from_secs(10)).as_deref(),
            Some("listening"),
            "{}",
            server.stderr()
        );
        let _daemon =
            topo.held_postgres_target(&format!("\"{TARGET_V4}:5432\""), &held, POLICY, target_toml);
        let out = psql_login(&topo, "app", "postgres", "\\q");
        let stderr = String::from_utf8_lossy(&out.stderr);
        let hex = server
            .line(Duration::from_secs(10))
            .unwrap_or_else(|| panic!("{mode}: the fake printed nothing: {}", server.stderr()));
        let got = hex_decode(&hex);
        assert!(
            received(&got),
            "{mode} {target_toml:?}: the server received {:?}",
            String::from_utf8_lossy(&got)
        );
        match refusal {
            Some(says) => {
                assert!(!out.status.success(), "{mode} {target_toml:?}: logged in");
                assert!(stderr.contains("FATAL:  bulkhead: target db: "), "{stderr}");
                assert!(stderr.contains(&says), "{mode}: {says:?} in {stderr}");
            }
            None => assert!(out.status.success(), "{mode}: {stderr}"),
        }
    }
}

#[test]
fn a_postgres_target_named_by_a_network_is_logged_in_to_only_at_its_named_sockets_unless_it_opts_in(
) {
    require_root();
    let topo = Topology::new("");
    let pg = topo.postgres("scram-sha-256");
    log_connections(&topo, &pg);
    // The server the admin named is elsewhere; the client dials another address in the network.
    let addresses = "\"10.201.0.9:5432\", \"10.201.0.0/24\"";
    let daemon = topo.held_postgres_target(addresses, &pg.password, POLICY, "");
    let events = assert_login_refused(
        &topo,
        &pg.user,
        &[
            "FATAL:  bulkhead: target db: ",
            "10.201.0.0/24",
            &format!("{TARGET_V4}:5432"),
            "postgres.login_to_network",
        ],
    );
    assert!(
        events.iter().any(|e| e["type"] == "error"
            && e["message"]
                .as_str()
                .unwrap()
                .contains("postgres.login_to_network")),
        "{events:?}"
    );
    assert_no_upstream_login(&events);
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        !pg.proc
            .stderr()
            .contains(&format!("connection received: host={GOVERNED_V4}")),
        "the gateway connected to the server: {}",
        pg.proc.stderr()
    );

    // Opted in: the same address is logged in to.
    drop(daemon);
    let _daemon = topo.held_postgres_target(
        addresses,
        &pg.password,
        POLICY,
        "postgres = { login_to_network = true }\n",
    );
    let out = psql_login(&topo, &pg.user, "postgres", "SELECT current_user");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), pg.user);
}

#[test]
fn malformed_frames_get_a_protocol_error_and_do_not_disturb_other_sessions() {
    require_root();
    let (topo, pg, _daemon) = setup("scram-sha-256", POLICY);
    // A startup with a negative length, then a session that sends a huge Query length.
    let script = format!(
        r#"
import socket, struct
s = socket.create_connection(("{TARGET_V4}", 5432))
s.sendall(struct.pack("!i", -5) + b"xxxx")
print("first:", s.recv(1000)[:1])
s = socket.create_connection(("{TARGET_V4}", 5432))
params = b"user\x00{user}\x00database\x00postgres\x00\x00"
s.sendall(struct.pack("!ii", 8 + len(params), 196608) + params)
got = b""
while not got.endswith(b"Z\x00\x00\x00\x05I"):
    got += s.recv(65536)
s.sendall(b"Q" + struct.pack("!i", 0x7ffffff0))
rest = b""
while True:
    c = s.recv(65536)
    if not c:
        break
    rest += c
print("second:", rest[:1])
"#,
        user = pg.user
    );
    let mut cmd = Command::new("python3");
    cmd.args(["-c", &script]);
    let out = topo.output(Side::Governed, cmd);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("first: b'E'") || text.contains("first: b''"),
        "{text}"
    );
    // The daemon is fine and serves the next client.
    let (_, out, err) = psql(&topo, &pg, "SELECT 'alive';\n");
    assert_eq!(out.trim(), "alive", "{err}");
    let failed = topo
        .sessions()
        .iter()
        .filter(|s| s["outcome"]["kind"] == "failed")
        .count();
    assert!(failed >= 1, "the malformed sessions are recorded as failed");
}

#[test]
fn policies_reload_under_a_running_daemon_and_a_broken_file_keeps_the_old_set() {
    require_root();
    let (topo, pg, _daemon) = setup("scram-sha-256", POLICY);
    let version = |topo: &Topology| {
        topo.run_cli(&["status", "--json"]).unwrap()["policy"]["version"]
            .as_u64()
            .unwrap()
    };
    let wait_version = |topo: &Topology, want: u64| {
        let deadline = Instant::now() + Duration::from_secs(10);
        while version(topo) < want {
            assert!(
                Instant::now() < deadline,
                "policy never reached version {want}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    assert_eq!(version(&topo), 1);
    let (_, _, err) = psql(&topo, &pg, "CREATE TABLE t1 (x int);\n");
    assert!(err.contains("no DDL through the gateway"), "{err}");

    // Allow DDL: the file watcher reloads, the next statement sees it.
    topo.policy(
        "db.toml",
        &POLICY
            .replace("class = [\"ddl\", \"truncate\"]", "class = [\"truncate\"]")
            .replace("\"maintenance\"]", "\"maintenance\", \"ddl\"]"),
    );
    wait_version(&topo, 2);
    let (_, _, err) = psql(&topo, &pg, "CREATE TABLE t1 (x int);\n");
    assert!(err.is_empty(), "DDL allowed after the reload: {err}");

    // A broken file is refused; the previous set stays in force and status says why.
    topo.policy("broken.toml", "[[rule]]\nid = \"x\"\nverdict = \"maybe\"\n");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (code, status) = topo.status();
        if status["policy"]["last_error"].is_string() {
            assert_eq!(code, Some(3), "status exits 3 after a failed reload");
            assert!(
                status["policy"]["last_error"]
                    .as_str()
                    .unwrap()
                    .contains("broken.toml"),
                "{status}"
            );
            assert_eq!(status["policy"]["version"], 2);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the broken file was not reported: {status}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let (_, _, err) = psql(&topo, &pg, "CREATE TABLE t2 (x int);\n");
    assert!(
        err.is_empty(),
        "the old set (DDL allowed) is still in force: {err}"
    );
    let out = topo.output(Side::Host, topo.bulkhead(&["status"]));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("policy:") && text.contains("broken.toml"),
        "{text}"
    );
}

/// psql running `sql` on the governed side, in the background (it may be held).
fn governed_psql(topo: &Topology, pg: &PgServer, sql: &str) -> bulkhead_tests::Proc {
    let mut cmd = Command::new("psql");
    cmd.args([
        "-X", "-h", TARGET_V4, "-U", &pg.user, "-d", "postgres", "-At", "-c", sql,
    ]);
    topo.spawn(Side::Governed, "psql", cmd)
}

#[test]
fn approvals_expire_cannot_be_given_by_the_governed_side_and_grant_windows_cover_the_same_rule_only(
) {
    require_root();
    let policy = POLICY.replace("approval_timeout = \"20s\"", "approval_timeout = \"2s\"")
        + r#"
[[rule]]
id = "db-audit-deletes"
verdict = "approve"
target = { name = ["db"] }
sql = { class = ["delete"], objects = ["public.audit"] }
"#;
    let (topo, pg, _daemon) = setup("scram-sha-256", &policy);
    pg.admin_sql(&topo, "CREATE TABLE precious (id int); INSERT INTO precious VALUES (1), (2), (3); CREATE TABLE audit (id int); INSERT INTO audit VALUES (1)");

    // Nobody decides: the request expires and psql says so.
    let mut client = governed_psql(&topo, &pg, "DELETE FROM precious WHERE id = 1");
    let pending = topo.first_pending();
    // A governed process cannot approve it, even as root.
    let mut approve = topo.bulkhead(&["approvals", "approve", &pending["id"].to_string()]);
    approve.env_remove("SUDO_UID");
    let out = topo.output(Side::Governed, approve);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("governed cgroup"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status = client.wait();
    assert!(!status.success());
    assert!(client.stderr().contains("expired"), "{}", client.stderr());

    // Approved with a window: the next matching delete runs without asking...
    let mut client = governed_psql(&topo, &pg, "DELETE FROM precious WHERE id = 2");
    let pending = topo.first_pending();
    let out = topo.output(
        Side::Host,
        topo.bulkhead(&[
            "approvals",
            "approve",
            &pending["id"].to_string(),
            "--for",
            "10m",
        ]),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(client.wait().success(), "{}", client.stderr());
    let started = Instant::now();
    let mut client = governed_psql(&topo, &pg, "DELETE FROM precious WHERE id = 3");
    assert!(client.wait().success(), "{}", client.stderr());
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "covered by the window, not held"
    );
    let grants = topo.run_cli(&["approvals", "grants", "--json"]).unwrap();
    assert_eq!(grants.as_array().unwrap().len(), 1, "{grants}");

    // ...but a different rule's request still waits.
    let mut client = governed_psql(&topo, &pg, "DELETE FROM audit");
    let pending = topo.first_pending();
    assert!(
        pending.to_string().contains("db-audit-deletes"),
        "{pending}"
    );
    let out = topo.output(
        Side::Host,
        topo.bulkhead(&[
            "approvals",
            "deny",
            &pending["id"].to_string(),
            "--reason",
            "keep the audit",
        ]),
    );
    assert!(out.status.success());
    assert!(!client.wait().success());
    let (_, out, _) = psql(
        &topo,
        &pg,
        "SELECT (SELECT count(*) FROM precious) || '/' || (SELECT count(*) FROM audit);\n",
    );
    assert_eq!(
        out.trim(),
        "1/1",
        "only the approved and window-covered deletes ran"
    );
}

#[test]
fn masking_hides_detected_values_whatever_the_alias_json_or_copy() {
    require_root();
    let policy = POLICY.to_string()
        + r#"
[[rule]]
id = "pii-values"
verdict = "mask"
target = { name = ["db"] }
mask = { detectors = ["email", "card"], style = "redact" }
"#;
    let (topo, pg, _daemon) = setup("scram-sha-256", &policy);
    pg.admin_sql(
        &topo,
        "CREATE TABLE users (id int, email text, card text, note text); \
         INSERT INTO users VALUES (1, 'alice@example.com', '4111 1111 1111 1111', 'plain note')",
    );

    let (_, out, err) = psql(
        &topo,
        &pg,
        "SELECT email, card, note FROM users;\n\
         SELECT email AS e, upper(email) AS shout FROM users;\n\
         SELECT row_to_json(u) FROM users u;\n\
         \\copy users TO 'users.csv' WITH (FORMAT csv)\n",
    );
    assert!(err.is_empty(), "{err}");
    let copied = std::fs::read_to_string(topo.dir.join("users.csv")).unwrap();
    for leaked in [
        "alice@example.com",
        "ALICE@EXAMPLE.COM",
        "4111 1111 1111 1111",
    ] {
        assert!(
            !out.contains(leaked) && !copied.contains(leaked),
            "{leaked} leaked: {out} / {copied}"
        );
    }
    assert!(
        out.contains("plain note") && copied.contains("plain note"),
        "other values pass: {out} / {copied}"
    );
    assert_eq!(out.lines().count(), 3, "{out}");

    // The record says what was masked: each statement's masked rows and the rules.
    let session = topo.wait_session_closed();
    let id = session["id"].to_string();
    let shown = topo.run_cli(&["sessions", "show", &id, "--json"]).unwrap();
    let masked: Vec<(u64, Value)> = shown["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"] == "response")
        .filter_map(|e| Some((e["masked_rows"].as_u64()?, e["mask_rules"].clone())))
        .collect();
    assert_eq!(
        masked,
        vec![(1, serde_json::json!(["pii-values"])); 4],
        "three SELECTs and the COPY, one masked row each: {shown}"
    );
    let text = topo.output(Side::Host, topo.bulkhead(&["sessions", "show", &id]));
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("MASKED in 1 row by pii-values"), "{text}");
    let listed = topo
        .run_cli(&["sessions", "list", "--verdict", "masked", "--json"])
        .unwrap();
    assert_eq!(listed[0]["id"], session["id"], "{listed}");
    assert_eq!(listed[0]["masked"], 4, "{listed}");
    let listed = topo
        .run_cli(&["sessions", "list", "--verdict", "held", "--json"])
        .unwrap();
    assert_eq!(listed, serde_json::json!([]), "nothing was held");
}

#[test]
fn column_rules_mask_the_real_column_whatever_the_alias_protocol_or_copy() {
    require_root();
    let policy = POLICY.to_string()
        + r#"
[[rule]]
id = "ssn-column"
verdict = "mask"
target = { name = ["db"] }
mask = { columns = ["public.users.ssn"], style = "redact" }
"#;
    let (topo, pg, _daemon) = setup("scram-sha-256", &policy);
    pg.admin_sql(
        &topo,
        "CREATE TABLE users (id int, name text, ssn text); \
         INSERT INTO users VALUES (1, 'alice', '123-45-6789'); \
         CREATE TABLE other (id int, ssn text); \
         INSERT INTO other VALUES (2, '987-65-4321')",
    );
    let secret = "123-45-6789";

    // Simple query protocol (psql): an alias, a table alias, a multi-statement query, another
    // table's column of the same name, COPY in text and CSV.
    let (_, out, err) = psql(
        &topo,
        &pg,
        "SELECT ssn AS x FROM users;\n\
         SELECT u.name, u.ssn FROM users u;\n\
         SELECT id FROM users \\; SELECT o.ssn AS y, u.ssn AS z FROM other o, users u;\n\
         SELECT ssn FROM other;\n\
         \\copy users to stdout\n\
         \\copy users (ssn, name) to stdout with (format csv, header true)\n\
         \\copy (SELECT name, ssn FROM users) to stdout\n",
    );
    assert!(err.is_empty(), "{err}");
    assert!(!out.contains(secret), "the column leaked: {out}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines,
        vec![
            "[redacted]",
            "alice|[redacted]",
            "1",
            "987-65-4321|[redacted]",
            "987-65-4321",
            "1\talice\t[redacted]",
            "ssn,name",
            "\"[redacted]\",alice",
            "alice\t[redacted]",
        ],
        "{out}"
    );

    // Extended protocol, tokio-postgres: the rows of an Execute follow no RowDescription (it
    // came with the statement's Describe, in an earlier round trip) and are binary.
    let v = topo.pg_client(&[
        "query",
        "SELECT ssn AS x, name, id FROM users",
        "SELECT ssn FROM other",
        "SELECT o.ssn, u.ssn FROM other o JOIN users u ON true",
    ]);
    assert_eq!(
        v,
        serde_json::json!([
            [["[redacted]", "alice", "1"]],
            [["987-65-4321"]],
            [["987-65-4321", "[redacted]"]]
        ])
    );

    // Extended protocol, psycopg: Describe of the portal, text and binary results, a named
    // prepared statement, a pipeline.
    let script = format!(
        r#"
import json, psycopg
out = {{}}
conn = psycopg.connect("host={TARGET_V4} user=admin dbname=postgres", autocommit=True)
q = "SELECT ssn AS x, name FROM users WHERE id = %s"
out["text"] = list(conn.execute(q, (1,)).fetchone())
out["binary"] = list(conn.execute(q, (1,), binary=True).fetchone())
out["prepared"] = [list(conn.execute(q, (1,), prepare=True).fetchone()) for _ in range(3)]
out["other"] = conn.execute("SELECT ssn FROM other WHERE id = %s", (2,)).fetchone()[0]
with conn.pipeline():
    a = conn.execute("SELECT ssn FROM other WHERE id = %s", (2,))
    b = conn.execute("SELECT name, ssn FROM users WHERE id = %s", (1,))
out["pipeline"] = [a.fetchone()[0], list(b.fetchone())]
print(json.dumps(out))
"#
    );
    let mut cmd = Command::new("python3");
    cmd.args(["-c", &script]);
    let out = topo.output(Side::Governed, cmd);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(v["text"], serde_json::json!(["[redacted]", "alice"]));
    assert_eq!(v["binary"], serde_json::json!(["[redacted]", "alice"]));
    assert_eq!(
        v["prepared"],
        serde_json::json!([
            ["[redacted]", "alice"],
            ["[redacted]", "alice"],
            ["[redacted]", "alice"]
        ])
    );
    assert_eq!(v["other"], "987-65-4321");
    assert_eq!(
        v["pipeline"],
        serde_json::json!(["987-65-4321", ["alice", "[redacted]"]])
    );
}

#[test]
fn a_rust_driver_with_binary_parameters_and_prepared_statements() {
    require_root();
    let (topo, _pg, _daemon) = setup("scram-sha-256", POLICY);
    let v = topo.pg_client(&[]);
    assert_eq!(v["n"], 42);
    assert_eq!(v["s"], "binary");
    assert_eq!(v["b"], serde_json::json!([0, 1, 255]));
    assert_eq!(v["f"], 1.5);
    assert_eq!(v["sum"], 9900);
    assert_eq!(v["denied"]["code"], "42501", "{v}");
    assert!(
        v["denied"]["message"]
            .as_str()
            .unwrap()
            .contains("no DDL through the gateway"),
        "{v}"
    );
    assert_eq!(v["after"], "still usable");
}

#[test]
fn psycopg_with_server_side_binding_and_pipeline_mode() {
    require_root();
    let (topo, _pg, _daemon) = setup("scram-sha-256", POLICY);
    let script = format!(
        r#"
import json, psycopg
out = {{}}
conn = psycopg.connect("host={TARGET_V4} user=admin dbname=postgres", autocommit=True)
out["binary"] = list(conn.execute("SELECT %b::int + 1, %b::text", (41, "x"), binary=True).fetchone())
with conn.pipeline():
    a = conn.execute("SELECT %s::int * 2", (21,))
    b = conn.execute("SELECT %s::text || 'y'", ("x",))
out["pipeline"] = [a.fetchone()[0], b.fetchone()[0]]
try:
    with conn.pipeline():
        conn.execute("SELECT 1")
        conn.execute("CREATE TABLE nope (x int)")
        conn.execute("SELECT 2")
except psycopg.errors.InsufficientPrivilege as e:
    out["denied"] = str(e)
out["after"] = conn.execute("SELECT 'ok'").fetchone()[0]
print(json.dumps(out))
"#
    );
    let mut cmd = Command::new("python3");
    cmd.args(["-c", &script]);
    let out = topo.output(Side::Governed, cmd);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(v["binary"], serde_json::json!([42, "x"]));
    assert_eq!(v["pipeline"], serde_json::json!([42, "xy"]));
    assert!(
        v["denied"]
            .as_str()
            .unwrap_or("")
            .contains("no DDL through the gateway"),
        "{v}"
    );
    assert_eq!(v["after"], "ok");
}

/// Runs openssl with `args`, panicking with its output on failure.
fn openssl(dir: &std::path::Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn tls_on_both_legs_with_verified_certificates() {
    require_root();
    let topo = Topology::new("");
    let pg = topo.postgres("scram-sha-256");
    // The target's certificate, from a CA of the test's own, naming its address.
    let dir = topo.dir.join("target-tls");
    std::fs::create_dir_all(&dir).unwrap();
    openssl(
        &dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-subj",
            "/CN=test target CA",
            "-days",
            "2",
        ],
    );
    openssl(
        &dir,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=db",
        ],
    );
    std::fs::write(
        dir.join("san.ext"),
        format!("subjectAltName=IP:{TARGET_V4}\n"),
    )
    .unwrap();
    openssl(
        &dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "2",
            "-extfile",
            "san.ext",
        ],
    );
    let (uid, gid) = bulkhead_tests::system_user("postgres");
    for f in ["server.pem", "server.key"] {
        std::fs::copy(dir.join(f), pg.data.join(f)).unwrap();
        std::os::unix::fs::chown(pg.data.join(f), Some(uid), Some(gid)).unwrap();
        std::fs::set_permissions(
            pg.data.join(f),
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )
        .unwrap();
    }
    let mut conf = std::fs::read_to_string(pg.data.join("postgresql.conf")).unwrap();
    conf.push_str("ssl = on\nssl_cert_file = 'server.pem'\nssl_key_file = 'server.key'\n");
    std::fs::write(pg.data.join("postgresql.conf"), conf).unwrap();
    // TCP clients must use TLS.
    std::fs::write(
        pg.data.join("pg_hba.conf"),
        "local all all trust\nhostssl all all 0.0.0.0/0 scram-sha-256\n",
    )
    .unwrap();
    let mut reload = Command::new(format!("{}/pg_ctl", bulkhead_tests::PG_BIN));
    reload.args(["reload", "-D"]).arg(&pg.data);
    let out = topo.output_as(Side::Target, Some((uid, gid)), reload);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::thread::sleep(Duration::from_millis(500));

    let secret = topo.credential_file("db", &pg.password);
    let target = |ca: &std::path::Path| {
        format!(
            "[[target]]\nname = \"db\"\nprotocol = \"postgres\"\naddresses = [\"{TARGET_V4}:5432\"]\n\
             credentials = {{ file = \"{}\" }}\npostgres = {{ tls = \"verify-full\", ca = \"{}\" }}\n",
            secret.display(),
            ca.display()
        )
    };
    topo.write_config(&target(&dir.join("ca.pem")));
    topo.policy("db.toml", POLICY);
    let mut daemon = topo.start_daemon(&[]);

    // The client verifies the gateway's certificate against the gateway's CA; the gateway
    // verifies the target's against the target's.
    let gateway_ca = topo.dir.join("state/ca/ca.pem");
    let exported = topo.output(Side::Host, topo.bulkhead(&["ca", "export"]));
    assert_eq!(
        String::from_utf8_lossy(&exported.stdout),
        std::fs::read_to_string(&gateway_ca).unwrap()
    );
    let verified_psql = |sql: &str| {
        let mut cmd = Command::new("psql");
        cmd.args(["-X", "-At", "-c", sql]).arg(format!(
            "host={TARGET_V4} user=admin dbname=postgres sslmode=verify-full sslrootcert={}",
            gateway_ca.display()
        ));
        topo.output(Side::Governed, cmd)
    };
    let out = verified_psql("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "t",
        "the gateway reached the target over TLS"
    );
    let events = events_of_newest(&topo);
    let auth: Vec<String> = events
        .iter()
        .filter(|e| e["type"] == "auth")
        .map(|e| e["method"].as_str().unwrap().to_string())
        .collect();
    assert!(
        auth[0].contains("TLS") && auth[1] == "scram-sha-256 over TLS",
        "{auth:?}"
    );

    // A target whose certificate does not chain to the configured CA is not logged in to.
    daemon.terminate();
    topo.write_config(&target(&gateway_ca));
    let _daemon = topo.start_daemon(&[]);
    let out = verified_psql("SELECT 1");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("TLS to the target"), "{err}");
}

/// psql on the governed side as `user` asking for `database`, one command; plain TCP so a
/// refused login is one session (with `prefer`, libpq retries without TLS).
fn psql_login(topo: &Topology, user: &str, database: &str, sql: &str) -> std::process::Output {
    let mut cmd = Command::new("psql");
    cmd.args([
        "-X", "-h", TARGET_V4, "-U", user, "-d", database, "-At", "-c", sql,
    ])
    .env("PGSSLMODE", "disable")
    .env_remove("PGPASSWORD");
    topo.output(Side::Governed, cmd)
}

#[test]
fn mapped_client_users_log_in_as_their_own_upstream_roles_and_unmapped_ones_are_refused() {
    require_root();
    let topo = Topology::new("");
    let reporting_pw = format!("pw-reporting-{}", std::process::id());
    let loader_pw = format!("pw-loader-{}", std::process::id());
    let reporting = topo.credential_file("reporting", &reporting_pw);
    let loader = topo.credential_file("loader", &loader_pw);
    let map = format!(
        "[[target.postgres.map]]\nclient_user = \"report_*\"\nuser = \"reporting\"\n\
         credentials = {{ file = \"{}\" }}\n\
         [[target.postgres.map]]\nclient_user = \"etl\"\nclient_database = \"postgres\"\n\
         user = \"loader\"\ndatabase = \"warehouse\"\ncredentials = {{ file = \"{}\" }}\n",
        reporting.display(),
        loader.display()
    );
    let (pg, _daemon) = topo.postgres_target_with("scram-sha-256", POLICY, &map);
    pg.admin_sql(
        &topo,
        &format!("CREATE ROLE reporting LOGIN PASSWORD '{reporting_pw}'"),
    );
    pg.admin_sql(
        &topo,
        &format!("CREATE ROLE loader LOGIN PASSWORD '{loader_pw}'"),
    );
    pg.admin_sql(&topo, "CREATE DATABASE warehouse OWNER loader");

    let who = "SELECT current_user || '@' || current_database()";
    for (client, database, upstream, entry) in [
        ("report_daily", "postgres", "reporting@postgres", 0),
        ("etl", "postgres", "loader@warehouse", 1),
    ] {
        let out = psql_login(&topo, client, database, who);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{client}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(stdout.trim(), upstream, "{client}: current_user@database");
        let events = events_of_newest(&topo);
        let auth: Vec<&Value> = events.iter().filter(|e| e["type"] == "auth").collect();
        assert_eq!(auth.len(), 2, "{events:?}");
        assert_eq!(auth[0]["side"], "client");
        assert_eq!(auth[0]["user"], client, "{auth:?}");
        assert!(
            auth[0]["method"]
                .as_str()
                .unwrap()
                .contains(&format!("database {database}")),
            "{auth:?}"
        );
        assert_eq!(auth[1]["side"], "upstream");
        assert_eq!(auth[1]["user"], upstream, "{auth:?}");
        assert_eq!(
            auth[1]["method"],
            format!("scram-sha-256, postgres.map[{entry}]"),
            "{auth:?}"
        );
    }

    // Not covered by any entry: the user, or the database (etl is mapped for `postgres` only).
    for (client, database) in [("mallory", "postgres"), ("etl", "sales")] {
        let out = psql_login(&topo, client, database, who);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{client}@{database} logged in");
        let expected = format!(
            "FATAL:  bulkhead: no upstream login is mapped for user \"{client}\" and database \"{database}\" on target db"
        );
        assert!(stderr.contains(&expected), "{client}: {stderr}");
        let session = topo.wait_session_closed();
        assert_eq!(session["outcome"]["kind"], "refused", "{session}");
        let events = events_of_newest(&topo);
        assert!(
            events
                .iter()
                .any(|e| e["type"] == "error" && expected.contains(e["message"].as_str().unwrap())),
            "{events:?}"
        );
        assert_no_upstream_login(&events);
    }
}

#[test]
fn startup_settings_are_judged_like_the_set_statements_they_amount_to() {
    require_root();
    let (topo, pg, _daemon) = setup("scram-sha-256", POLICY);
    // Plain session state passes, and the target applies it.
    let (ok, out, err) = psql_env(
        &topo,
        &pg,
        "SHOW statement_timeout;",
        &[("PGOPTIONS", "-c statement_timeout=4321")],
    );
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "4321ms");
    // A role, or a setting that changes how SQL is read, needs what the SET would need: this
    // policy has no rule for either, so the login is refused, with the reason.
    for options in [
        "-c role=pg_read_all_data",
        "--standard-conforming-strings=off",
        "-B 100",
    ] {
        let (ok, out, err) = psql_env(
            &topo,
            &pg,
            "SELECT 'connected';",
            &[("PGOPTIONS", options), ("PGSSLMODE", "disable")],
        );
        assert!(!ok, "{options}: {out}");
        assert!(err.contains("bulkhead:"), "{options}: {err}");
        assert!(!out.contains("connected"), "{options}: {out}");
    }
    let (_, _, err) = psql_env(
        &topo,
        &pg,
        "SELECT 1;",
        &[
            ("PGOPTIONS", "-c role=pg_read_all_data"),
            ("PGSSLMODE", "disable"),
        ],
    );
    assert!(
        err.contains("startup setting `SET role = 'pg_read_all_data'` refused"),
        "{err}"
    );
    let events = events_of_newest(&topo);
    assert!(
        events.iter().any(|e| e["type"] == "request"
            && e["verdict"] == "deny"
            && e["text"]
                .as_str()
                .is_some_and(|t| t.contains("SET role = 'pg_read_all_data'"))),
        "{events:#?}"
    );
}

#[test]
fn notifications_notices_and_a_clean_termination_pass_through() {
    require_root();
    let (topo, pg, _daemon) = setup("scram-sha-256", POLICY);
    // The notification comes from another session, straight on the server, while the governed
    // one listens (NOTIFY itself is a class this policy does not allow).
    std::fs::write(
        topo.dir.join("listen.sql"),
        "LISTEN bh_channel;\nSELECT count(*) > 0 FROM generate_series(1, 30000000);\nROLLBACK;\nSELECT 'still here';\n",
    )
    .unwrap();
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(format!(
            "psql -X -At -h {TARGET_V4} -U {} -d postgres -f listen.sql > listen.out 2> listen.err",
            pg.user
        ))
        .env_remove("PGPASSWORD")
        .current_dir(&topo.dir);
    let mut listener = topo.spawn(Side::Governed, "psql-listen", cmd);
    // A few times, so one lands after the LISTEN however slowly psql starts.
    for _ in 0..3 {
        std::thread::sleep(Duration::from_millis(400));
        pg.admin_sql(&topo, "NOTIFY bh_channel, 'hello through the gateway'");
    }
    let ok = listener.wait().success();
    let out = std::fs::read_to_string(topo.dir.join("listen.out")).unwrap();
    let err = std::fs::read_to_string(topo.dir.join("listen.err")).unwrap();
    assert!(ok, "{err}");
    // NotificationResponse, from the target, after the NOTIFY's transaction commits.
    assert!(
        out.contains(
            "Asynchronous notification \"bh_channel\" with payload \"hello through the gateway\""
        ),
        "{out}\n{err}"
    );
    // NoticeResponse (a WARNING for ROLLBACK outside a transaction).
    assert!(err.contains("there is no transaction in progress"), "{err}");
    assert!(out.contains("still here"), "{out}");
    // psql's Terminate ends the session normally.
    let s = topo.wait_session_closed();
    assert_eq!(s["outcome"]["kind"], "closed", "{s:#}");
}
