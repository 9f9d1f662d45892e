//! Writes hidden behind server objects (issue #12): a plain `SELECT` from a view that calls a
//! volatile function writes, and the gateway cannot see into the view. When the rules that
//! apply to a session allow nothing that writes, the gateway opens the upstream session
//! read-only and the server refuses the write; every way of turning that off is judged as a
//! write. Against a real PostgreSQL 15, through psql.

use std::process::Command;

use bulkhead_tests::{require_root, system_user, PgServer, Side, Topology};

const READS_ONLY: &str = r#"
[[target]]
name = "db"
protocol = "postgres"
default = "deny"

[[rule]]
id = "reads"
verdict = "allow"
target = { name = ["db"] }
sql = { class = ["read", "transaction", "session"] }
"#;

const READS_AND_INSERTS: &str = r#"
[[target]]
name = "db"
protocol = "postgres"
default = "deny"

[[rule]]
id = "reads-and-inserts"
verdict = "allow"
target = { name = ["db"] }
sql = { class = ["read", "transaction", "session", "insert"] }
"#;

/// A table, a function that writes into it, and a view over the function: `SELECT * FROM
/// tally` reads as a plain read to anything that does not look inside the view.
const HIDDEN_WRITE: &str = "CREATE TABLE audit (x int); \
     CREATE FUNCTION bump() RETURNS int LANGUAGE sql VOLATILE AS \
     'INSERT INTO audit VALUES (1) RETURNING 1'; \
     CREATE VIEW tally AS SELECT bump() AS x; \
     GRANT ALL ON audit, tally TO PUBLIC";

/// psql through the gateway from the governed side, without TLS; stdout and stderr.
fn psql(topo: &Topology, pg: &PgServer, script: &str) -> (String, String) {
    let (_, out, err) = topo.psql(pg, script, &[("PGSSLMODE", "disable")]);
    (out, err)
}

/// Rows in `audit`, read on the server directly.
fn audit_rows(topo: &Topology, pg: &PgServer) -> String {
    let mut cmd = Command::new("psql");
    cmd.args(["-X", "-At", "-h", &pg.data.display().to_string()])
        .args([
            "-U",
            "admin",
            "-d",
            "postgres",
            "-c",
            "SELECT count(*) FROM audit",
        ]);
    let out = topo.output_as(Side::Target, Some(system_user("postgres")), cmd);
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn upstream_auth_method(topo: &Topology) -> String {
    let session = topo.wait_session_closed();
    let events = topo.events(&session["id"]);
    let auth = events
        .iter()
        .find(|e| e["type"] == "auth" && e["side"] == "upstream")
        .unwrap_or_else(|| panic!("{events:?}"));
    auth["method"].as_str().unwrap().to_string()
}

#[test]
fn a_session_whose_rules_allow_no_writes_is_read_only_at_the_server() {
    require_root();
    let topo = Topology::new("");
    let (pg, _daemon) = topo.postgres_target("scram-sha-256", READS_ONLY);
    pg.admin_sql(&topo, HIDDEN_WRITE);

    let (out, err) = psql(
        &topo,
        &pg,
        "SHOW default_transaction_read_only;\n\
         SELECT * FROM tally;\n\
         RESET ALL;\n\
         SELECT * FROM tally;\n\
         DISCARD ALL;\n\
         SELECT * FROM tally;\n\
         SET default_transaction_read_only = off;\n\
         SET SESSION CHARACTERISTICS AS TRANSACTION READ WRITE;\n\
         BEGIN READ WRITE;\n\
         SELECT set_config('default_transaction_read_only', 'off', false);\n\
         SELECT * FROM tally;\n\
         SELECT 'still here';\n",
    );
    assert!(out.starts_with("on\n"), "{out}\n{err}");
    assert_eq!(
        err.matches("cannot execute INSERT in a read-only transaction")
            .count(),
        4,
        "the view's write is refused by the server every time, RESET and DISCARD included: {err}"
    );
    assert_eq!(
        err.matches("ERROR:  bulkhead").count(),
        4,
        "each way of turning read-only off is denied by the gateway: {err}"
    );
    assert!(
        out.contains("still here"),
        "the session stays usable: {out}"
    );
    assert_eq!(audit_rows(&topo, &pg), "0", "nothing was written");
    let method = upstream_auth_method(&topo);
    assert!(
        method.contains("read-only (server-enforced"),
        "recorded: {method}"
    );
}

#[test]
fn a_session_whose_rules_allow_writes_is_not_read_only() {
    require_root();
    let topo = Topology::new("");
    let (pg, _daemon) = topo.postgres_target("scram-sha-256", READS_AND_INSERTS);
    pg.admin_sql(&topo, HIDDEN_WRITE);
    let (out, err) = psql(&topo, &pg, "SELECT * FROM tally;\n");
    assert_eq!(out.trim(), "1", "{err}");
    assert_eq!(audit_rows(&topo, &pg), "1", "the allowed session wrote");
    assert!(!upstream_auth_method(&topo).contains("read-only"));
}
