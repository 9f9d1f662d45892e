//! The PostgreSQL gateway reads SQL as the server does (issue #12): a client cannot make the
//! server read the bytes the gateway judged differently (a client-only encoding), nor resolve
//! the names an allow rule vouched for elsewhere (search_path). Each route is tried with a raw
//! client that sends exact bytes, against a real PostgreSQL 15.

use std::process::Command;

use bulkhead_tests::{require_root, PgServer, Side, Topology, TARGET_V4};
use serde_json::{json, Value};

/// A raw protocol client: for each session of the JSON spec (argv[1]), a startup with the
/// given parameters, then each query (hex bytes) as one simple Query message. Prints, per
/// session, the startup's error (or null) and per query what came back: rows, command tags and
/// errors (SQLSTATE and message).
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

def until_ready(s, buf):
    got = []
    while True:
        msg, buf = read_msg(s, buf)
        if msg is None:
            got.append({"closed": True})
            return got, buf, False
        tag, body = msg
        if tag == b"E":
            f = fields(body)
            got.append({"error": f.get("C"), "message": f.get("M")})
            if f.get("S") == "FATAL":
                return got, buf, False
        elif tag == b"D":
            got.append({"row": row(body)})
        elif tag == b"C":
            got.append({"tag": body.rstrip(b"\0").decode()})
        elif tag == b"Z":
            return got, buf, True

out = []
for session in json.loads(sys.argv[1]):
    s = socket.create_connection(("HOST", 5432))
    params = b"".join(k.encode() + b"\0" + v.encode() + b"\0" for k, v in session["params"]) + b"\0"
    s.sendall(struct.pack("!ii", 8 + len(params), 196608) + params)
    startup, buf, alive = until_ready(s, b"")
    errors = [g for g in startup if "error" in g or "closed" in g]
    result = {"startup": errors[0] if errors else None, "queries": []}
    for q in session["queries"]:
        if not alive:
            break
        q = bytes.fromhex(q)
        s.sendall(b"Q" + struct.pack("!i", 4 + len(q) + 1) + q + b"\0")
        got, buf, alive = until_ready(s, buf)
        result["queries"].append(got)
    s.close()
    out.append(result)
print(json.dumps(out))
"#;

/// Runs the raw client on the governed side; one result per session.
fn raw_sessions(topo: &Topology, sessions: &Value) -> Vec<Value> {
    let script = topo.dir.join("raw_client.py");
    std::fs::write(&script, RAW_CLIENT.replace("HOST", TARGET_V4)).unwrap();
    let mut cmd = Command::new("python3");
    cmd.arg(&script).arg(sessions.to_string());
    let out = topo.output(Side::Governed, cmd);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str::<Value>(&text)
        .unwrap_or_else(|e| panic!("{e}: {text}"))
        .as_array()
        .unwrap()
        .clone()
}

/// A session spec: startup parameters besides user and database, and queries as bytes.
fn session(pg: &PgServer, extra: &[(&str, &str)], queries: &[&[u8]]) -> Value {
    let mut params = vec![json!(["user", pg.user]), json!(["database", "postgres"])];
    params.extend(extra.iter().map(|(k, v)| json!([k, v])));
    let hex = |q: &[u8]| q.iter().map(|b| format!("{b:02x}")).collect::<String>();
    json!({ "params": params, "queries": queries.iter().map(|q| hex(q)).collect::<Vec<_>>() })
}

fn error_code(answer: &Value) -> Option<&str> {
    answer.as_array()?.iter().find_map(|g| g["error"].as_str())
}

/// Reads, session settings and updates allowed; deletes denied; unknown denied.
const ENCODING_POLICY: &str = r#"
[[target]]
name = "db"
protocol = "postgres"
default = "deny"
on_unknown = "deny"

[[rule]]
id = "reads-and-updates"
verdict = "allow"
target = { name = ["db"] }
sql = { class = ["read", "session", "transaction", "update"] }

[[rule]]
id = "no-deletes"
verdict = "deny"
message = "no deletes"
target = { name = ["db"] }
sql = { class = ["delete"] }
"#;

/// Valid UTF-8 that is one string literal to a reader in UTF-8 (or any server encoding), and
/// in SJIS a string that ends early followed by a DELETE: `\xc2\x81` is U+0081 in UTF-8, but
/// in SJIS `\xc2` is a one-byte katakana and `\x81\x5c` one character, so the backslash no
/// longer escapes the quote after it.
const CRAFTED: &[u8] = b"SELECT E'\xc2\x81\\'; DELETE FROM victim; -- '";

#[test]
fn client_only_encodings_are_refused_on_every_route_and_a_crafted_statement_stays_a_string() {
    require_root();
    let topo = Topology::new("");
    let (pg, _daemon) = topo.postgres_target("scram-sha-256", ENCODING_POLICY);
    pg.admin_sql(
        &topo,
        "CREATE TABLE victim (id int); INSERT INTO victim SELECT generate_series(1, 10)",
    );

    // Each statement route to a client-only encoding (with aliases), then the crafted message.
    let routes: [&[u8]; 6] = [
        b"SET client_encoding = 'SJIS'",
        b"SET NAMES 'Shift_JIS'",
        b"SET client_encoding TO win932",
        b"SELECT set_config('client_encoding', 'sjis', false)",
        b"UPDATE pg_settings SET setting = 'SJIS' WHERE name = 'client_encoding'",
        b"SET \"CLIENT_ENCODING\" = 'BIG5'",
    ];
    let mut sessions: Vec<Value> = routes
        .iter()
        .map(|route| session(&pg, &[], &[route, b"SHOW client_encoding", CRAFTED]))
        .collect();
    // The startup routes: the parameter itself (PGCLIENTENCODING arrives as it) and `-c`.
    sessions.push(session(&pg, &[("client_encoding", "SJIS")], &[CRAFTED]));
    sessions.push(session(
        &pg,
        &[("options", "-c client_encoding=Shift-JIS")],
        &[CRAFTED],
    ));
    // A server encoding is ordinary session state, and reads the crafted message as UTF-8 does.
    sessions.push(session(
        &pg,
        &[],
        &[
            b"SET client_encoding = 'LATIN1'",
            b"SHOW client_encoding",
            CRAFTED,
        ],
    ));
    sessions.push(session(&pg, &[("client_encoding", "UTF8")], &[CRAFTED]));
    sessions.push(session(&pg, &[], &[b"SELECT count(*) FROM victim"]));
    let results = raw_sessions(&topo, &json!(sessions));

    for (route, r) in routes.iter().zip(&results) {
        let route = String::from_utf8_lossy(route);
        let q = r["queries"].as_array().unwrap();
        assert_eq!(error_code(&q[0]), Some("42501"), "{route}: {r}");
        assert!(
            q[0].to_string().contains("client-only encoding")
                || q[0].to_string().contains("pg_settings"),
            "{route}: the refusal says why: {r}"
        );
        assert_eq!(q[1][0]["row"][0], "UTF8", "{route}: {r}");
        assert_eq!(error_code(&q[2]), None, "{route}: {r}");
        assert_eq!(
            q[2][0]["row"][0], "\u{81}'; DELETE FROM victim; -- ",
            "{route}: one string, as the gateway read it: {r}"
        );
    }
    for r in &results[routes.len()..routes.len() + 2] {
        assert_eq!(r["startup"]["error"], "42501", "{r}");
        assert!(
            r["startup"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("client-only encoding")),
            "{r}"
        );
        assert!(r["queries"].as_array().unwrap().is_empty(), "{r}");
    }
    let latin1 = &results[routes.len() + 2]["queries"];
    assert_eq!(error_code(&latin1[0]), None, "{latin1}");
    assert_eq!(latin1[1][0]["row"][0], "LATIN1", "{latin1}");
    assert_eq!(error_code(&latin1[2]), None, "{latin1}");
    let utf8 = &results[routes.len() + 3];
    assert!(utf8["startup"].is_null(), "{utf8}");
    assert_eq!(error_code(&utf8["queries"][0]), None, "{utf8}");
    let count = &results[routes.len() + 4]["queries"][0];
    assert_eq!(count[0]["row"][0], "10", "the table is untouched: {count}");

    // Settings the role brings to every session (or the database, or the server's
    // configuration) arrive without a statement to judge: the login is refused when the server
    // reports them, unless the client's own startup parameter overrides them.
    pg.admin_sql(&topo, "ALTER ROLE admin SET client_encoding = 'SJIS'");
    let results = raw_sessions(
        &topo,
        &json!([
            session(&pg, &[], &[CRAFTED]),
            session(&pg, &[("client_encoding", "UTF8")], &[CRAFTED]),
        ]),
    );
    assert_eq!(results[0]["startup"]["error"], "08006", "{results:?}");
    assert!(
        results[0]["startup"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("client-only encoding")),
        "{results:?}"
    );
    assert_eq!(error_code(&results[1]["queries"][0]), None, "{results:?}");
    pg.admin_sql(
        &topo,
        "ALTER ROLE admin RESET client_encoding; ALTER ROLE admin SET standard_conforming_strings = off",
    );
    let results = raw_sessions(
        &topo,
        &json!([session(&pg, &[], &[b"SELECT count(*) FROM victim"])]),
    );
    assert_eq!(results[0]["startup"]["error"], "08006", "{results:?}");
    assert!(
        results[0]["startup"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("standard_conforming_strings")),
        "{results:?}"
    );
    pg.admin_sql(&topo, "ALTER ROLE admin RESET standard_conforming_strings");
    let results = raw_sessions(
        &topo,
        &json!([session(&pg, &[], &[b"SELECT count(*) FROM victim"])]),
    );
    assert_eq!(
        results[0]["queries"][0][0]["row"][0], "10",
        "the table is untouched: {results:?}"
    );
}

/// Reads of public tables allowed, nothing else named; unknown denied.
const SEARCH_PATH_POLICY: &str = r#"
[[target]]
name = "db"
protocol = "postgres"
default = "deny"
on_unknown = "deny"

[[rule]]
id = "public-reads"
verdict = "allow"
target = { name = ["db"] }
sql = { class = ["read"], objects = ["public.*"] }

[[rule]]
id = "session"
verdict = "allow"
target = { name = ["db"] }
sql = { class = ["session", "transaction"] }
"#;

#[test]
fn search_path_cannot_move_unqualified_names_and_table_is_a_read() {
    require_root();
    let topo = Topology::new("");
    let (pg, _daemon) = topo.postgres_target("scram-sha-256", SEARCH_PATH_POLICY);
    pg.admin_sql(
        &topo,
        "CREATE SCHEMA secret; CREATE TABLE secret.accounts (note text); \
         INSERT INTO secret.accounts VALUES ('classified'); \
         CREATE TABLE public.notes (note text); INSERT INTO public.notes VALUES ('public note')",
    );
    let read: &[u8] = b"SELECT note FROM accounts";
    let routes: [&[u8]; 4] = [
        b"SET search_path = secret",
        b"SET search_path TO secret, public",
        b"SELECT set_config('search_path', 'secret', false)",
        b"SET SCHEMA 'secret'",
    ];
    let mut sessions: Vec<Value> = routes
        .iter()
        .map(|route| session(&pg, &[], &[route, read]))
        .collect();
    sessions.push(session(&pg, &[("search_path", "secret")], &[read]));
    sessions.push(session(
        &pg,
        &[("options", "-c search_path=secret,public")],
        &[read],
    ));
    // The default path passes by every route; TABLE reads like SELECT * FROM.
    sessions.push(session(
        &pg,
        &[("search_path", "\"$user\", public")],
        &[
            b"SET search_path = \"$user\", public",
            b"RESET search_path",
            b"TABLE notes",
            b"TABLE secret.accounts",
            b"SELECT * FROM (TABLE secret.accounts) s",
        ],
    ));
    let results = raw_sessions(&topo, &json!(sessions));
    assert!(
        !json!(results).to_string().contains("classified"),
        "the secret schema leaked: {results:#?}"
    );
    for (route, r) in routes.iter().zip(&results) {
        let route = String::from_utf8_lossy(route);
        let q = r["queries"].as_array().unwrap();
        assert_eq!(error_code(&q[0]), Some("42501"), "{route}: {r}");
        assert!(
            q[0].to_string().contains("resolve elsewhere"),
            "{route}: {r}"
        );
        // The read is allowed as public.accounts, and the server finds no such table.
        assert_eq!(error_code(&q[1]), Some("42P01"), "{route}: {r}");
    }
    for r in &results[routes.len()..routes.len() + 2] {
        assert_eq!(r["startup"]["error"], "42501", "{r}");
        assert!(
            r["startup"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("search_path")),
            "{r}"
        );
    }
    let default = &results[routes.len() + 2];
    assert!(default["startup"].is_null(), "{default}");
    let q = default["queries"].as_array().unwrap();
    assert_eq!(error_code(&q[0]), None, "{default}");
    assert_eq!(error_code(&q[1]), None, "{default}");
    assert_eq!(q[2][0]["row"][0], "public note", "{default}");
    assert_eq!(error_code(&q[3]), Some("42501"), "{default}");
    assert_eq!(error_code(&q[4]), Some("42501"), "{default}");
}

/// Names as the server resolves them (issue #12): with a UTF8 database an unquoted name loses
/// its ASCII capitals only, every name is cut to 63 bytes, and an unqualified catalog name is
/// found in `pg_catalog` before `public`. A deny rule on the name the server uses holds
/// whatever spelling reaches it, and a `public.*` allow rule does not cover the catalog.
#[test]
fn names_resolve_as_the_server_resolves_them() {
    require_root();
    let long = "s".repeat(63);
    let policy = format!(
        "{SEARCH_PATH_POLICY}\n[[rule]]\nid = \"no-secrets\"\nverdict = \"deny\"\n\
         target = {{ name = [\"db\"] }}\nsql = {{ objects = [\"public.É\", \"public.{long}\"] }}\n"
    );
    let topo = Topology::new("");
    let (pg, _daemon) = topo.postgres_target("scram-sha-256", &policy);
    pg.admin_sql(
        &topo,
        &format!(
            "CREATE TABLE public.\"É\" (v text); INSERT INTO public.\"É\" VALUES ('secret-upper'); \
             CREATE TABLE public.\"é\" (v text); INSERT INTO public.\"é\" VALUES ('plain-lower'); \
             CREATE TABLE public.{long} (v text); INSERT INTO public.{long} VALUES ('secret-long'); \
             CREATE TABLE public.notes (v text); INSERT INTO public.notes VALUES ('public note')"
        ),
    );
    let longer = format!("SELECT v FROM {long}xyz");
    let quoted = format!("SELECT v FROM \"{long}XYZ\"");
    let queries: [&[u8]; 8] = [
        "SELECT v FROM É".as_bytes(),
        "SELECT v FROM é".as_bytes(),
        longer.as_bytes(),
        quoted.as_bytes(),
        b"SELECT usename FROM pg_stat_activity",
        b"SELECT rolname FROM pg_roles",
        b"SELECT * FROM pg_stat_get_activity(NULL)",
        b"SELECT v FROM notes",
    ];
    let results = raw_sessions(&topo, &json!([session(&pg, &[], &queries)]));
    assert!(
        !json!(results).to_string().contains("secret-"),
        "a denied table was read: {results:#?}"
    );
    let q = results[0]["queries"].as_array().unwrap();
    for i in [0, 2, 3, 4, 5, 6] {
        assert_eq!(
            error_code(&q[i]),
            Some("42501"),
            "{}: {}",
            String::from_utf8_lossy(queries[i]),
            q[i]
        );
    }
    assert_eq!(q[1][0]["row"][0], "plain-lower", "{}", q[1]);
    assert_eq!(q[7][0]["row"][0], "public note", "{}", q[7]);
}
