//! Table-driven SQL cases, evaluation semantics, and file errors.

use std::{path::Path, sync::Arc};

use serde::Deserialize;

use super::{
    file::parse_file, Action, Basis, Classification, PolicySet, PreparedStatements, Request,
    SqlClass, TargetRef, Verdict,
};
use crate::{
    identity::{Ancestor, ProcessIdentity},
    protocol::Protocol,
};

/// A policy from one file's text (panics with the errors: test input).
pub(super) fn policy(text: &str) -> PolicySet {
    match parse_file(Path::new("test.toml"), text) {
        Ok(p) => PolicySet::new(p.rules, p.targets, vec!["test.toml".into()]),
        Err(e) => panic!(
            "policy does not load:\n{}",
            e.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("\n")
        ),
    }
}

pub(super) fn agent() -> ProcessIdentity {
    ProcessIdentity {
        pid: 4242,
        tid: 4242,
        uid: 1000,
        gid: 1000,
        user: Some("alice".into()),
        comm: "psql".into(),
        exe: Some("/usr/bin/psql".into()),
        cmdline: vec!["psql".into()],
        cgroup_id: 1,
        cgroup: Some("/bulkhead.governed".into()),
        unit: None,
        ancestors: vec![
            Ancestor {
                pid: 4200,
                comm: "bash".into(),
                exe: Some("/usr/bin/bash".into()),
                governed: true,
            },
            Ancestor {
                pid: 4100,
                comm: "claude".into(),
                exe: Some("/opt/claude/bin/claude".into()),
                governed: true,
            },
        ],
    }
}

pub(super) fn sql<'a>(target: &'a str, id: &'a ProcessIdentity, text: &'a str) -> Request<'a> {
    Request {
        target: TargetRef {
            name: target,
            protocol: Protocol::Postgres,
        },
        identity: id,
        action: Action::Sql {
            text,
            prepared: None,
        },
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CaseFile {
    policy: String,
    case: Vec<Case>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    sql: String,
    class: Option<String>,
    classes: Option<Vec<String>>,
    verdict: String,
    objects: Option<Vec<String>>,
    #[serde(default)]
    prepared: std::collections::BTreeMap<String, String>,
    /// Words an `unknown` classification's reasons must contain.
    reason: Option<String>,
    #[allow(dead_code, reason = "documentation for the reader of the table")]
    note: Option<String>,
}

#[test]
fn sql_case_table() {
    let text = include_str!("testdata/sql_cases.toml");
    let file: CaseFile = toml::from_str(text).expect("sql_cases.toml parses");
    let set = policy(&file.policy);
    let id = agent();
    let mut failures = Vec::new();
    for (i, case) in file.case.iter().enumerate() {
        let mut prepared = PreparedStatements::default();
        for (name, body) in &case.prepared {
            let c = super::classify(body, None);
            prepared.insert(name, Arc::new(c));
        }
        let req = Request {
            action: Action::Sql {
                text: &case.sql,
                prepared: Some(&prepared),
            },
            ..sql("db", &id, "")
        };
        let d = set.evaluate(&req);
        let c: &Classification = d
            .sql
            .as_deref()
            .expect("SQL decisions carry the classification");
        let mut problems = Vec::new();
        let headline = c.headline().map(SqlClass::name);
        if headline != case.class.as_deref() {
            problems.push(format!("class {headline:?}, expected {:?}", case.class));
        }
        if let Some(expected) = &case.classes {
            let got: Vec<&str> = c.classes.iter().map(|k| k.name()).collect();
            if got != expected.iter().map(String::as_str).collect::<Vec<_>>() {
                problems.push(format!("classes {got:?}, expected {expected:?}"));
            }
        }
        if d.decided.to_string() != case.verdict {
            problems.push(format!(
                "verdict {}, expected {} (rules {:?})",
                d.decided, case.verdict, d.rules
            ));
        }
        if let Some(expected) = &case.objects {
            let got: Vec<&String> = c.objects.iter().collect();
            if got != expected.iter().collect::<Vec<_>>() {
                problems.push(format!("objects {got:?}, expected {expected:?}"));
            }
        }
        if let Some(expected) = &case.reason {
            if !c
                .unknown_reasons
                .iter()
                .any(|r| r.contains(expected.as_str()))
            {
                problems.push(format!(
                    "reasons {:?}, expected one with {expected:?}",
                    c.unknown_reasons
                ));
            }
        }
        if !problems.is_empty() {
            failures.push(format!(
                "case {} {:?}: {}",
                i + 1,
                case.sql,
                problems.join("; ")
            ));
        }
    }
    assert!(
        file.case.len() >= 150,
        "the table must keep at least 150 cases"
    );
    assert!(
        failures.is_empty(),
        "{} of {} SQL cases failed:\n{}",
        failures.len(),
        file.case.len(),
        failures.join("\n")
    );
}

#[test]
fn every_family_has_a_case_denied_as_read_only() {
    let text = include_str!("testdata/sql_cases.toml");
    let file: CaseFile = toml::from_str(text).expect("sql_cases.toml parses");
    for class in SqlClass::ALL {
        if matches!(
            class,
            SqlClass::Read | SqlClass::Transaction | SqlClass::Session
        ) {
            continue;
        }
        assert!(
            file.case
                .iter()
                .any(|c| c.class.as_deref() == Some(class.name()) && c.verdict == "deny"),
            "no denied case for class {class}"
        );
    }
}

#[test]
fn deny_beats_approve_beats_allow_whatever_the_order() {
    let rules = [
        "[[rule]]\nid = \"a-allow\"\nverdict = \"allow\"\n",
        "[[rule]]\nid = \"b-approve\"\nverdict = \"approve\"\napproval_timeout = \"2m\"\nsql = { class = [\"write\"] }\n",
        "[[rule]]\nid = \"c-deny\"\nverdict = \"deny\"\nmessage = \"no deletes\"\nsql = { class = [\"delete\"] }\n",
    ];
    let id = agent();
    for order in [[0, 1, 2], [2, 1, 0], [1, 2, 0]] {
        let text: String = order
            .iter()
            .map(|i| rules[*i])
            .collect::<Vec<_>>()
            .join("\n");
        let set = policy(&format!(
            "[[target]]\nname = \"db\"\ndefault = \"deny\"\n{text}"
        ));
        let d = set.evaluate(&sql("db", &id, "DELETE FROM t"));
        assert_eq!(
            (d.verdict, d.rules.clone()),
            (Verdict::Deny, vec!["c-deny".to_string()])
        );
        assert_eq!(d.message.as_deref(), Some("no deletes"));
        let d = set.evaluate(&sql("db", &id, "UPDATE t SET a = 1"));
        assert_eq!(d.verdict, Verdict::Approve);
        assert_eq!(d.approval_timeout, Some(std::time::Duration::from_mins(2)));
        let d = set.evaluate(&sql("db", &id, "SELECT 1"));
        assert_eq!((d.verdict, d.basis), (Verdict::Allow, Basis::Rules));
    }
}

#[test]
fn unknown_gets_on_unknown_and_allow_rules_never_apply() {
    let id = agent();
    let set = policy("[[target]]\nname = \"db\"\ndefault = \"allow\"\n\n[[rule]]\nid = \"all\"\nverdict = \"allow\"\n");
    let d = set.evaluate(&sql("db", &id, "selec 1"));
    assert_eq!(
        (d.verdict, d.basis),
        (Verdict::Deny, Basis::Unknown),
        "on_unknown defaults to deny"
    );
    assert!(d
        .message
        .as_deref()
        .is_some_and(|m| m.contains("not understood")));
    let set = policy("[[target]]\nname = \"db\"\non_unknown = \"approve\"\n");
    let d = set.evaluate(&sql("db", &id, "selec 1"));
    assert_eq!(
        (d.verdict, d.rules.clone()),
        (Verdict::Approve, vec!["target:db:on_unknown".to_string()])
    );
    assert_eq!(d.approval_timeout, Some(super::DEFAULT_APPROVAL_TIMEOUT));
    // Restricting rules that name `unknown` (or no class) catch it too.
    let set = policy(
        "[[target]]\nname = \"db\"\non_unknown = \"allow\"\n[[rule]]\nid = \"hold\"\nverdict = \"approve\"\nsql = { class = [\"unknown\"] }\n",
    );
    assert_eq!(
        set.evaluate(&sql("db", &id, "selec 1")).verdict,
        Verdict::Approve
    );
    assert_eq!(
        set.evaluate(&sql("db", &id, "SELECT 1")).verdict,
        Verdict::Deny,
        "default deny"
    );
}

#[test]
fn targets_without_settings_deny_and_settings_pick_the_most_specific() {
    let id = agent();
    let set = policy(
        "[[target]]\nprotocol = \"postgres\"\ndefault = \"allow\"\n\
         [[target]]\nname = \"prod-*\"\ndefault = \"approve\"\n\
         [[target]]\nname = \"prod-orders\"\ndefault = \"deny\"\n",
    );
    let verdict = |t: &str| set.evaluate(&sql(t, &id, "SELECT 1")).verdict;
    assert_eq!(verdict("dev"), Verdict::Allow);
    assert_eq!(verdict("prod-users"), Verdict::Approve);
    assert_eq!(verdict("prod-orders"), Verdict::Deny);
    let empty = policy("");
    assert_eq!(
        empty.evaluate(&sql("x", &id, "SELECT 1")).verdict,
        Verdict::Deny
    );
}

#[test]
fn observe_mode_records_what_would_have_been_enforced() {
    let id = agent();
    let set = policy(
        "[[target]]\nname = \"db\"\nmode = \"observe\"\n\
         [[rule]]\nid = \"no-ddl\"\nverdict = \"deny\"\nmessage = \"no DDL\"\nsql = { class = [\"ddl\"] }\n",
    );
    let d = set.evaluate(&sql("db", &id, "DROP TABLE t"));
    assert_eq!(
        (d.verdict, d.decided, d.observe_only),
        (Verdict::Allow, Verdict::Deny, true)
    );
    assert_eq!(d.rules, vec!["no-ddl"]);
    let d = set.evaluate(&sql("db", &id, "selec"));
    assert_eq!(
        (d.verdict, d.decided, d.observe_only),
        (Verdict::Allow, Verdict::Deny, true)
    );
}

#[test]
fn identity_matchers_cover_or_touch() {
    let mut id = agent();
    let set = policy(
        "[[target]]\nname = \"db\"\n\
         [[rule]]\nid = \"claude-reads\"\nverdict = \"allow\"\nidentity = { ancestor = [\"claude\"], exe = [\"/usr/bin/*\"] }\nsql = { class = [\"read\"] }\n\
         [[rule]]\nid = \"no-python\"\nverdict = \"deny\"\nidentity = { exe = [\"/usr/bin/python*\"] }\n",
    );
    assert_eq!(
        set.evaluate(&sql("db", &id, "SELECT 1")).verdict,
        Verdict::Allow
    );
    id.exe = None;
    let d = set.evaluate(&sql("db", &id, "SELECT 1"));
    assert_eq!(
        (d.verdict, d.rules.clone()),
        (Verdict::Deny, vec!["no-python".to_string()]),
        "an unknown exe cannot be vouched for by allow, and may be what deny names"
    );
    let mut id = agent();
    id.ancestors.truncate(1);
    assert_eq!(
        set.evaluate(&sql("db", &id, "SELECT 1")).basis,
        Basis::Default,
        "not under claude"
    );
}

#[test]
fn objects_and_functions() {
    let id = agent();
    let set = policy(
        "[[target]]\nname = \"db\"\nread_only_functions = [\"app.report_*\"]\n\
         [[rule]]\nid = \"public-reads\"\nverdict = \"allow\"\nsql = { class = [\"read\"], objects = [\"public.*\"] }\n\
         [[rule]]\nid = \"no-salaries\"\nverdict = \"deny\"\nsql = { objects = [\"hr.salaries\"] }\n",
    );
    let verdict = |q: &str| set.evaluate(&sql("db", &id, q)).verdict;
    assert_eq!(
        verdict("SELECT * FROM users"),
        Verdict::Allow,
        "unqualified resolves to public for allow"
    );
    assert_eq!(
        verdict("SELECT * FROM public.users JOIN hr.people ON true"),
        Verdict::Deny,
        "default: hr.people not covered"
    );
    assert_eq!(
        verdict("SELECT * FROM salaries"),
        Verdict::Deny,
        "unqualified may be hr.salaries for deny"
    );
    assert_eq!(
        verdict("SELECT app.report_total()"),
        Verdict::Allow,
        "vouched-for function"
    );
    assert_eq!(verdict("SELECT app.other()"), Verdict::Deny);
}

/// A table's kin (filled by the PostgreSQL gateway from the catalog) lets a restricting rule
/// touch the statement; an allow rule must still cover the tables the statement names.
#[test]
fn kin_is_touched_by_restricting_rules_and_never_covers() {
    let id = agent();
    let set = policy(
        "[[target]]\nname = \"db\"\n\
         [[rule]]\nid = \"reads\"\nverdict = \"allow\"\nsql = { class = [\"read\"], objects = [\"public.ev\", \"public.other\"] }\n\
         [[rule]]\nid = \"no-secret\"\nverdict = \"deny\"\nsql = { objects = [\"hr.secret\"] }\n",
    );
    assert!(set.restricts_sql_objects());
    assert!(!policy("[[target]]\nname = \"db\"\n[[rule]]\nid = \"r\"\nverdict = \"allow\"\nsql = { objects = [\"a\"] }\n")
        .restricts_sql_objects());
    let classified = |q: &str, kin: &[&str]| {
        let mut c = (*set.cache().classify(q, None)).clone();
        c.kin = kin.iter().map(|k| (*k).to_string()).collect();
        Arc::new(c)
    };
    let verdict = |c: &Arc<Classification>| {
        set.evaluate(&Request {
            action: Action::SqlClassified(c),
            ..sql("db", &id, "")
        })
        .verdict
    };
    let child_of_secret = classified("SELECT * FROM hr.secret_2024", &["hr.secret"]);
    assert_eq!(verdict(&child_of_secret), Verdict::Deny);
    let child_of_ev = classified("SELECT * FROM public.ev_eu", &["public.ev"]);
    assert_eq!(
        verdict(&child_of_ev),
        Verdict::Deny,
        "the allow names ev, not ev_eu"
    );
    let ev = classified("SELECT * FROM public.ev", &["public.ev_eu"]);
    assert_eq!(
        verdict(&ev),
        Verdict::Allow,
        "kin an allow rule does not name is no matter"
    );
}

#[test]
fn unqualified_catalog_names_resolve_to_pg_catalog_first() {
    let id = agent();
    let set = policy(
        "[[target]]\nname = \"db\"\n\
         [[rule]]\nid = \"public-reads\"\nverdict = \"allow\"\nsql = { class = [\"read\"], objects = [\"public.*\"] }\n",
    );
    let verdict = |q: &str| set.evaluate(&sql("db", &id, q)).verdict;
    // The server searches pg_catalog before "$user", public: these are catalog views.
    for q in [
        "SELECT * FROM pg_stat_activity",
        "SELECT * FROM PG_AUTHID",
        "SELECT rolpassword FROM pg_authid",
        "SELECT * FROM users JOIN pg_shadow ON true",
        // Not a PostgreSQL 15 catalog name, but maybe a newer server's: either schema.
        "SELECT * FROM pg_stat_io",
    ] {
        assert_eq!(verdict(q), Verdict::Deny, "{q}");
    }
    assert_eq!(
        verdict("SELECT * FROM public.pg_stat_activity"),
        Verdict::Allow
    );
    assert_eq!(verdict("SELECT * FROM users"), Verdict::Allow);
    assert_eq!(
        verdict("SELECT * FROM \"pg_stat_activity_\""),
        Verdict::Deny
    );

    let catalog = policy(
        "[[target]]\nname = \"db\"\n\
         [[rule]]\nid = \"catalog-reads\"\nverdict = \"allow\"\nsql = { class = [\"read\"], objects = [\"pg_catalog.*\"] }\n",
    );
    let verdict = |q: &str| catalog.evaluate(&sql("db", &id, q)).verdict;
    assert_eq!(verdict("SELECT * FROM pg_class"), Verdict::Allow);
    assert_eq!(verdict("SELECT * FROM pg_catalog.pg_class"), Verdict::Allow);
    assert_eq!(
        verdict("SELECT * FROM pg_stat_io"),
        Verdict::Deny,
        "maybe public.pg_stat_io"
    );
    assert_eq!(verdict("SELECT * FROM users"), Verdict::Deny);

    let both = policy(
        "[[target]]\nname = \"db\"\n\
         [[rule]]\nid = \"reads\"\nverdict = \"allow\"\nsql = { class = [\"read\"], objects = [\"pg_catalog.*\", \"public.*\"] }\n",
    );
    assert_eq!(
        both.evaluate(&sql("db", &id, "SELECT * FROM pg_stat_io"))
            .verdict,
        Verdict::Allow
    );
}

#[test]
fn identifiers_fold_as_the_server_folds_them_in_utf8() {
    use super::sql::fold_identifier;
    assert_eq!(fold_identifier("ABC", false), "abc");
    assert_eq!(fold_identifier("ABC", true), "ABC");
    // PostgreSQL lowercases only ASCII letters in a multibyte encoding.
    assert_eq!(fold_identifier("ÉTÉ", false), "ÉtÉ");
    assert_eq!(fold_identifier("ΣΑΣ", false), "ΣΑΣ");
    assert_eq!(fold_identifier("İx", false), "İx");
    // Cut to 63 bytes, never inside a character.
    assert_eq!(fold_identifier(&"a".repeat(70), false), "a".repeat(63));
    assert_eq!(fold_identifier(&"é".repeat(40), true), "é".repeat(31));
    // A deny rule on the name the server uses touches the longer spelling of it.
    let id = agent();
    let long = "s".repeat(63);
    let set = policy(&format!(
        "[[target]]\nname = \"db\"\n\
         [[rule]]\nid = \"reads\"\nverdict = \"allow\"\nsql = {{ class = [\"read\"] }}\n\
         [[rule]]\nid = \"no-secret\"\nverdict = \"deny\"\nsql = {{ objects = [\"public.{long}\", \"public.É\"] }}\n"
    ));
    let verdict = |q: &str| set.evaluate(&sql("db", &id, q)).verdict;
    assert_eq!(verdict(&format!("SELECT * FROM {long}")), Verdict::Deny);
    assert_eq!(verdict(&format!("SELECT * FROM {long}xyz")), Verdict::Deny);
    assert_eq!(
        verdict(&format!("SELECT * FROM \"{long}XYZ\"")),
        Verdict::Deny
    );
    assert_eq!(verdict("SELECT * FROM É"), Verdict::Deny);
    assert_eq!(
        verdict("SELECT * FROM é"),
        Verdict::Allow,
        "another table for the server"
    );
}

#[test]
fn maintenance_rules_can_name_tables() {
    let id = agent();
    let set = policy(
        "[[target]]\nname = \"db\"\n\
         [[rule]]\nid = \"bench-maintenance\"\nverdict = \"allow\"\n\
         sql = { class = [\"maintenance\", \"copy_in\"], objects = [\"public.pgbench_*\"] }\n",
    );
    let verdict = |q: &str| set.evaluate(&sql("db", &id, q)).verdict;
    assert_eq!(verdict("vacuum analyze pgbench_branches"), Verdict::Allow);
    assert_eq!(
        verdict("VACUUM (ANALYZE) pgbench_tellers, public.pgbench_history"),
        Verdict::Allow
    );
    assert_eq!(
        verdict("VACUUM ANALYZE pgbench_branches, users"),
        Verdict::Deny
    );
    assert_eq!(
        verdict("VACUUM ANALYZE"),
        Verdict::Deny,
        "every table: the rule cannot vouch for tables it does not see"
    );
    assert_eq!(
        verdict("copy pgbench_accounts from stdin with (freeze on)"),
        Verdict::Allow
    );
    assert_eq!(
        verdict("COPY users FROM STDIN WITH (FREEZE ON)"),
        Verdict::Deny
    );
}

#[test]
fn prepared_statements_are_reported_for_the_session() {
    let c = super::classify("PREPARE q (int) AS DELETE FROM t WHERE id = $1", None);
    assert_eq!(c.prepared.len(), 1);
    assert_eq!(c.prepared[0].0, "q");
    assert_eq!(c.prepared[0].1.headline(), Some(SqlClass::Delete));
}

#[test]
fn the_cache_never_changes_a_verdict() {
    let id = agent();
    let set = policy("[[target]]\nname = \"db\"\n[[rule]]\nid = \"r\"\nverdict = \"allow\"\nsql = { class = [\"read\"] }\n");
    let mut prepared = PreparedStatements::default();
    prepared.insert("q", Arc::new(super::classify("SELECT 1", None)));
    let exec = |p: &PreparedStatements| {
        set.evaluate(&Request {
            action: Action::Sql {
                text: "EXECUTE q",
                prepared: Some(p),
            },
            ..sql("db", &id, "")
        })
        .verdict
    };
    assert_eq!(exec(&prepared), Verdict::Allow);
    prepared.insert("q", Arc::new(super::classify("DELETE FROM t", None)));
    assert_eq!(
        exec(&prepared),
        Verdict::Deny,
        "EXECUTE is never served from the cache"
    );
    for _ in 0..3 {
        assert_eq!(
            set.evaluate(&sql("db", &id, "SELECT 1")).verdict,
            Verdict::Allow
        );
    }
    assert!(!set.cache().is_empty());
}

#[test]
fn file_errors_name_file_line_and_key() {
    let err = |text: &str| match parse_file(Path::new("p/bad.toml"), text) {
        Ok(_) => panic!("should not load: {text}"),
        Err(e) => e
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("\n"),
    };
    let e = err("[[rule]]\nid = \"x\"\nverdict = \"allow\"\nsql = { clas = [\"read\"] }\n");
    assert!(
        e.contains("p/bad.toml:4:") && e.contains("clas") && e.contains("hint:"),
        "{e}"
    );
    let e = err("[[rule]]\nid = \"x\"\nverdict = \"allow\"\n\n[rule.identity]\nproces = [\"x\"]\n");
    assert!(e.contains(":6:") && e.contains("proces"), "{e}");
    let e = err("[[rule]]\nid = \"x\"\nverdict = \"permit\"\n");
    assert!(
        e.contains(":3:") && e.contains("permit") && e.contains("allow, deny, approve or mask"),
        "{e}"
    );
    let e = err("[[rule]]\nid = \"x\"\nverdict = \"deny\"\nsql = { class = [\"reads\"] }\n");
    assert!(e.contains(":4:") && e.contains("reads"), "{e}");
    let e = err("[[rule]]\nid = \"x\"\nverdict = \"approve\"\napproval_timeout = \"soon\"\n");
    assert!(e.contains(":4:") && e.contains("soon"), "{e}");
    let e = err("[[rule]]\nid = \"x\"\nverdict = \"mask\"\n");
    assert!(e.contains("[rule.mask]"), "{e}");
    let e = err("[[rule]]\nid = \"x\"\nverdict = \"allow\"\nsql = {}\nssh = {}\n");
    assert!(e.contains("one request section"), "{e}");
    let e = err("[[rule]]\nid = \"x\"\nverdict = \"allow\"\nmessage = \"hi\"\n");
    assert!(e.contains("only shown for verdict = \"deny\""), "{e}");
    let e = err("[[rule]]\nid = \"x\"\nverdict = \"allow\"\nssh = { regex = [\"(\"] }\n");
    assert!(e.contains(":4:") && e.contains("regex"), "{e}");
    let e = err("[[target]]\nname = \"db\"\nmode = \"audit\"\n");
    assert!(e.contains(":3:") && e.contains("audit"), "{e}");
    let e = err("colour = 1\n");
    assert!(e.contains(":1:") && e.contains("colour"), "{e}");
    let e = err("[[rule]]\nverdict = \"allow\"\n");
    assert!(e.contains("id"), "{e}");
}

#[test]
fn every_section_of_a_file_reports_its_error_not_only_the_first() {
    let text = "[[rule]]\nid = \"x\"\nverdict = \"alow\"\n\n\
                [[rule]]\nid = \"y\"\nverdict = \"deny\"\ntarget = \"nope\"\n\n\
                [[target]]\nname = \"db\"\nmode = \"audit\"\n\n\
                [[rule]]\nid = \"é\"\nverdict = \"deny\"\nsql = { clas = [\"read\"] }\n";
    let Err(errors) = parse_file(Path::new("p/bad.toml"), text) else {
        panic!("should not load");
    };
    let shown: Vec<String> = errors.iter().map(ToString::to_string).collect();
    let all = shown.join("\n");
    assert_eq!(shown.len(), 4, "{all}");
    // Each at its own line of the whole file, in file order.
    for (at, what) in [
        (3, "alow"),
        (8, "expected a table"),
        (12, "audit"),
        (17, "clas"),
    ] {
        assert!(
            shown
                .iter()
                .any(|e| e.contains(&format!("p/bad.toml:{at}:")) && e.contains(what)),
            "{what} at line {at}: {all}"
        );
    }
    assert!(!all.contains("RawTargetMatch"), "{all}");
    assert!(all.contains("target = { name ="), "{all}");
}

#[test]
fn long_operator_chains_do_not_overflow_the_stack() {
    for (op, n) in [
        ("+", 100_000),
        (" AND ", 100_000),
        ("::int", 150_000),
        ("+", 400_000),
    ] {
        let sql = format!("SELECT 1{}", format!("{op}1").repeat(n));
        let c = super::classify(&sql, None);
        assert!(c.headline().is_some(), "{op} x {n}");
    }
}

#[test]
fn connect_is_gated_by_identity_rules_and_the_tcp_default() {
    let id = agent();
    let set = policy(
        "[[target]]\nname = \"db\"\n[[target]]\nname = \"raw\"\nprotocol = \"tcp\"\n\
         [[rule]]\nid = \"no-python\"\nverdict = \"deny\"\nidentity = { process = [\"python*\"] }\n\
         [[rule]]\nid = \"reads\"\nverdict = \"allow\"\nsql = { class = [\"read\"] }\n",
    );
    let connect = |name: &'static str, protocol: Protocol, who: &ProcessIdentity| {
        set.evaluate(&Request {
            target: TargetRef { name, protocol },
            identity: who,
            action: Action::Connect,
        })
    };
    let d = connect("db", Protocol::Postgres, &id);
    assert_eq!(
        (d.verdict, d.rules.clone()),
        (Verdict::Allow, vec!["target:db:connect".to_string()])
    );
    assert_eq!(
        connect("raw", Protocol::Tcp, &id).verdict,
        Verdict::Deny,
        "opaque TCP: the default"
    );
    let mut py = agent();
    py.comm = "python3".into();
    assert_eq!(
        connect("db", Protocol::Postgres, &py).rules,
        vec!["no-python"]
    );
}

#[test]
fn a_session_may_write_only_when_some_rule_that_could_apply_allows_a_writing_class() {
    let db = TargetRef {
        name: "db",
        protocol: Protocol::Postgres,
    };
    let me = agent();
    let head = "[[target]]\nname = \"db\"\nprotocol = \"postgres\"\ndefault = \"deny\"\n";
    let reads = format!(
        "{head}[[rule]]\nid = \"r\"\nverdict = \"allow\"\ntarget = {{ name = [\"db\"] }}\n\
         sql = {{ class = [\"read\", \"transaction\", \"session\"] }}\n"
    );
    assert!(!policy(&reads).may_write(db, &me), "reads only");
    // A writing class, allowed or held for approval.
    for verdict in ["allow", "approve"] {
        let p = format!(
            "{reads}[[rule]]\nid = \"w\"\nverdict = \"{verdict}\"\ntarget = {{ name = [\"db\"] }}\n\
             sql = {{ class = [\"delete\"], objects = [\"public.t\"] }}\n"
        );
        assert!(policy(&p).may_write(db, &me), "{verdict}");
    }
    // A rule for someone else, or a deny, does not count.
    let other = format!(
        "{reads}[[rule]]\nid = \"w\"\nverdict = \"allow\"\ntarget = {{ name = [\"db\"] }}\n\
         identity = {{ uid = [7] }}\nsql = {{ class = [\"insert\"] }}\n\
         [[rule]]\nid = \"d\"\nverdict = \"deny\"\ntarget = {{ name = [\"db\"] }}\n\
         sql = {{ class = [\"ddl\"] }}\n"
    );
    assert!(!policy(&other).may_write(db, &me));
    // A rule without a class list, a permissive default or on_unknown, observe mode.
    let any = format!(
        "{reads}[[rule]]\nid = \"a\"\nverdict = \"allow\"\ntarget = {{ name = [\"db\"] }}\n"
    );
    assert!(policy(&any).may_write(db, &me));
    for setting in [
        "default = \"allow\"",
        "on_unknown = \"approve\"",
        "mode = \"observe\"",
    ] {
        let p = reads.replace(
            "default = \"deny\"\n",
            &format!("default = \"deny\"\n{setting}\n"),
        );
        let p = if setting.starts_with("default") {
            p.replacen("default = \"deny\"\n", "", 1)
        } else {
            p
        };
        assert!(policy(&p).may_write(db, &me), "{setting}");
    }
}

#[test]
fn ssh_shells_and_sftp_paths_are_matched_only_by_what_names_them() {
    let id = agent();
    let set = policy(
        "[[target]]\nname = \"box\"\nprotocol = \"ssh\"\n\
         [[rule]]\nid = \"cmds\"\nverdict = \"allow\"\nssh = { command = [\"ls **\"] }\n\
         [[rule]]\nid = \"shells\"\nverdict = \"allow\"\nidentity = { process = [\"claude\"] }\nssh = { shell = true }\n\
         [[rule]]\nid = \"files\"\nverdict = \"allow\"\nssh = { sftp = { read = [\"/srv/**\"], write = [\"/srv/in/**\"] } }\n\
         [[rule]]\nid = \"no-keys\"\nverdict = \"deny\"\nssh = { sftp = { read = [\"/srv/**/*.key\"] } }\n",
    );
    let judge = |action: Action<'_>, who: &ProcessIdentity| {
        let d = set.evaluate(&Request {
            target: TargetRef {
                name: "box",
                protocol: Protocol::Ssh,
            },
            identity: who,
            action,
        });
        (d.verdict, d.rules)
    };
    let sftp = |write, path| Action::Sftp { write, path };
    assert_eq!(judge(sftp(false, "/srv/a/b.txt"), &id).1, vec!["files"]);
    assert_eq!(judge(sftp(true, "/srv/in/x"), &id).0, Verdict::Allow);
    assert_eq!(
        judge(sftp(true, "/srv/a/b.txt"), &id).0,
        Verdict::Deny,
        "read only there"
    );
    assert_eq!(judge(sftp(false, "/srv/a/id.key"), &id).1, vec!["no-keys"]);
    let (v, rules) = judge(sftp(false, "/srv/../etc/shadow"), &id);
    assert_eq!(v, Verdict::Deny);
    assert_eq!(rules, vec!["target:box:on_unknown"], "`..` is unknown");
    assert_eq!(
        judge(Action::SshShell, &id).0,
        Verdict::Deny,
        "not this process"
    );
    let mut claude = agent();
    claude.comm = "claude".into();
    assert_eq!(judge(Action::SshShell, &claude).1, vec!["shells"]);
    assert_eq!(
        judge(Action::SshExec { command: "ls /srv" }, &id).0,
        Verdict::Allow
    );
    assert_eq!(
        judge(sftp(false, "/etc/passwd"), &id).0,
        Verdict::Deny,
        "command rules do not cover files"
    );
}

#[test]
fn ssh_tunnels_agent_and_env_need_a_rule_that_names_them() {
    use super::SshForward;
    let judge = ssh_judge;
    let local = |host, port| Action::SshForward {
        kind: SshForward::Local,
        host,
        port,
    };
    let remote = |host, port| Action::SshForward {
        kind: SshForward::Remote,
        host,
        port,
    };
    let agent_fwd = Action::SshForward {
        kind: SshForward::Agent,
        host: "",
        port: 0,
    };
    // An allow-everything target and rule still allow no tunnel and no variable.
    let open = policy(
        "[[target]]\nname = \"box\"\nprotocol = \"ssh\"\ndefault = \"allow\"\n\
         [[rule]]\nid = \"all\"\nverdict = \"allow\"\ntarget = { name = [\"box\"] }\n",
    );
    for action in [
        local("10.0.0.5", 5432),
        remote("localhost", 8080),
        agent_fwd,
        Action::SshEnv { name: "LANG" },
    ] {
        assert_eq!(
            judge(&open, action),
            (Verdict::Deny, vec!["target:box:needs-a-rule".to_string()]),
            "{action:?}"
        );
    }
    assert_eq!(
        judge(&open, Action::SshExec { command: "id" }).0,
        Verdict::Allow
    );

    let set = policy(
        "[[target]]\nname = \"box\"\nprotocol = \"ssh\"\n\
         [[rule]]\nid = \"tunnels\"\nverdict = \"allow\"\n\
         ssh = { forward = [\"10.0.0.5:5432\", \"*.internal:*\"], remote_forward = [\"localhost:*\"], agent = true, env = [\"LANG\", \"LC_*\"] }\n\
         [[rule]]\nid = \"no-admin\"\nverdict = \"deny\"\nssh = { forward = [\"admin.internal:*\"] }\n\
         [[rule]]\nid = \"nothing-to-ssh\"\nverdict = \"deny\"\nssh = { forward = [\"**:22\"] }\n",
    );
    assert_eq!(judge(&set, local("10.0.0.5", 5432)).1, vec!["tunnels"]);
    assert_eq!(judge(&set, local("DB.Internal.", 5432)).1, vec!["tunnels"]);
    assert_eq!(
        judge(&set, local("admin.internal", 443)).1,
        vec!["no-admin"]
    );
    assert_eq!(
        judge(&set, local("db.internal", 22)).1,
        vec!["nothing-to-ssh"]
    );
    assert_eq!(judge(&set, local("10.0.0.5", 5433)).0, Verdict::Deny);
    assert_eq!(judge(&set, local("10.0.0.6", 5432)).0, Verdict::Deny);
    // Another spelling of 10.0.0.5 that the target's resolver accepts: not judged as a name.
    for host in ["167772165", "10.5", "0x0a.0.0.5", "010.0.0.5"] {
        let (v, rules) = judge(&set, local(host, 5432));
        assert_eq!(v, Verdict::Deny, "{host}");
        assert_eq!(rules, vec!["target:box:on_unknown"], "{host}");
    }
    assert_eq!(judge(&set, local("a b", 5432)).0, Verdict::Deny);
    assert_eq!(judge(&set, local("10.0.0.5", 70000)).0, Verdict::Deny);
    assert_eq!(judge(&set, remote("localhost", 0)).1, vec!["tunnels"]);
    assert_eq!(
        judge(&set, remote("", 8080)).0,
        Verdict::Deny,
        "all addresses"
    );
    assert_eq!(judge(&set, agent_fwd).1, vec!["tunnels"]);
    assert_eq!(
        judge(&set, Action::SshEnv { name: "LC_ALL" }).1,
        vec!["tunnels"]
    );
    assert_eq!(
        judge(&set, Action::SshEnv { name: "LD_PRELOAD" }).0,
        Verdict::Deny
    );
    assert_eq!(judge(&set, Action::SshEnv { name: "A=B" }).0, Verdict::Deny);
    // Command rules do not cover tunnels, and tunnel rules do not cover commands.
    assert_eq!(
        judge(&set, Action::SshExec { command: "ls" }).0,
        Verdict::Deny
    );
}

#[test]
fn x11_forwarding_needs_a_rule_of_its_own() {
    use super::SshForward;
    let judge = ssh_judge;
    let x11 = Action::SshForward {
        kind: SshForward::X11,
        host: "",
        port: 0,
    };
    let agent_fwd = Action::SshForward {
        kind: SshForward::Agent,
        host: "",
        port: 0,
    };
    let display = policy(
        "[[target]]\nname = \"box\"\nprotocol = \"ssh\"\n\
         [[rule]]\nid = \"x\"\nverdict = \"allow\"\nssh = { x11 = true }\n",
    );
    assert_eq!(judge(&display, x11).1, vec!["x"]);
    // `x11 = true` is not `agent = true`, nor the other way round, and an allow-everything
    // rule allows no X11.
    assert_eq!(judge(&display, agent_fwd).0, Verdict::Deny);
    let agent_only = policy(
        "[[target]]\nname = \"box\"\nprotocol = \"ssh\"\ndefault = \"allow\"\n\
         [[rule]]\nid = \"a\"\nverdict = \"allow\"\nssh = { agent = true }\n\
         [[rule]]\nid = \"all\"\nverdict = \"allow\"\ntarget = { name = [\"box\"] }\n",
    );
    assert_eq!(judge(&agent_only, x11).0, Verdict::Deny);
}

/// An SSH request of [`agent`] to target `box` under `set`: the verdict and its rules.
fn ssh_judge(set: &PolicySet, action: Action<'_>) -> (Verdict, Vec<String>) {
    let d = set.evaluate(&Request {
        target: TargetRef {
            name: "box",
            protocol: Protocol::Ssh,
        },
        identity: &agent(),
        action,
    });
    (d.verdict, d.rules)
}
