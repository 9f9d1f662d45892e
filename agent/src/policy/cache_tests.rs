//! The classification cache: classifying through a warm cache gives exactly what classifying
//! without one gives, for generated statements and literal substitutions (a differential
//! property test), and pgbench's statements still share entries whatever their values.

use std::sync::Arc;

use proptest::prelude::*;
use serde::Deserialize;

use super::{
    sql_cache::{shape_key, SqlCache},
    tests::{agent, policy},
    Action, Classification, PolicySet, Request, TargetRef,
};
use crate::protocol::Protocol;

/// Numeric literals substituted into slots (`#`).
const NUMBERS: &[&str] = &[
    "0",
    "1",
    "-1",
    "2.5",
    "12345",
    "99999999999999999999999",
    "007",
    "1e3",
];

/// String literals substituted into slots (`@`).
const STRINGS: &[&str] = &[
    "'0'",
    "'1'",
    "'on'",
    "'off'",
    "'SJIS'",
    "'UTF8'",
    "'public'",
    "'secret'",
    "'$user, public'",
    "'role'",
    "'client_encoding'",
    "'search_path'",
];

/// Statements with literal slots in many positions: `#` a number, `@` a string.
const TEMPLATES: &[&str] = &[
    "SELECT abalance FROM pgbench_accounts WHERE aid = #;",
    "UPDATE pgbench_accounts SET abalance = abalance + # WHERE aid = #;",
    "UPDATE pgbench_tellers SET tbalance = tbalance + # WHERE tid = #;",
    "INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES (#, #, #, #, CURRENT_TIMESTAMP);",
    "EXPLAIN (ANALYZE #) DELETE FROM t WHERE a = #",
    "EXPLAIN (ANALYZE #, VERBOSE #) UPDATE t SET a = # WHERE b = #",
    "EXPLAIN (ANALYZE @) DELETE FROM t",
    "EXPLAIN (COSTS #, ANALYZE #) INSERT INTO t VALUES (#)",
    "SELECT * FROM t WHERE a = # LIMIT # OFFSET #",
    "SET statement_timeout = #",
    "SET client_encoding = @",
    "SET client_encoding = #",
    "SET search_path = @, @",
    "SET search_path = #",
    "SET standard_conforming_strings = #",
    "SELECT set_config(@, @, false)",
    "SELECT set_config(@, #, false) WHERE a = #",
    "SELECT set_config('client_encoding', @, #::bool) WHERE a = #",
    "SELECT pg_sleep(#)",
    "SELECT pg_sleep(#) WHERE a = #",
    "SELECT a[#] FROM t WHERE b[#] = #",
    "SELECT CASE WHEN a = # THEN # ELSE # END FROM t WHERE x = #",
    "VALUES (#, @), (#, @)",
    "INSERT INTO t VALUES (#, @, -#)",
    "INSERT INTO t SELECT # WHERE a = #",
    "DELETE FROM t WHERE a = # RETURNING b = #",
    "SELECT * FROM t JOIN u ON u.a = # WHERE (t.b = # OR t.c <> -#) AND t.d IN (#, #)",
    "SELECT count(*) FROM t GROUP BY a HAVING count(*) > # ORDER BY #",
    "SELECT * FROM t WHERE a = (SELECT max(b) FROM u WHERE c = #)",
    "COPY t FROM STDIN WITH (FORMAT csv, HEADER #)",
    "COPY t TO STDOUT WITH (FREEZE #)",
    "COPY (SELECT * FROM t WHERE a = #) TO STDOUT",
    "VACUUM (PARALLEL #) t",
    "ANALYZE (VERBOSE #) t",
    "FETCH # FROM c",
    "PREPARE p AS SELECT * FROM t WHERE a = # LIMIT #",
    "PREPARE p AS DELETE FROM t WHERE a = #",
    "SELECT nextval(@), setval(@, #)",
    "CREATE ROLE r CONNECTION LIMIT #",
    "ALTER ROLE r SET work_mem = #",
    "ALTER SYSTEM SET max_connections = #",
    "SELECT #; DELETE FROM t WHERE a = #",
    "SELECT * FROM t WHERE a = # FOR UPDATE",
    "UPDATE pg_settings SET setting = # WHERE name = @",
    "UPDATE t SET a = # WHERE b = # RETURNING c",
    "UPDATE t SET a = -#, b = b - # WHERE c = #",
    "UPDATE t SET a = f(#) WHERE c = #",
    "SELECT * FROM t WHERE a = #::int",
    "SELECT * FROM t WHERE a = # /* c # */ AND b = # -- x #\n",
    "SELECT * FROM t WHERE a = $1 AND b = #",
    "SELECT * FROM t WHERE a = # $$x$$",
    "SELECT * FROM t WHERE a = # AND b = E'\\''",
    "WITH d AS (DELETE FROM t WHERE a = # RETURNING *) SELECT * FROM d LIMIT #",
    "SELECT * FROM t WHERE a = #; TABLE u LIMIT #",
    "TABLE t LIMIT #",
    "INSERT INTO t VALUES (#) ON CONFLICT (a) DO UPDATE SET b = # WHERE t.c = #",
    "DECLARE c CURSOR FOR SELECT * FROM t WHERE a = #",
    "SELECT generate_series(#, #)",
    "SET LOCAL lock_timeout = #; SELECT #",
    "SELECT * FROM t WHERE a =#",
    "SELECT * FROM t WHERE a = - #",
    "SELECT * FROM t WHERE a =-#",
    "select * from t where a = # limit #;select * from t where b = #",
    "SELECT * FROM t WHERE a = # UNION SELECT * FROM u WHERE b = #",
    "CREATE INDEX i ON t (a) WITH (fillfactor = #) WHERE b = #",
    "SELECT lo_export(#, @)",
    "DO $$ BEGIN PERFORM #; END $$",
    "SELECT * FROM t WHERE (a) = #",
    "SELECT * FROM t WHERE a = # e",
    "SELECT * FROM t WHERE a = #.5",
    "SELECT * FROM t WHERE a.b = #",
    "SELECT * FROM t JOIN u x ON x.a = # JOIN (SELECT # AS b) y ON y.b = #",
    "ALTER TABLE t SET (autovacuum_enabled = on, fillfactor = #)",
    "CREATE TABLE t (a int) WITH (autovacuum_enabled = on, fillfactor = #)",
    "EXPLAIN (ANALYZE ON, COSTS #) DELETE FROM t WHERE a = #",
    "EXPLAIN (ANALYZE #, COSTS ON) DELETE FROM t WHERE a = #",
];

/// A few policies, so a classification that differed would show as a different verdict.
fn policies() -> Vec<PolicySet> {
    [
        "[[target]]\nname = \"db\"\n[[rule]]\nid = \"reads\"\nverdict = \"allow\"\nsql = { class = [\"read\", \"session\", \"transaction\"] }\n",
        "[[target]]\nname = \"db\"\ndefault = \"allow\"\non_unknown = \"approve\"\n[[rule]]\nid = \"no-writes\"\nverdict = \"deny\"\nsql = { class = [\"write\", \"privileged\", \"ddl\"] }\n",
        "[[target]]\nname = \"db\"\n[[rule]]\nid = \"public\"\nverdict = \"allow\"\nsql = { class = [\"any\"], objects = [\"public.*\"] }\n[[rule]]\nid = \"no-t\"\nverdict = \"deny\"\nsql = { objects = [\"t\"] }\n",
    ]
    .iter()
    .map(|p| policy(p).without_cache())
    .collect()
}

/// Classifies `sql` through `cache` and without one, and requires the same classification and
/// the same verdict under every policy.
fn same_through_cache(cache: &SqlCache, policies: &[PolicySet], sql: &str) -> Result<(), String> {
    let cached = cache.classify(sql, None);
    let uncached = Arc::new(super::classify(sql, None));
    if cached != uncached {
        let mut key = String::new();
        shape_key(sql, &mut key);
        return Err(format!(
            "{sql:?} (key {key:?}):\n  cached   {cached:?}\n  uncached {uncached:?}"
        ));
    }
    let id = agent();
    for p in policies {
        let verdict = |c: &Arc<Classification>| {
            let d = p.evaluate(&Request {
                target: TargetRef {
                    name: "db",
                    protocol: Protocol::Postgres,
                },
                identity: &id,
                action: Action::SqlClassified(c),
            });
            (d.verdict, d.rules)
        };
        if verdict(&cached) != verdict(&uncached) {
            return Err(format!("{sql:?}: verdicts differ"));
        }
    }
    Ok(())
}

/// `template` with its slots filled from `picks` (an index into NUMBERS or STRINGS per slot).
fn fill(template: &str, picks: &[usize]) -> String {
    let mut out = String::new();
    let mut picks = picks.iter().copied();
    for c in template.chars() {
        match c {
            '#' => out.push_str(NUMBERS[picks.next().unwrap_or(0) % NUMBERS.len()]),
            '@' => out.push_str(STRINGS[picks.next().unwrap_or(0) % STRINGS.len()]),
            c => out.push(c),
        }
    }
    out
}

/// Every filling of `template` (or, past `limit`, `limit` of them chosen by a fixed seed).
fn fillings(template: &str, limit: usize) -> Vec<String> {
    let sizes: Vec<usize> = template
        .chars()
        .filter_map(|c| match c {
            '#' => Some(NUMBERS.len()),
            '@' => Some(STRINGS.len()),
            _ => None,
        })
        .collect();
    let total = sizes.iter().try_fold(1usize, |a, s| a.checked_mul(*s));
    let mut out = Vec::new();
    if total.is_some_and(|t| t <= limit) {
        let mut picks = vec![0; sizes.len()];
        loop {
            out.push(fill(template, &picks));
            let Some(i) = (0..sizes.len()).find(|&i| picks[i] + 1 < sizes[i]) else {
                break;
            };
            picks[i] += 1;
            picks[..i].iter_mut().for_each(|p| *p = 0);
        }
    } else {
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        for _ in 0..limit {
            let picks: Vec<usize> = sizes
                .iter()
                .map(|s| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    usize::try_from(seed % *s as u64).unwrap_or(0)
                })
                .collect();
            out.push(fill(template, &picks));
        }
    }
    out
}

/// The numeric literals of a statement as slots: digit runs outside quotes and comments that
/// do not continue a name, a parameter or a decimal.
fn slots_of(sql: &str) -> Option<String> {
    let b = sql.as_bytes();
    let mut out = String::new();
    let mut i = 0;
    let mut any = false;
    while i < b.len() {
        let c = b[i];
        if c == b'\'' || c == b'"' {
            let end = b[i + 1..].iter().position(|&d| d == c)? + i + 2;
            out.push_str(&sql[i..end]);
            i = end;
        } else if sql[i..].starts_with("--") || sql[i..].starts_with("/*") || c == b'$' {
            out.push_str(&sql[i..]);
            break;
        } else if c.is_ascii_digit()
            && (i == 0 || !(b[i - 1].is_ascii_alphanumeric() || b"_$.".contains(&b[i - 1])))
        {
            let end = i + b[i..].iter().take_while(|d| d.is_ascii_digit()).count();
            out.push('#');
            any = true;
            i = end;
        } else {
            let ch = sql[i..].chars().next()?;
            out.push(ch);
            i += ch.len_utf8();
        }
    }
    any.then_some(out)
}

#[derive(Deserialize)]
struct Cases {
    case: Vec<CaseSql>,
}

#[derive(Deserialize)]
struct CaseSql {
    sql: String,
}

#[test]
fn a_warm_cache_classifies_every_filling_of_every_template_as_no_cache_does() {
    // One cache for everything: any two statements that share a key, from any template, are
    // compared (each with the uncached classifier, so with each other).
    let cache = SqlCache::with_capacity(1 << 20);
    let policies = policies();
    let mut failures = Vec::new();
    let mut count = 0;
    let cases: Cases =
        toml::from_str(include_str!("testdata/sql_cases.toml")).expect("sql_cases.toml parses");
    let from_cases: Vec<String> = cases.case.iter().filter_map(|c| slots_of(&c.sql)).collect();
    assert!(
        from_cases.len() >= 40,
        "only {} cases have numbers",
        from_cases.len()
    );
    for template in TEMPLATES.iter().map(|t| (*t).to_string()).chain(from_cases) {
        for sql in fillings(&template, 512) {
            count += 1;
            if let Err(e) = same_through_cache(&cache, &policies, &sql) {
                failures.push(e);
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {count} statements classified differently through the cache:\n{}",
        failures.len(),
        failures[..failures.len().min(10)].join("\n")
    );
    assert!(
        cache.hits() > 1000,
        "the cache must be warm for the comparison to mean anything ({} hits)",
        cache.hits()
    );
}

/// Pieces of generated statements: `#` a number slot, `@` a string slot.
const PREFIXES: &[&str] = &[
    "",
    "",
    "EXPLAIN ",
    "EXPLAIN (ANALYZE #) ",
    "EXPLAIN (ANALYZE #, COSTS #) ",
    "EXPLAIN (ANALYZE @) ",
    "WITH x AS (SELECT # AS a) ",
    "PREPARE p AS ",
];
const CORES: &[&str] = &[
    "SELECT a, # FROM t",
    "SELECT * FROM t JOIN u ON t.a = #",
    "DELETE FROM t",
    "UPDATE t SET a = a + #",
    "UPDATE t SET a = #, b = -#",
    "UPDATE pg_settings SET setting = #",
    "INSERT INTO t VALUES (#, @)",
    "INSERT INTO t (a) VALUES (-#), (#)",
    "SELECT set_config(@, @, false)",
    "SELECT set_config(@, #, false)",
    "SELECT pg_sleep(#)",
    "TABLE t",
    "VALUES (#)",
    "SELECT a[#] FROM t",
    "SET client_encoding = @",
    "SET search_path = @",
    "SET x = #",
    "COPY t FROM STDIN WITH (FREEZE #)",
];
const CONDITIONS: &[&str] = &[
    "",
    " WHERE a = #",
    " WHERE a > -# AND (b <> # OR c = @)",
    " WHERE a IN (#, #)",
    " WHERE a = (SELECT # FROM u WHERE b = #)",
    " WHERE CASE WHEN a = # THEN true END",
    " WHERE f(a = #)",
];
const TAILS: &[&str] = &[
    "",
    " LIMIT #",
    " LIMIT # OFFSET #",
    " RETURNING a = #",
    " FOR UPDATE",
    " ORDER BY #",
];
const NEXT: &[&str] = &[
    "",
    "",
    "; SELECT #",
    "; SET client_encoding = @",
    "; DELETE FROM t WHERE a = #",
];

fn generated() -> impl Strategy<Value = (String, Vec<Vec<usize>>)> {
    (
        prop::sample::select(PREFIXES),
        prop::sample::select(CORES),
        prop::sample::select(CONDITIONS),
        prop::sample::select(TAILS),
        prop::sample::select(NEXT),
        prop::collection::vec(prop::collection::vec(0..64usize, 16), 2..6),
    )
        .prop_map(|(p, c, w, t, n, picks)| (format!("{p}{c}{w}{t}{n}"), picks))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn generated_statements_classify_the_same_through_a_warm_cache((template, picks) in generated()) {
        let cache = SqlCache::default();
        let policies = policies();
        for p in &picks {
            let sql = fill(&template, p);
            if let Err(e) = same_through_cache(&cache, &policies, &sql) {
                prop_assert!(false, "{}", e);
            }
        }
    }
}

fn key(s: &str) -> Option<String> {
    let mut out = String::new();
    shape_key(s, &mut out).then_some(out)
}

#[test]
fn shape_keys_fold_only_literals_that_are_data() {
    for (sql, folded) in [
        (
            "SELECT abalance FROM pgbench_accounts WHERE aid = 12345;",
            "SELECT abalance FROM pgbench_accounts WHERE aid = 0;",
        ),
        (
            "UPDATE pgbench_accounts SET abalance = abalance + -4321 WHERE aid = 12345;",
            "UPDATE pgbench_accounts SET abalance = abalance + -0 WHERE aid = 0;",
        ),
        (
            "INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES (3, 1, 12345, -4321, CURRENT_TIMESTAMP);",
            "INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES (0, 0, 0, -0, CURRENT_TIMESTAMP);",
        ),
        (
            "select * from t where a = 7 and (\"b\" <> -8 or c.d >= 9) limit 10 offset 20",
            "select * from t where a = 0 and (\"b\" <> -0 or c.d >= 0) limit 0 offset 0",
        ),
        (
            "SELECT * FROM t JOIN u ON u.a = 5 WHERE t.b IN (SELECT c FROM v WHERE d = 6) -- 42\n/* 5 /* 6 */ 7 */",
            "SELECT * FROM t JOIN u ON u.a = 0 WHERE t.b IN (SELECT c FROM v WHERE d = 0) -- 42\n/* 5 /* 6 */ 7 */",
        ),
        (
            "SELECT * FROM t JOIN u x ON x.a = 5 JOIN (SELECT 1 AS b) y ON y.b = 6",
            "SELECT * FROM t JOIN u x ON x.a = 0 JOIN (SELECT 1 AS b) y ON y.b = 0",
        ),
        (
            "SELECT 'it''s', 2 FROM t WHERE a = 3",
            "SELECT 'it''s', 2 FROM t WHERE a = 0",
        ),
    ] {
        assert_eq!(key(sql).as_deref(), Some(folded), "{sql}");
    }
    // Literals whose value the classifier reads, or might: kept.
    for sql in [
        "EXPLAIN (ANALYZE 1) DELETE FROM t",
        "EXPLAIN (ANALYZE 1, VERBOSE 1) SELECT 1",
        "SET statement_timeout = 5",
        "SET client_encoding = 6",
        "SELECT set_config('x', 5, false)",
        "SELECT pg_sleep(5)",
        "SELECT 5, a[5] FROM t",
        "SELECT * FROM t WHERE f(a = 5)",
        "SELECT * FROM t WHERE a IN (5, 6)",
        "SELECT * FROM t WHERE CASE WHEN a = 5 THEN true END",
        "SELECT * FROM t WHERE a = 1.5 OR a = 1e5 OR a = 0x1F OR a = 5::int OR a = .5",
        "ALTER TABLE t SET (autovacuum_enabled = on, fillfactor = 70)",
        "CREATE TABLE t (a int) WITH (autovacuum_enabled = on, fillfactor = 70)",
        "EXPLAIN (ANALYZE ON, COSTS 1) SELECT 1",
        "SELECT * FROM t WHERE a =-5",
        "CREATE ROLE r CONNECTION LIMIT 5",
        "ALTER ROLE r SET work_mem = 5",
        "COPY t FROM STDIN WITH (FREEZE 1)",
        "VACUUM (PARALLEL 2) t",
        "INSERT INTO t VALUES (f(5), (6), 7::int)",
        "WITH x AS (SELECT 1) UPDATE t SET a = 5",
        "UPDATE pg_settings SET setting = 5 WHERE name = 'x' AND a = 6",
        "SELECT * FROM \"PG_Settings\" WHERE a = 6",
        "SELECT $1, t0.c FROM t0 WHERE a = $2",
    ] {
        assert_eq!(key(sql), None, "{sql}");
    }
    assert_eq!(
        key("INSERT INTO t VALUES (1) ON CONFLICT (a) DO UPDATE SET b = 5").as_deref(),
        Some("INSERT INTO t VALUES (0) ON CONFLICT (a) DO UPDATE SET b = 5"),
        "a value to insert, but not the one to update"
    );
    assert_eq!(
        key("SELECT * FROM t WHERE a = 0").as_deref(),
        Some("SELECT * FROM t WHERE a = 0"),
        "a literal already in its folded form still makes a key shared with others"
    );
    // Forms the scanner does not follow are keyed by their exact text.
    for sql in [
        "SELECT * FROM t WHERE a = 1 AND b = E'\\''",
        "SELECT * FROM t WHERE a = 1 AND b = $$x$$",
        "SELECT * FROM t WHERE a = 1 AND b = 'unterminated",
        "SELECT * FROM t WHERE a = 1 /* unterminated",
        "SELECT * FROM t WHERE a = 1)",
        "SELECT * FROM t WHERE (a = 1",
        "SELECT * FROM t WHERE a = 1\x0b",
    ] {
        assert_eq!(key(sql), None, "{sql:?}");
    }
}

#[test]
fn explain_analyze_with_a_number_is_never_served_the_plan_only_entry() {
    let cache = SqlCache::default();
    let plan = cache.classify("EXPLAIN (ANALYZE 0) DELETE FROM t WHERE a = 1", None);
    let runs = cache.classify("EXPLAIN (ANALYZE 1) DELETE FROM t WHERE a = 2", None);
    assert!(!plan.classes.contains(&super::SqlClass::Delete), "{plan:?}");
    assert!(runs.classes.contains(&super::SqlClass::Delete), "{runs:?}");
}

#[test]
fn a_message_the_key_scanner_gives_up_on_is_cached_under_its_own_text() {
    // Once, the key of a message the scanner gave up on half-way was the folded text up to
    // there: one session's unparsable message was then served to every session's pgbench
    // SELECT.
    let cache = SqlCache::default();
    let bad = cache.classify(
        "SELECT abalance FROM pgbench_accounts WHERE aid = 5 $$",
        None,
    );
    assert!(bad.classes.contains(&super::SqlClass::Unknown));
    let good = cache.classify("SELECT abalance FROM pgbench_accounts WHERE aid = 7", None);
    assert_eq!(good.headline(), Some(super::SqlClass::Read), "{good:?}");
}

/// pgbench's TPC-B-like script with `-M simple`, values inlined.
fn pgbench_transaction(aid: i64, bid: i64, tid: i64, delta: i64) -> [String; 7] {
    [
        "BEGIN;".into(),
        format!("UPDATE pgbench_accounts SET abalance = abalance + {delta} WHERE aid = {aid};"),
        format!("SELECT abalance FROM pgbench_accounts WHERE aid = {aid};"),
        format!("UPDATE pgbench_tellers SET tbalance = tbalance + {delta} WHERE tid = {tid};"),
        format!("UPDATE pgbench_branches SET bbalance = bbalance + {delta} WHERE bid = {bid};"),
        format!(
            "INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES ({tid}, {bid}, {aid}, {delta}, CURRENT_TIMESTAMP);"
        ),
        "END;".into(),
    ]
}

#[test]
fn pgbench_statements_hit_the_cache_whatever_their_values() {
    let cache = SqlCache::default();
    let mut seed = 0x2545_f491_4f6c_dd1d_u64;
    let mut next = |n: i64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        i64::try_from(seed % 1_000_000_007).unwrap_or(0) % n
    };
    let transactions = 500;
    for _ in 0..transactions {
        let (aid, bid, tid) = (next(10_000_000) + 1, next(100) + 1, next(1000) + 1);
        let delta = next(10_001) - 5000;
        for sql in pgbench_transaction(aid, bid, tid, delta) {
            let c = cache.classify(&sql, None);
            assert!(
                !c.classes.contains(&super::SqlClass::Unknown),
                "{sql}: {c:?}"
            );
        }
    }
    // BEGIN, END, the SELECT, and each UPDATE and the INSERT with a delta of either sign.
    assert!(cache.len() <= 11, "{} entries", cache.len());
    let statements = transactions * 7;
    assert!(
        cache.hits() >= statements - 11,
        "{} hits of {statements}",
        cache.hits()
    );
    // pgbench -S: one entry for every aid.
    let select_only = SqlCache::default();
    for aid in 1..=1000 {
        select_only.classify(
            &format!("SELECT abalance FROM pgbench_accounts WHERE aid = {aid};"),
            None,
        );
    }
    assert_eq!((select_only.len(), select_only.hits()), (1, 999));
}
