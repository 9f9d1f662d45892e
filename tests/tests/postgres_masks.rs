//! Column masks through expressions, against a real PostgreSQL 15 through the gateway: an
//! output column computed from a masked column (functions, casts, concatenation, encodings,
//! JSON builders, aggregates, subqueries, CTEs, set operations, views) is masked; one computed
//! from other columns, or over an unrelated table, is not. Simple and extended protocol, and
//! COPY (query) TO STDOUT. A rule on a table covers its partitions and `INHERITS` children,
//! and one on a partition covers reading it through its parent: masks, and deny rules that
//! name tables.

use bulkhead_tests::{require_root, PgServer, Topology, TARGET_V4};
use serde_json::{json, Value};

/// Target `db`: reads allowed, unknown statements denied; `public.users.ssn` masked; two
/// functions of the test's vouched for.
const POLICY: &str = r#"
[[target]]
name = "db"
protocol = "postgres"
default = "deny"
on_unknown = "deny"
# Vouched for by the policy; what they read is still not known to the gateway.
read_only_functions = ["rows_of_users", "leak"]

[[rule]]
id = "db-read"
verdict = "allow"
target = { name = ["db"] }
sql = { class = ["read", "transaction", "session"] }

[[rule]]
id = "ssn-column"
verdict = "mask"
target = { name = ["db"] }
mask = { columns = ["public.users.ssn"], style = "redact" }
"#;

/// Added to [`POLICY`]: a rule on one partition's column only, and one on a table
/// partitioned twice over (tables the test of kin makes).
const KIN_RULE: &str = r#"
[[rule]]
id = "kin-ssn"
verdict = "mask"
target = { name = ["db"] }
mask = { columns = ["public.ev_eu.ssn", "public.up.ssn"], style = "redact" }
"#;

const SECRET: &str = "123-45-6789";
const OTHER: &str = "987-65-4321";

fn psql(topo: &Topology, pg: &PgServer, script: &str) -> (String, String) {
    let (_, out, err) = topo.psql(pg, script, &[]);
    (out, err)
}

fn setup() -> (Topology, PgServer, bulkhead_tests::Proc) {
    setup_with(POLICY)
}

fn setup_with(policy: &str) -> (Topology, PgServer, bulkhead_tests::Proc) {
    let topo = Topology::new("");
    let (pg, daemon) = topo.postgres_target("scram-sha-256", policy);
    pg.admin_sql(
        &topo,
        "CREATE TABLE users (id int, name text, ssn text); \
         INSERT INTO users VALUES (1, 'alice', '123-45-6789'); \
         CREATE TABLE other (id int, ssn text); \
         INSERT INTO other VALUES (2, '987-65-4321'); \
         CREATE VIEW v AS SELECT id, ssn, name FROM users; \
         CREATE VIEW vv AS SELECT upper(ssn) AS s, name FROM v; \
         CREATE VIEW vo AS SELECT id, ssn FROM other; \
         CREATE FUNCTION leak() RETURNS text LANGUAGE sql AS 'SELECT ssn FROM users LIMIT 1'; \
         CREATE VIEW vf AS SELECT leak() AS x, 1 AS one; \
         CREATE FUNCTION rows_of_users() RETURNS SETOF users LANGUAGE sql AS 'SELECT * FROM users'",
    );
    (topo, pg, daemon)
}

/// Each statement, one line of output each, with what it must print through the gateway.
const SIMPLE: &[(&str, &str)] = &[
    ("SELECT upper(ssn) FROM users", "[redacted]"),
    ("SELECT ssn || '' FROM users", "[redacted]"),
    ("SELECT substr(ssn, 1, 3) FROM users", "[redacted]"),
    ("SELECT CAST(ssn AS varchar(20)) FROM users", "[redacted]"),
    ("SELECT ssn::bytea FROM users", "[redacted]"),
    (
        "SELECT encode(convert_to(ssn, 'UTF8'), 'base64') FROM users",
        "[redacted]",
    ),
    ("SELECT row_to_json(u) FROM users u", "[redacted]"),
    ("SELECT to_jsonb(u.*) FROM users u", "[redacted]"),
    ("SELECT json_agg(u.ssn) FROM users u", "[redacted]"),
    ("SELECT string_agg(ssn, ',') FROM users", "[redacted]"),
    ("SELECT (SELECT ssn FROM users LIMIT 1)", "[redacted]"),
    (
        "WITH c AS (SELECT ssn AS s FROM users) SELECT upper(s) FROM c",
        "[redacted]",
    ),
    (
        "SELECT x FROM (SELECT 'n' AS x UNION ALL SELECT ssn FROM users) t WHERE x <> 'n'",
        "[redacted]",
    ),
    (
        "SELECT ssn FROM users UNION SELECT ssn FROM users",
        "[redacted]",
    ),
    ("SELECT (u).ssn FROM users u", "[redacted]"),
    ("SELECT u::text FROM users u", "[redacted]"),
    ("SELECT users FROM users", "[redacted]"),
    ("SELECT array_agg(u) FROM users u", "[redacted]"),
    (
        "SELECT json_build_object('s', ssn) FROM users",
        "[redacted]",
    ),
    ("SELECT format('%s', ssn) FROM users", "[redacted]"),
    (
        "SELECT t.x FROM users u, LATERAL (SELECT u.ssn AS x) t",
        "[redacted]",
    ),
    (
        "SELECT * FROM (SELECT upper(ssn), name FROM users) s",
        "[redacted]|alice",
    ),
    (
        r#"SELECT "S" || '' FROM (SELECT ssn AS "S" FROM users) s GROUP BY 1"#,
        "[redacted]",
    ),
    // Views: plain columns (the view's own OID in the RowDescription) and expressions.
    ("SELECT ssn, name FROM v", "[redacted]|alice"),
    ("SELECT lower(ssn) FROM v", "[redacted]"),
    ("SELECT s, name FROM vv", "[redacted]|alice"),
    // A view over a function the gateway cannot see into: masked whole.
    ("SELECT x, one FROM vf", "[redacted]|[redacted]"),
    // Functions the gateway cannot see into: every computed column, and table function's.
    ("SELECT leak(), 1", "[redacted]|[redacted]"),
    (
        "SELECT * FROM rows_of_users()",
        "[redacted]|[redacted]|[redacted]",
    ),
    // What does not read the masked column passes unchanged.
    (
        "SELECT upper(name), id + 1, count(*) OVER () FROM users",
        "ALICE|2|1",
    ),
    (
        "SELECT upper(ssn), ssn || '!' FROM other",
        "987-65-4321|987-65-4321!",
    ),
    (
        "SELECT row_to_json(o) FROM other o",
        "{\"id\":2,\"ssn\":\"987-65-4321\"}",
    ),
    ("SELECT ssn, lower(ssn) FROM vo", "987-65-4321|987-65-4321"),
    ("SELECT 40 + 2, now() IS NOT NULL", "42|t"),
];

#[test]
fn expressions_over_a_masked_column_are_masked_in_simple_queries_and_copy() {
    require_root();
    let (topo, pg, _daemon) = setup();
    let script: String = SIMPLE
        .iter()
        .map(|(sql, _)| format!("{sql};\n"))
        .collect::<String>()
        + "\\copy (SELECT name, upper(ssn) FROM users) to stdout\n\
           \\copy (SELECT ssn, name FROM v) to stdout\n\
           \\copy (SELECT ssn || '' FROM other) to stdout\n\
           PREPARE p AS SELECT upper(ssn), length(name) FROM users;\n\
           EXECUTE p;\n\
           BEGIN;\n\
           DECLARE c CURSOR FOR SELECT ssn || '', id FROM users;\n\
           FETCH ALL FROM c;\n\
           COMMIT;\n";
    let (out, err) = psql(&topo, &pg, &script);
    assert!(err.is_empty(), "{err}");
    let lines: Vec<&str> = out.lines().collect();
    let mut want: Vec<&str> = SIMPLE.iter().map(|(_, w)| *w).collect();
    want.extend([
        "alice\t[redacted]",
        "[redacted]\talice",
        "987-65-4321",
        // What an SQL-level prepared statement or cursor runs is not in the text that runs
        // it: its computed columns are masked, its table columns keep their own rules.
        "[redacted]|[redacted]",
        "[redacted]|1",
    ]);
    for (i, (got, want)) in lines.iter().zip(&want).enumerate() {
        let sql = SIMPLE
            .get(i)
            .map_or("a COPY, EXECUTE or FETCH", |(s, _)| *s);
        assert_eq!(got, want, "{sql}");
    }
    assert_eq!(lines.len(), want.len(), "{out}");
    assert!(
        !out.contains(SECRET) && !out.contains("MTIzLTQ1LTY3ODk="),
        "{out}"
    );
    assert!(out.contains(OTHER));

    // The record: every statement that masked says so, and by which rule.
    let session = topo.wait_session_closed();
    let shown = topo
        .run_cli(&["sessions", "show", &session["id"].to_string(), "--json"])
        .unwrap();
    let masked: Vec<(u64, Value)> = shown["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"] == "response")
        .filter_map(|e| Some((e["masked_rows"].as_u64()?, e["mask_rules"].clone())))
        .collect();
    let expected = SIMPLE
        .iter()
        .filter(|(_, w)| w.contains("[redacted]"))
        .count()
        + 4;
    assert_eq!(
        masked,
        vec![(1, json!(["ssn-column"])); expected],
        "{shown}"
    );

    // A failed cast quotes its input in the error: withheld; an error about a name is not.
    let (out, err) = psql(
        &topo,
        &pg,
        "SELECT ssn::int FROM users;\n\
         SELECT (SELECT ssn FROM users)::numeric;\n\
         SELECT nosuch FROM users;\n\
         SELECT 'still here';\n",
    );
    assert!(!err.contains(SECRET), "{err}");
    assert_eq!(
        err.matches("message is withheld (SQLSTATE 22P02)").count(),
        2,
        "{err}"
    );
    assert!(err.contains("column \"nosuch\" does not exist"), "{err}");
    assert_eq!(out.trim(), "still here");
}

#[test]
fn expressions_over_a_masked_column_are_masked_in_the_extended_protocol() {
    require_root();
    let (topo, _pg, _daemon) = setup();
    // tokio-postgres: each statement prepared (Parse, Describe), then executed with binary
    // results in another round trip.
    let v = topo.pg_client(&[
        "query",
        "SELECT upper(ssn), upper(name) FROM users",
        "SELECT ssn || '' AS s, id FROM users",
        "SELECT string_agg(ssn, ',') FROM users",
        "SELECT (SELECT ssn FROM users LIMIT 1)",
        "SELECT ssn, lower(ssn) FROM v",
        "SELECT upper(ssn), ssn FROM other",
    ]);
    assert_eq!(
        v,
        json!([
            [["[redacted]", "ALICE"]],
            [["[redacted]", "1"]],
            [["[redacted]"]],
            [["[redacted]"]],
            [["[redacted]", "[redacted]"]],
            [[OTHER, OTHER]]
        ])
    );

    // psycopg: a named prepared statement described once and executed many times, text and
    // binary, and a pipeline.
    let script = format!(
        r#"
import json, psycopg
out = {{}}
conn = psycopg.connect("host={TARGET_V4} user=admin dbname=postgres", autocommit=True)
q = "SELECT upper(ssn), name, ssn || '' FROM users WHERE id = %s"
out["prepared"] = [list(conn.execute(q, (1,), prepare=True).fetchone()) for _ in range(4)]
out["binary"] = list(conn.execute(q, (1,), binary=True).fetchone())
with conn.pipeline():
    a = conn.execute("SELECT upper(ssn) FROM other WHERE id = %s", (2,))
    b = conn.execute("SELECT encode(convert_to(ssn, 'UTF8'), 'base64') FROM users WHERE id = %s", (1,))
out["pipeline"] = [a.fetchone()[0], b.fetchone()[0]]
print(json.dumps(out))
"#
    );
    let v: Value = serde_json::from_str(topo.python(&script).trim()).unwrap();
    let masked_row = json!(["[redacted]", "alice", "[redacted]"]);
    assert_eq!(
        v["prepared"],
        json!([masked_row, masked_row, masked_row, masked_row])
    );
    assert_eq!(v["binary"], masked_row);
    assert_eq!(v["pipeline"], json!([OTHER, "[redacted]"]));
}

/// A child's rows are its parent's: a partition (at any depth) or an `INHERITS` child of a
/// masked table is masked, read directly, through a view, by COPY or in an expression, in
/// simple and extended queries; a rule on one partition masks its parent's column (the rows
/// cannot be told apart) and not its sibling's.
#[test]
fn partitions_and_inheriting_tables_share_their_kin_column_rules() {
    require_root();
    let (topo, pg, _daemon) = setup_with(&format!("{POLICY}{KIN_RULE}"));
    pg.admin_sql(
        &topo,
        "CREATE TABLE kid (extra int) INHERITS (users); \
         INSERT INTO kid VALUES (3, 'bob', '123-45-6789', 5); \
         CREATE VIEW vk AS SELECT name, ssn FROM kid; \
         CREATE TABLE ev (id int, ssn text) PARTITION BY LIST (id); \
         CREATE TABLE ev_eu PARTITION OF ev FOR VALUES IN (1); \
         CREATE TABLE ev_us PARTITION OF ev FOR VALUES IN (2) PARTITION BY LIST (id); \
         CREATE TABLE ev_us_1 PARTITION OF ev_us FOR VALUES IN (2); \
         INSERT INTO ev VALUES (1, '123-45-6789'), (2, '987-65-4321'); \
         CREATE TABLE up (id int, ssn text) PARTITION BY RANGE (id); \
         CREATE TABLE up_1 PARTITION OF up FOR VALUES FROM (0) TO (10) PARTITION BY RANGE (id); \
         CREATE TABLE up_1_a PARTITION OF up_1 FOR VALUES FROM (0) TO (5); \
         INSERT INTO up VALUES (1, '987-65-4321');",
    );
    let cases: &[(&str, &str)] = &[
        ("SELECT name, ssn FROM kid", "bob|[redacted]"),
        ("SELECT upper(ssn), extra FROM kid", "[redacted]|5"),
        ("SELECT * FROM vk", "bob|[redacted]"),
        ("SELECT name, ssn FROM ONLY users", "alice|[redacted]"),
        ("SELECT ssn FROM ev WHERE id = 2", "[redacted]"),
        ("SELECT ssn FROM ONLY ev_eu", "[redacted]"),
        ("SELECT ssn FROM ev_us", "987-65-4321"),
        ("SELECT ssn || '' FROM ev_us_1", "987-65-4321"),
        ("SELECT ssn FROM up_1_a", "[redacted]"),
        ("SELECT id FROM up_1_a", "1"),
    ];
    let script: String = cases
        .iter()
        .map(|(sql, _)| format!("{sql};\n"))
        .collect::<String>()
        + "\\copy kid to stdout\n\\copy (SELECT ssn FROM ev_eu) to stdout\n";
    let (out, err) = psql(&topo, &pg, &script);
    assert!(err.is_empty(), "{err}");
    let lines: Vec<&str> = out.lines().collect();
    let mut want: Vec<&str> = cases.iter().map(|(_, w)| *w).collect();
    want.extend(["3\tbob\t[redacted]\t5", "[redacted]"]);
    assert_eq!(lines, want, "{script}");

    // The extended protocol, binary results.
    let v = topo.pg_client(&[
        "query",
        "SELECT ssn, name FROM kid",
        "SELECT ssn FROM ev",
        "SELECT ssn FROM ev_us_1",
    ]);
    assert_eq!(
        v,
        json!([
            [["[redacted]", "bob"]],
            [["[redacted]"], ["[redacted]"]],
            [[OTHER]]
        ])
    );
}

/// A name looked up at run time is quoted by the error that says it is not there: reading a
/// masked column as a relation, schema, role, operator, type or setting name would print it.
/// Those messages are withheld; one about the statement's own text is not.
#[test]
fn errors_quoting_a_name_from_a_masked_column_are_withheld() {
    require_root();
    let (topo, pg, _daemon) = setup();
    let leaks = [
        "SELECT ssn::regclass FROM users",
        "SELECT ssn::regoper FROM users",
        "SELECT ssn::regnamespace FROM users",
        "SELECT ssn::regrole FROM users",
        "SELECT ssn::regtype FROM users",
        "SELECT current_setting(ssn) FROM users",
        "SELECT has_table_privilege(ssn, 'select') FROM users",
        "SELECT has_database_privilege(ssn, 'connect') FROM users",
        "SELECT upper(ssn)::regclass FROM v",
    ];
    let script: String = leaks
        .iter()
        .map(|sql| format!("{sql};\n"))
        .collect::<String>()
        + "SELECT nosuch FROM users;\n\
           SELECT 'x'::regclass;\n\
           SELECT * FROM nosuch;\n\
           SELECT 'still here';\n";
    let (out, err) = psql(&topo, &pg, &script);
    assert!(!err.contains(SECRET) && !err.contains("123"), "{err}");
    assert_eq!(
        err.matches("message is withheld").count(),
        leaks.len(),
        "{err}"
    );
    for kept in [
        "column \"nosuch\" does not exist",
        "relation \"x\" does not exist",
        "relation \"nosuch\" does not exist",
    ] {
        assert!(err.contains(kept), "{kept}: {err}");
    }
    assert_eq!(out.trim(), "still here");
}

/// Added to [`POLICY`]: NOTIFY and `pg_notify`.
const NOTIFY_RULE: &str = r#"
[[rule]]
id = "db-notify"
verdict = "allow"
target = { name = ["db"] }
sql = { class = ["read", "notify"] }
"#;

/// A notification's payload cannot be told apart from a masked column's value
/// (`pg_notify('c', ssn)`): under a column rule it is withheld, the channel kept.
#[test]
fn notification_payloads_are_withheld_under_a_column_rule() {
    require_root();
    let (topo, pg, _daemon) = setup_with(&format!("{POLICY}{NOTIFY_RULE}"));
    let (out, err) = psql(
        &topo,
        &pg,
        "LISTEN c;\nSELECT pg_notify('c', ssn) FROM users;\nNOTIFY c, 'plain';\nSELECT 'still here';\n",
    );
    assert!(err.is_empty(), "{err}");
    let withheld = "payload \"[bulkhead: payload withheld under a column mask rule]\"";
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 4, "{out}");
    assert_eq!(
        lines[0], "[redacted]",
        "pg_notify's own column: computed from ssn"
    );
    for line in &lines[1..3] {
        assert!(
            line.starts_with("Asynchronous notification \"c\" with ") && line.contains(withheld),
            "{out}"
        );
    }
    assert_eq!(lines[3], "still here");
}

/// A setting given a masked column's value would keep it as session state, which `SHOW`,
/// `current_setting` and (for `application_name`) ParameterStatus hand back as a constant:
/// `set_config` of a value the statement computes is refused; a given value is not.
#[test]
fn session_settings_cannot_keep_a_masked_value() {
    require_root();
    let (topo, pg, _daemon) = setup();
    let (out, err) = psql(
        &topo,
        &pg,
        "SELECT set_config('my.x', ssn, false) FROM users;\n\
         SELECT set_config('application_name', (SELECT ssn FROM users), false);\n\
         SHOW application_name;\n\
         SELECT coalesce(current_setting('my.x', true), 'unset');\n\
         SELECT set_config('my.y', 'given', false);\n\
         SHOW my.y;\n",
    );
    assert!(
        !out.contains(SECRET) && !err.contains(SECRET),
        "{out} {err}"
    );
    assert_eq!(
        err.matches("ERROR:  bulkhead:").count(),
        2,
        "both set_config calls refused: {err}"
    );
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        ["psql", "unset", "given", "given"],
        "{out}"
    );
}

/// The planner's statistics keep sample values of every column (`pg_stats`,
/// `pg_stats_ext`, `pg_statistic`): under a column rule those are masked, and the rest of
/// the statistics (names, fractions) is not.
#[test]
fn statistics_do_not_show_sampled_values_under_a_column_rule() {
    require_root();
    let (topo, pg, _daemon) = setup();
    pg.admin_sql(
        &topo,
        "INSERT INTO users SELECT 1, 'alice', '123-45-6789' FROM generate_series(1, 50); \
         INSERT INTO users SELECT 2, 'bob', '234-56-7890' FROM generate_series(1, 50); \
         CREATE STATISTICS users_mcv (mcv) ON id, ssn FROM users; \
         ANALYZE users;",
    );
    let (out, err) = psql(
        &topo,
        &pg,
        "SELECT attname, most_common_vals, null_frac FROM pg_stats \
           WHERE tablename = 'users' AND attname IN ('id', 'ssn') ORDER BY 1;\n\
         SELECT array_to_string(most_common_vals, ',') FROM pg_stats \
           WHERE tablename = 'users' AND attname = 'ssn';\n\
         SELECT most_common_vals FROM pg_stats_ext WHERE tablename = 'users';\n\
         SELECT count(*) > 1 FROM pg_statistic WHERE starelid = 'users'::regclass;\n\
         SELECT stavalues1 FROM pg_statistic WHERE starelid = 'users'::regclass AND staattnum = 3;\n",
    );
    assert!(err.is_empty(), "{err}");
    assert!(
        !out.contains(SECRET) && !out.contains("234-56-7890"),
        "{out}"
    );
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        [
            "id|[redacted]|0",
            "ssn|[redacted]|0",
            "[redacted]",
            "[redacted]",
            "t",
            "[redacted]"
        ],
        "{out}"
    );
}

/// A stored generated column computed from a masked column is masked as it is, read
/// directly, in an expression, by `COPY (query)` or by a driver; one computed from other
/// columns is not.
#[test]
fn generated_columns_are_masked_as_what_they_are_computed_from() {
    require_root();
    let rule = r#"
[[rule]]
id = "people-ssn"
verdict = "mask"
target = { name = ["db"] }
mask = { columns = ["public.people.ssn"], style = "redact" }
"#;
    let (topo, pg, _daemon) = setup_with(&format!("{POLICY}{rule}"));
    pg.admin_sql(
        &topo,
        "CREATE TABLE people (id int, ssn text, \
           \"Tail\" text GENERATED ALWAYS AS (right(ssn, 4)) STORED, \
           twice int GENERATED ALWAYS AS (id * 2) STORED); \
         INSERT INTO people (id, ssn) VALUES (1, '123-45-6789');",
    );
    let (out, err) = psql(
        &topo,
        &pg,
        "SELECT \"Tail\", twice FROM people;\n\
         SELECT lower(\"Tail\") || twice FROM people;\n\
         \\copy (SELECT \"Tail\", twice FROM people) to stdout\n",
    );
    assert!(err.is_empty(), "{err}");
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        ["[redacted]|2", "[redacted]", "[redacted]\t2"],
        "{out}"
    );
    let v = topo.pg_client(&["query", "SELECT \"Tail\", twice FROM people"]);
    assert_eq!(v, json!([[["[redacted]", "2"]]]));
}

/// Names in a statement are read as the server reads them (UTF8: only ASCII capitals fold;
/// cut to 63 bytes), so a computed column over a table the statement names unquoted with a
/// non-ASCII capital, or with a name past 63 bytes, is still traced to the masked column.
#[test]
fn statement_names_fold_as_the_server_folds_them() {
    require_root();
    let long = "l".repeat(63);
    let rule = format!(
        r#"
[[rule]]
id = "odd-names"
verdict = "mask"
target = {{ name = ["db"] }}
mask = {{ columns = ["public.Über.ssn", "public.{long}.ssn"], style = "redact" }}
"#
    );
    let (topo, pg, _daemon) = setup_with(&format!("{POLICY}{rule}"));
    pg.admin_sql(
        &topo,
        &format!(
            "CREATE TABLE \"Über\" (ssn text); INSERT INTO \"Über\" VALUES ('123-45-6789'); \
             CREATE TABLE {long} (ssn text); INSERT INTO {long} VALUES ('123-45-6789');"
        ),
    );
    let (out, err) = psql(
        &topo,
        &pg,
        &format!(
            "SELECT upper(ssn) FROM Über;\nSELECT upper(x.ssn) FROM Über x;\n\
             SELECT upper(ssn) FROM {long}xyz;\nSELECT upper({long}xyz.ssn) FROM {long};\n"
        ),
    );
    assert!(!err.contains("ERROR"), "{err}");
    assert_eq!(out.lines().collect::<Vec<_>>(), ["[redacted]"; 4], "{out}");
}

/// Added to [`POLICY`]: reads of `ev` (partitioned) and of `kid` (an `INHERITS` child of
/// `users`) denied by name.
const DENY_KIN_RULES: &str = r#"
[[rule]]
id = "no-ev"
verdict = "deny"
target = { name = ["db"] }
sql = { objects = ["public.ev"] }
message = "no ev"

[[rule]]
id = "no-kid"
verdict = "deny"
target = { name = ["db"] }
sql = { objects = ["public.kid"] }
message = "no kid"
"#;

/// A deny rule that names a table covers its partitions at any depth (their rows are its
/// rows), and one that names a child covers its parent (the parent's rows include the
/// child's); a sibling, or a table of no kin, is not covered.
#[test]
fn a_deny_rule_on_a_table_covers_the_tables_that_share_its_rows() {
    require_root();
    let (topo, pg, _daemon) = setup_with(&format!("{POLICY}{DENY_KIN_RULES}"));
    pg.admin_sql(
        &topo,
        "CREATE TABLE kid (extra int) INHERITS (users); \
         CREATE TABLE ev (id int, ssn text) PARTITION BY LIST (id); \
         CREATE TABLE ev_eu PARTITION OF ev FOR VALUES IN (1); \
         CREATE TABLE ev_us PARTITION OF ev FOR VALUES IN (2) PARTITION BY LIST (id); \
         CREATE TABLE ev_us_1 PARTITION OF ev_us FOR VALUES IN (2); \
         CREATE TABLE solo (id int); INSERT INTO solo VALUES (7);",
    );
    let (out, err) = psql(
        &topo,
        &pg,
        "SELECT count(*) FROM ev;\n\
         SELECT count(*) FROM ev_eu;\n\
         SELECT count(*) FROM ev_us_1;\n\
         SELECT count(*) FROM users;\n\
         SELECT id FROM solo;\n\
         SELECT count(*) FROM other;\n",
    );
    assert_eq!(err.matches("ERROR:  bulkhead: no ev").count(), 3, "{err}");
    assert_eq!(err.matches("ERROR:  bulkhead: no kid").count(), 1, "{err}");
    assert_eq!(out.lines().collect::<Vec<_>>(), ["7", "1"], "{out}");
}

/// A cursor declared by SQL is a portal the extended protocol can Describe and Execute by
/// name: its rows are masked as a FETCH's are (table columns by their rule, computed ones as
/// unknown), with or without a Describe first. A raw client sends the exact messages.
#[test]
fn a_cursor_declared_by_sql_and_executed_as_a_portal_is_masked() {
    require_root();
    let (topo, pg, _daemon) = setup();
    pg.admin_sql(&topo, "INSERT INTO users VALUES (2, 'bob', '234-56-7890');");
    let script = format!(
        r#"
import json, socket, struct
s = socket.create_connection(("{TARGET_V4}", 5432))
params = b"user\x00{user}\x00database\x00postgres\x00\x00"
s.sendall(struct.pack("!ii", 8 + len(params), 196608) + params)
buf = b""
def msg(tag, body):
    return tag + struct.pack("!i", 4 + len(body)) + body
def until_ready():
    global buf
    out = []
    while True:
        while len(buf) >= 5:
            n = struct.unpack("!i", buf[1:5])[0]
            if len(buf) < 1 + n:
                break
            out.append((buf[0:1], buf[5:1 + n]))
            buf = buf[1 + n:]
            if out[-1][0] == b"Z":
                return out
        chunk = s.recv(65536)
        if not chunk:
            return out
        buf += chunk
def rows(answers):
    out = []
    for tag, body in answers:
        if tag == b"D":
            p, row = 2, []
            for _ in range(struct.unpack("!h", body[:2])[0]):
                n = struct.unpack("!i", body[p:p + 4])[0]
                p += 4
                row.append(None if n < 0 else body[p:p + n].decode())
                p += max(n, 0)
            out.append(row)
        elif tag == b"E":
            out.append(["error", body.decode(errors="replace")])
    return out
until_ready()
s.sendall(msg(b"Q", b"BEGIN; DECLARE c CURSOR FOR SELECT upper(ssn), ssn, name FROM users ORDER BY id\x00"))
until_ready()
s.sendall(msg(b"D", b"Pc\x00") + msg(b"E", b"c\x00" + struct.pack("!i", 1)) + msg(b"S", b""))
first = rows(until_ready())
s.sendall(msg(b"E", b"c\x00" + struct.pack("!i", 0)) + msg(b"S", b""))
rest = rows(until_ready())
s.sendall(msg(b"X", b""))
print(json.dumps([first, rest]))
"#,
        user = pg.user
    );
    let v: Value = serde_json::from_str(topo.python(&script).trim()).unwrap();
    assert_eq!(
        v,
        json!([
            [["[redacted]", "[redacted]", "alice"]],
            [["[redacted]", "[redacted]", "bob"]]
        ])
    );
}
