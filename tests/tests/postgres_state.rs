//! The PostgreSQL gateway stays in step with the server's state (issue #12): statements made
//! by SQL `PREPARE` and run by protocol Bind/Execute, cursors made by `DECLARE` and read by
//! `FETCH` or by protocol Execute, a re-Parse of an existing name that the server refuses (or
//! the gateway denies), messages the server skips after an error until the Sync, and the
//! per-session caps. Each is tried with a raw client that sends exact protocol messages,
//! against a real PostgreSQL 15: the masked value stays masked, the denied statement does not
//! run, or the session ends with a clear error. Never a silent bypass.

use std::process::Command;

use bulkhead_tests::{require_root, PgServer, Side, Topology, TARGET_V4};
use serde_json::{json, Value};

/// A raw protocol client. The JSON spec (argv[1]) is a list of sessions, each a list of
/// rounds, each a list of messages sent in one write: `["Q", sql]`, `["P", name, sql]`,
/// `["B", portal, statement(, [text parameters])]`, `["E", portal]`, `["D", "S"|"P", name]`, `["C", "S"|"P", name]`,
/// `["S"]`. After a round it reads until one ReadyForQuery per Query and Sync in it (or the
/// end of the connection). Prints, per session and round, what came back.
const RAW_CLIENT: &str = r#"
import json, socket, struct, sys

def read_msg(s, buf):
    while len(buf) < 5:
        chunk = s.recv(65536)
        if not chunk:
            return None, buf
        buf += chunk
    length = struct.unpack("!i", buf[1:5])[0]
    while len(buf) < 1 + length:
        chunk = s.recv(65536)
        if not chunk:
            return None, buf
        buf += chunk
    return (buf[0:1], buf[5:1 + length]), buf[1 + length:]

def fields(body):
    out = {}
    for part in body.split(b"\0"):
        if part:
            out[chr(part[0])] = part[1:].decode("utf-8", "replace")
    return out

def row(body):
    n = struct.unpack("!h", body[:2])[0]
    pos, values = 2, []
    for _ in range(n):
        size = struct.unpack("!i", body[pos:pos + 4])[0]
        pos += 4
        if size < 0:
            values.append(None)
        else:
            values.append(body[pos:pos + size].decode("utf-8", "replace"))
            pos += size
    return values

def msg(tag, body):
    return tag + struct.pack("!i", 4 + len(body)) + body

def cstr(s):
    return s.encode() + b"\0"

def encode(m):
    kind = m[0]
    if kind == "Q":
        return msg(b"Q", cstr(m[1]))
    if kind == "P":
        return msg(b"P", cstr(m[1]) + cstr(m[2]) + struct.pack("!h", 0))
    if kind == "B":
        params = m[3] if len(m) > 3 else []
        body = cstr(m[1]) + cstr(m[2]) + struct.pack("!hh", 0, len(params))
        for p in params:
            v = p.encode()
            body += struct.pack("!i", len(v)) + v
        return msg(b"B", body + struct.pack("!h", 0))
    if kind == "E":
        return msg(b"E", cstr(m[1]) + struct.pack("!i", 0))
    if kind in ("D", "C"):
        return msg(kind.encode(), m[1].encode() + cstr(m[2]))
    if kind == "S":
        return msg(b"S", b"")
    raise ValueError(kind)

def read_answers(s, buf, readies):
    got = []
    while readies > 0:
        m, buf = read_msg(s, buf)
        if m is None:
            got.append({"closed": True})
            return got, buf, False
        tag, body = m
        if tag == b"E":
            f = fields(body)
            got.append({"error": f.get("C"), "message": f.get("M"), "severity": f.get("S")})
            if f.get("S") == "FATAL":
                return got, buf, False
        elif tag == b"D":
            got.append({"row": row(body)})
        elif tag == b"C":
            got.append({"tag": body.rstrip(b"\0").decode()})
        elif tag in (b"1", b"2", b"3"):
            got.append({"ok": tag.decode()})
        elif tag == b"Z":
            got.append({"ready": body.decode()})
            readies -= 1
    return got, buf, True

out = []
for rounds in json.loads(sys.argv[1]):
    s = socket.create_connection(("HOST", 5432))
    params = b"user\0admin\0database\0postgres\0\0"
    s.sendall(struct.pack("!ii", 8 + len(params), 196608) + params)
    startup, buf, alive = read_answers(s, b"", 1)
    result = []
    for r in rounds:
        if not alive:
            break
        s.sendall(b"".join(encode(m) for m in r))
        readies = sum(1 for m in r if m[0] in ("Q", "S"))
        got, buf, alive = read_answers(s, buf, readies)
        result.append(got)
    s.close()
    out.append(result)
print(json.dumps(out))
"#;

/// Reads, session settings and transactions allowed; deletes of `users` denied, of `precious`
/// held for approval; unknowns denied. The
/// `secret` column of `users` is masked by a rule that applies to statements touching
/// `users`: a statement the gateway misreads as touching nothing would get no mask at all.
const POLICY: &str = r#"
[[target]]
name = "db"
protocol = "postgres"
default = "deny"
on_unknown = "deny"
read_only_functions = ["open_secret_cursor"]

[[rule]]
id = "reads"
verdict = "allow"
target = { name = ["db"] }
sql = { class = ["read", "session", "transaction"] }

[[rule]]
id = "no-deletes"
verdict = "deny"
message = "no deletes"
target = { name = ["db"] }
sql = { class = ["delete"], objects = ["public.users"] }

[[rule]]
id = "precious-deletes"
verdict = "approve"
approval_timeout = "20s"
target = { name = ["db"] }
sql = { class = ["delete"], objects = ["public.precious"] }

[[rule]]
id = "secret-column"
verdict = "mask"
target = { name = ["db"] }
sql = { objects = ["public.users"] }
mask = { columns = ["public.users.secret"], style = "redact" }
"#;

const SECRET: &str = "s3cr3t-alice";

fn setup() -> (Topology, PgServer, bulkhead_tests::Proc) {
    let topo = Topology::new("");
    let (pg, daemon) = topo.postgres_target("scram-sha-256", POLICY);
    pg.admin_sql(
        &topo,
        &format!(
            "CREATE TABLE users (id int, secret text); INSERT INTO users VALUES (1, '{SECRET}');\n\
             CREATE TABLE precious (id int); INSERT INTO precious VALUES (1), (2), (3);\n\
             CREATE FUNCTION open_secret_cursor() RETURNS refcursor LANGUAGE plpgsql AS $$\n\
             DECLARE c refcursor := 'fc'; BEGIN OPEN c FOR SELECT secret FROM users; RETURN c; END $$"
        ),
    );
    (topo, pg, daemon)
}

/// The raw client's command for `sessions`.
fn raw_command(topo: &Topology, sessions: &Value) -> Command {
    let script = topo.dir.join("raw_state_client.py");
    std::fs::write(&script, RAW_CLIENT.replace("HOST", TARGET_V4)).unwrap();
    let mut cmd = Command::new("python3");
    cmd.arg(&script).arg(sessions.to_string());
    cmd
}

/// Runs the raw client on the governed side: per session, per round, what came back.
fn raw(topo: &Topology, sessions: &Value) -> Vec<Vec<Vec<Value>>> {
    let out = topo.output(Side::Governed, raw_command(topo, sessions));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_value(
        serde_json::from_str::<Value>(&text).unwrap_or_else(|e| panic!("{e}: {text}")),
    )
    .unwrap()
}

/// Every row value of a session (SQL NULL as `NULL`).
fn values(session: &[Vec<Value>]) -> Vec<String> {
    session
        .iter()
        .flatten()
        .filter_map(|g| g["row"].as_array())
        .flatten()
        .map(|v| v.as_str().unwrap_or("NULL").to_string())
        .collect()
}

/// A masked value: the style's text, or NULL where the gateway could not tell the value's
/// format (an Execute whose result was never described is masked whole).
fn masked(v: &str) -> bool {
    v == "[redacted]" || v == "NULL"
}

fn errors(round: &[Value]) -> Vec<(String, String)> {
    round
        .iter()
        .filter_map(|g| {
            Some((
                g["error"].as_str()?.to_string(),
                g["message"].as_str().unwrap_or("").to_string(),
            ))
        })
        .collect()
}

/// The secret never reaches the client; what did reach it in its place.
fn assert_no_secret(name: &str, session: &[Vec<Value>]) -> Vec<String> {
    let values = values(session);
    assert!(
        !values.iter().any(|v| v.contains(SECRET)),
        "{name}: the masked value reached the client: {session:?}"
    );
    values
}

#[test]
fn statements_and_cursors_made_by_sql_are_judged_and_masked_by_what_they_run() {
    require_root();
    let (topo, _pg, _daemon) = setup();
    let select = "SELECT secret FROM users";
    let sessions = json!([
        // 0. PREPARE by SQL, run by protocol Bind/Execute: one namespace on the server.
        [
            [["Q", format!("PREPARE s AS {select}")]],
            [["B", "p", "s"], ["E", "p"], ["S"]],
        ],
        // 1. DECLARE by SQL, read by protocol Execute of the portal of that name.
        [
            [["Q", "BEGIN"]],
            [["Q", format!("DECLARE c CURSOR FOR {select}")]],
            [["E", "c"], ["S"]],
            [["Q", "COMMIT"]],
        ],
        // 2. DECLARE and FETCH by SQL, in two messages and in one.
        [
            [["Q", "BEGIN"]],
            [["Q", format!("DECLARE c CURSOR FOR {select}")]],
            [["Q", "FETCH ALL FROM c"]],
            [[
                "Q",
                format!("CLOSE c; DECLARE d CURSOR FOR {select}; FETCH ALL FROM d")
            ]],
            [["Q", "COMMIT"]],
        ],
        // 3. A cursor opened inside a function the gateway cannot see into.
        [
            [["Q", "BEGIN"]],
            [["Q", "SELECT open_secret_cursor()"]],
            [["Q", "FETCH ALL FROM fc"]],
        ],
        // 4. The same cursor read by protocol Execute.
        [
            [["Q", "BEGIN"]],
            [["Q", "SELECT open_secret_cursor()"]],
            [["E", "fc"], ["S"]],
        ],
        // 5. A protocol statement run by SQL EXECUTE.
        [[["P", "q", select], ["S"]], [["Q", "EXECUTE q"]],],
        // 6. DEALLOCATE ALL drops protocol statements too; a new q is judged as itself.
        [
            [["P", "q", select], ["S"]],
            [["Q", "DEALLOCATE ALL"]],
            [
                ["P", "q", "SELECT 'plain'::text"],
                ["B", "", "q"],
                ["E", ""],
                ["S"]
            ],
        ],
    ]);
    let results = raw(&topo, &sessions);

    // 0: the Execute runs the SQL-prepared statement, masked.
    let got = assert_no_secret("PREPARE + Bind", &results[0]);
    assert!(got.len() == 1 && masked(&got[0]), "{:?}", results[0]);

    // 1: the cursor's rows through protocol Execute, masked.
    let got = assert_no_secret("DECLARE + Execute", &results[1]);
    assert!(got.len() == 1 && masked(&got[0]), "{:?}", results[1]);

    // 2: FETCH reads what its cursor holds, masked.
    let got = assert_no_secret("DECLARE + FETCH", &results[2]);
    assert_eq!(got, ["[redacted]", "[redacted]"], "{:?}", results[2]);

    // 3, 4: a cursor the gateway did not see declared is unknown: refused, with the reason.
    for (name, session) in [
        ("function cursor + FETCH", &results[3]),
        ("function cursor + Execute", &results[4]),
    ] {
        assert_no_secret(name, session);
        let refused = errors(&session[2]);
        assert_eq!(refused.len(), 1, "{name}: {session:?}");
        assert_eq!(refused[0].0, "42501", "{name}: {session:?}");
        assert!(
            refused[0].1.contains("did not see"),
            "{name}: the refusal says why: {session:?}"
        );
    }

    // 5: SQL EXECUTE of a protocol statement, masked.
    let got = assert_no_secret("Parse + EXECUTE", &results[5]);
    assert_eq!(got, ["[redacted]"], "{:?}", results[5]);

    // 6: after DEALLOCATE ALL the name is free and means the new statement.
    assert_eq!(values(&results[6]), ["plain"], "{:?}", results[6]);
}

#[test]
fn a_refused_or_denied_re_parse_and_skipped_messages_leave_the_names_as_the_server_has_them() {
    require_root();
    let (topo, _pg, _daemon) = setup();
    let select = "SELECT secret FROM users";
    let plain = "SELECT 'plain'::text AS secret";
    let sessions = json!([
        // 0. The server refuses a Parse of a name that exists (42P05): the name keeps its
        //    statement, and its Execute is masked as that statement.
        [
            [["P", "s", select], ["S"]],
            [["P", "s", plain], ["S"]],
            [["B", "p", "s"], ["E", "p"], ["S"]],
        ],
        // 1. The same in one pipeline: the Bind after the Sync must not be judged by the
        //    Parse the server refused.
        [
            [["P", "s", select], ["S"]],
            [["P", "s", plain], ["S"], ["B", "p", "s"], ["E", "p"], ["S"]],
        ],
        // 2. A denied re-Parse of an existing name: nothing runs, the name keeps its
        //    statement.
        [
            [["P", "s", select], ["S"]],
            [
                ["P", "s", "DELETE FROM users"],
                ["B", "p", "s"],
                ["E", "p"],
                ["S"]
            ],
            [["B", "p", "s"], ["E", "p"], ["S"]],
        ],
        // 3. After an error the server skips the rest of the batch, a Close included: the
        //    statement is still there, and still masked.
        [
            [["P", "s", select], ["S"]],
            [["B", "x", "no_such_statement"], ["C", "S", "s"], ["S"]],
            [["B", "p", "s"], ["E", "p"], ["S"]],
        ],
        // 4. A SQL PREPARE that fails (the name exists) leaves the name as it was.
        [
            [["Q", format!("PREPARE s AS {select}")]],
            [["Q", format!("PREPARE s AS {plain}")]],
            [["B", "p", "s"], ["E", "p"], ["S"]],
            [["Q", "EXECUTE s"]],
        ],
        // 5. What is left in the table.
        [[["Q", "SELECT count(*)::text FROM users"]]],
    ]);
    let results = raw(&topo, &sessions);

    for (i, name) in [
        "refused re-Parse",
        "refused re-Parse, pipelined",
        "denied re-Parse",
        "skipped Close",
        "failed re-PREPARE",
    ]
    .iter()
    .enumerate()
    {
        let got = assert_no_secret(name, &results[i]);
        assert!(
            !got.is_empty(),
            "{name}: the statement ran: {:?}",
            results[i]
        );
        assert!(got.iter().all(|v| masked(v)), "{name}: {:?}", results[i]);
    }
    // The refusals the client saw are the server's own (42P05) and the policy's (42501).
    assert_eq!(errors(&results[0][1])[0].0, "42P05", "{:?}", results[0]);
    let denied = errors(&results[2][1]);
    assert_eq!(denied.len(), 1, "{:?}", results[2]);
    assert_eq!(denied[0], ("42501".into(), "bulkhead: no deletes".into()));
    // The denied DELETE did not run.
    assert_eq!(values(&results[5]), ["1"], "{:?}", results[5]);
}

#[test]
fn per_session_caps_end_the_session_with_a_clear_error() {
    require_root();
    let (topo, _pg, _daemon) = setup();
    let mut many: Vec<Value> = (0..1100)
        .map(|i| json!(["P", format!("s{i}"), "SELECT 1"]))
        .collect();
    many.push(json!(["S"]));
    let sessions = json!([[many], [[["Q", "SELECT 1"]]]]);
    let results = raw(&topo, &sessions);
    let last = results[0][0]
        .iter()
        .rev()
        .find(|g| g.get("error").is_some());
    let last = last.unwrap_or_else(|| panic!("no error past the cap: {:?}", results[0][0].last()));
    assert_eq!(last["severity"], "FATAL", "{last}");
    assert_eq!(last["error"], "54000", "{last}");
    assert!(
        last["message"]
            .as_str()
            .unwrap()
            .contains("too many prepared statements"),
        "{last}"
    );
    // Other sessions are not affected.
    assert_eq!(values(&results[1]), ["1"]);
}

#[test]
fn a_prepared_statement_approved_by_an_admin_is_approved_for_one_execution() {
    require_root();
    let (topo, _pg, _daemon) = setup();
    let delete = "DELETE FROM precious WHERE id > $1::int AND id < $2::int";
    let sessions = json!([[
        [["P", "d", delete], ["S"]],
        [["B", "", "d", ["0", "3"]], ["E", ""], ["S"]],
        [["B", "", "d", ["-1", "3"]], ["E", ""], ["S"]],
        [["Q", "SELECT count(*)::text FROM precious"]],
    ]]);
    let mut client = topo.spawn(Side::Governed, "raw", raw_command(&topo, &sessions));
    let decide = |verdict: &str, reason: &str| {
        let pending = topo.first_pending();
        assert!(pending.to_string().contains("precious"), "{pending}");
        let out = topo.output(
            Side::Host,
            topo.bulkhead(&[
                "approvals",
                verdict,
                &pending["id"].to_string(),
                "--reason",
                reason,
            ]),
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    // The Parse is held and approved: its first Execute runs.
    decide("approve", "one cleanup");
    // The second Execute is held again; the approver sees the values it is bound with, and
    // denies it.
    let held = topo.first_pending();
    let shown = topo
        .run_cli(&["approvals", "show", &held["id"].to_string(), "--json"])
        .unwrap();
    assert_eq!(shown["what"]["params"], json!(["-1", "3"]), "{shown}");
    let out = topo.output(
        Side::Host,
        topo.bulkhead(&["approvals", "show", &held["id"].to_string()]),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("parameters: $1 = '-1', $2 = '3'"), "{text}");
    decide("deny", "once was enough");
    let line = client
        .line(std::time::Duration::from_secs(20))
        .unwrap_or_else(|| panic!("no output: {}", client.stderr()));
    assert!(client.wait().success(), "{}", client.stderr());
    let results: Vec<Vec<Vec<Value>>> = serde_json::from_str(&line).unwrap();
    let rounds = &results[0];
    assert!(
        rounds[1].iter().any(|g| g["tag"] == "DELETE 2"),
        "the approved run: {rounds:?}"
    );
    let refused = errors(&rounds[2]);
    assert_eq!(refused.len(), 1, "{rounds:?}");
    assert_eq!(refused[0].0, "42501", "{rounds:?}");
    assert!(refused[0].1.contains("once was enough"), "{rounds:?}");
    assert_eq!(values(&rounds[3..]), ["1"], "one row left: {rounds:?}");
}
