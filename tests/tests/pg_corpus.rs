//! The classifier against PostgreSQL itself (issue #12): every statement of PostgreSQL 15's own
//! regression SQL (`tests/data/pg_regress/`, see its README) is run by a real PostgreSQL 15
//! inside a read-only transaction, the oracle, and judged in process by the gateway's policy
//! engine under a read-only policy (reads, transaction control and ordinary settings allowed,
//! everything else denied, unknowns denied).
//!
//! - The oracle: `BEGIN READ ONLY; <statement>; ROLLBACK` (inside a transaction the file opened
//!   itself: `SAVEPOINT; SET TRANSACTION READ ONLY; <statement>; ROLLBACK TO SAVEPOINT`).
//!   SQLSTATE 25006 (read_only_sql_transaction) means the statement writes; success means it
//!   does not write to anything but temporary tables; any other error makes it not comparable.
//! - State: after the oracle, each statement is run for real, outside the read-only
//!   transaction, as psql would run it, so that what a file creates (tables, functions,
//!   cursors, prepared statements) exists for the statements after it. Files run in schedule
//!   order on one database, each on a connection of its own; the standard tables of
//!   `test_setup.sql` exist but stay empty (their data comes through psql variables).
//! - Skipped and counted: psql meta-commands, `COPY ... FROM STDIN` and its data, statements
//!   that use psql variables, and transaction control (run for real, not compared).
//!
//! Each statement is judged twice, without and through the classification cache (as the daemon
//! judges); the verdicts must agree.
//!
//! It fails on any statement the oracle says writes and the policy allows, and on a false-deny
//! rate at or above 1%, where a false deny is a read denied for a reason no policy intends.
//! Reads denied by design are counted apart, by reason: a function that is not a built-in
//! (`pg_catalog`; the gateway cannot see what a user's function does), `DO`/`CALL`, a write
//! to a temporary table (the server lets those through a read-only transaction), explicit
//! locks, `PREPARE`/`EXECUTE` of a write, and settings the gateway judges (`search_path`,
//! `role`, `client_encoding`, ...).

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    fmt::Write as _,
    path::{Path, PathBuf},
    sync::Arc,
    time::Instant,
};

use bulkhead::{
    identity::ProcessIdentity,
    policy::{
        parse_file, Action, Classification, PolicySet, PreparedStatements, Request, SqlClass,
        TargetRef, Verdict,
    },
    protocol::Protocol,
};
use bulkhead_tests::{require_root, Topology};
use tokio_postgres::{error::SqlState, Client, NoTls, SimpleQueryMessage};

const READ_ONLY_POLICY: &str = r#"
[[target]]
name = "db"
protocol = "postgres"
default = "deny"
on_unknown = "deny"

[[rule]]
id = "read-only"
verdict = "allow"
target = { name = ["db"] }
sql = { class = ["read", "transaction", "session"] }
"#;

/// Highest share of reads the policy may deny for reasons no policy intends.
const MAX_FALSE_DENY_RATE: f64 = 0.01;
/// Fewest statements the oracle must judge for the test to mean anything.
const MIN_COMPARED: usize = 10_000;

fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("data/pg_regress")
}

/// One statement as psql would send it.
#[derive(Debug)]
struct Stmt {
    sql: String,
    line: usize,
    /// Uses a psql variable (`:name`, `:'name'`, `:"name"`): psql rewrites it before sending.
    uses_variables: bool,
    /// Ended by `\gset PREFIX`: its result columns become psql variables.
    gset: Option<String>,
}

#[derive(Debug, Default)]
struct Split {
    statements: Vec<Stmt>,
    meta_commands: usize,
    copy_data_blocks: usize,
}

fn is_ident(c: char) -> bool {
    c.is_alphanumeric() || c == '_' || c == '$'
}

/// Splits a psql script into statements, as psql's lexer does: at semicolons outside quotes,
/// comments, dollar quotes and parentheses; backslash meta-commands end a line, and those that
/// send the query buffer (`\g`, `\gset`, `\gexec`, ...) end a statement.
#[expect(
    clippy::too_many_lines,
    clippy::many_single_char_names,
    reason = "one lexer loop, as psql's own: indices into one char buffer"
)]
fn split_psql(text: &str, variables: &mut HashSet<String>) -> Split {
    let chars: Vec<char> = text.chars().collect();
    let n = chars.len();
    let mut out = Split::default();
    let mut buf = String::new();
    let mut start_line = 1;
    let mut line = 1;
    let mut depth = 0usize;
    let mut uses_variables = false;
    let mut i = 0;
    let mut skip_copy_data = false;

    macro_rules! finish {
        ($gset:expr) => {{
            let sql = buf.trim().to_string();
            if !sql.is_empty() {
                let lower = sql.to_ascii_lowercase();
                let words: Vec<&str> = lower.split_whitespace().collect();
                if words.first() == Some(&"copy")
                    && words.windows(2).any(|w| w == ["from", "stdin"])
                {
                    skip_copy_data = true;
                }
                out.statements.push(Stmt {
                    sql,
                    line: start_line,
                    uses_variables,
                    gset: $gset,
                });
            }
            buf.clear();
            depth = 0;
            uses_variables = false;
        }};
    }

    while i < n {
        if skip_copy_data {
            // The data follows the statement's line, up to a line `\.`.
            while i < n && chars[i] != '\n' {
                i += 1;
            }
            loop {
                if i >= n {
                    break;
                }
                i += 1; // the newline
                line += 1;
                let start = i;
                while i < n && chars[i] != '\n' {
                    i += 1;
                }
                let l: String = chars[start..i].iter().collect();
                if l.trim_end() == "\\." {
                    break;
                }
            }
            out.copy_data_blocks += 1;
            skip_copy_data = false;
            continue;
        }
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        if buf.trim().is_empty() {
            start_line = line;
        }
        match c {
            '\n' => {
                line += 1;
                buf.push(c);
                i += 1;
            }
            '-' if next == Some('-') => {
                while i < n && chars[i] != '\n' {
                    i += 1;
                }
            }
            '/' if next == Some('*') => {
                let mut open_comments = 0usize;
                while i < n {
                    if chars[i] == '/' && chars.get(i + 1) == Some(&'*') {
                        open_comments += 1;
                        buf.push_str("/*");
                        i += 2;
                    } else if chars[i] == '*' && chars.get(i + 1) == Some(&'/') {
                        open_comments -= 1;
                        buf.push_str("*/");
                        i += 2;
                        if open_comments == 0 {
                            break;
                        }
                    } else {
                        if chars[i] == '\n' {
                            line += 1;
                        }
                        buf.push(chars[i]);
                        i += 1;
                    }
                }
            }
            '\'' => {
                let mut prev = buf.chars().rev();
                let escapes =
                    matches!(prev.next(), Some('e' | 'E')) && !prev.next().is_some_and(is_ident);
                buf.push(c);
                i += 1;
                while i < n {
                    let q = chars[i];
                    buf.push(q);
                    i += 1;
                    if q == '\n' {
                        line += 1;
                    }
                    if escapes && q == '\\' && i < n {
                        buf.push(chars[i]);
                        i += 1;
                    } else if q == '\'' {
                        if chars.get(i) == Some(&'\'') {
                            buf.push('\'');
                            i += 1;
                        } else {
                            break;
                        }
                    }
                }
            }
            '"' => {
                buf.push(c);
                i += 1;
                while i < n {
                    let q = chars[i];
                    buf.push(q);
                    i += 1;
                    if q == '\n' {
                        line += 1;
                    }
                    if q == '"' {
                        if chars.get(i) == Some(&'"') {
                            buf.push('"');
                            i += 1;
                        } else {
                            break;
                        }
                    }
                }
            }
            '$' if !buf.chars().next_back().is_some_and(is_ident) => {
                // A dollar quote `$tag$ ... $tag$`, or a parameter `$1`.
                let mut j = i + 1;
                while j < n && (chars[j].is_alphanumeric() || chars[j] == '_') {
                    j += 1;
                }
                let tag_ok =
                    j < n && chars[j] == '$' && !chars.get(i + 1).is_some_and(char::is_ascii_digit);
                if tag_ok {
                    let tag: String = chars[i..=j].iter().collect();
                    let tag_chars: Vec<char> = tag.chars().collect();
                    buf.push_str(&tag);
                    i = j + 1;
                    while i < n {
                        if chars[i..].starts_with(&tag_chars) {
                            buf.push_str(&tag);
                            i += tag_chars.len();
                            break;
                        }
                        if chars[i] == '\n' {
                            line += 1;
                        }
                        buf.push(chars[i]);
                        i += 1;
                    }
                } else {
                    buf.push(c);
                    i += 1;
                }
            }
            ':' if next == Some(':') => {
                buf.push_str("::");
                i += 2;
            }
            ':' => {
                // psql substitutes `:name` only for a variable it has.
                if matches!(next, Some('\'' | '"')) {
                    uses_variables = true;
                } else {
                    let mut j = i + 1;
                    while j < n && (chars[j].is_alphanumeric() || chars[j] == '_') {
                        j += 1;
                    }
                    let name: String = chars[i + 1..j].iter().collect();
                    if variables.contains(&name) {
                        uses_variables = true;
                    }
                }
                buf.push(c);
                i += 1;
            }
            '\\' => {
                let start = i + 1;
                let mut j = start;
                while j < n && !chars[j].is_whitespace() && chars[j] != '\\' {
                    j += 1;
                }
                let name: String = chars[start..j].iter().collect();
                let mut k = j;
                while k < n && chars[k] != '\n' {
                    k += 1;
                }
                let args: String = chars[j..k].iter().collect();
                let args = args.trim();
                i = k;
                match name.as_str() {
                    "g" | "gx" | "gexec" | "gdesc" | "crosstabview" | "G" => finish!(None),
                    "gset" => finish!(Some(args.to_string())),
                    _ => {
                        out.meta_commands += 1;
                        let mut words = args.split_whitespace();
                        if matches!(name.as_str(), "set" | "getenv") {
                            if let Some(var) = words.next() {
                                variables.insert(var.to_string());
                            }
                        }
                        let lower = args.to_ascii_lowercase();
                        if name == "copy" && lower.contains("from stdin") {
                            skip_copy_data = true;
                        }
                    }
                }
            }
            '(' => {
                depth += 1;
                buf.push(c);
                i += 1;
            }
            ')' => {
                depth = depth.saturating_sub(1);
                buf.push(c);
                i += 1;
            }
            ';' if depth == 0 => {
                i += 1;
                finish!(None);
            }
            _ => {
                buf.push(c);
                i += 1;
            }
        }
    }
    out
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TxnControl {
    Begin,
    End,
    Other,
}

/// Transaction control, as far as the file's own transaction goes.
fn txn_control(sql: &str) -> Option<TxnControl> {
    let lower = sql.to_ascii_lowercase();
    let words: Vec<&str> = lower
        .split(|c: char| c.is_whitespace() || c == ';')
        .filter(|w| !w.is_empty())
        .collect();
    let chain = lower.contains("and chain") && !lower.contains("and no chain");
    match words.as_slice() {
        ["begin" | "start", ..] => Some(TxnControl::Begin),
        ["rollback" | "abort", "to", ..]
        | ["commit" | "rollback", "prepared", ..]
        | ["savepoint" | "release", ..] => Some(TxnControl::Other),
        ["commit" | "end" | "rollback" | "abort", ..] if chain => Some(TxnControl::Other),
        ["commit" | "end" | "rollback" | "abort", ..] | ["prepare", "transaction", ..] => {
            Some(TxnControl::End)
        }
        _ => None,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Oracle {
    Reads,
    Writes,
}

#[derive(Default)]
struct Tally {
    files: usize,
    statements: usize,
    meta_commands: usize,
    copy_data_blocks: usize,
    copy_from_stdin: usize,
    uses_variables: usize,
    transaction_control: usize,
    not_comparable: BTreeMap<String, usize>,
    reads: usize,
    writes: usize,
    writes_denied: usize,
    reads_allowed: usize,
    false_denies: Vec<(String, String, String)>,
    denied_by_design: BTreeMap<&'static str, usize>,
    writes_allowed: Vec<(String, String, String)>,
    /// Statements whose verdict through the classification cache differs from without it.
    cache_differs: Vec<String>,
    reconnects: usize,
}

async fn connect(socket_dir: &Path, db: &str) -> Client {
    let (client, conn) = tokio_postgres::Config::new()
        .host_path(socket_dir)
        .port(5432)
        .user("admin")
        .dbname(db)
        .connect(NoTls)
        .await
        .unwrap_or_else(|e| panic!("connect to {db}: {e}"));
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

/// Runs one statement the way the oracle judges it; `in_txn`: inside the file's own
/// transaction.
async fn oracle(client: &Client, sql: &str, in_txn: bool) -> Result<Oracle, String> {
    let (open, close) = if in_txn {
        (
            "SAVEPOINT bh_oracle; SET TRANSACTION READ ONLY",
            "ROLLBACK TO SAVEPOINT bh_oracle; RELEASE SAVEPOINT bh_oracle",
        )
    } else {
        ("BEGIN READ ONLY", "ROLLBACK")
    };
    if let Err(e) = client.simple_query(open).await {
        return Err(format!(
            "oracle could not open: {}",
            e.code().map_or("closed", SqlState::code)
        ));
    }
    let result = client.simple_query(sql).await;
    let _ = client.simple_query(close).await;
    match result {
        Ok(_) => Ok(Oracle::Reads),
        Err(e) => match e.code() {
            Some(code) if *code == SqlState::READ_ONLY_SQL_TRANSACTION => Ok(Oracle::Writes),
            Some(code) => Err(code.code().to_string()),
            None => Err("connection".into()),
        },
    }
}

/// PostgreSQL's own functions by name: all of them, and those with a VOLATILE overload.
struct Builtins {
    all: HashSet<String>,
    volatile: HashSet<String>,
}

/// Cursors the gateway let a session open, by name: a `FETCH` or `MOVE` of another cursor could
/// not happen through the gateway (the server would have no such cursor).
fn cursor_name(word: &str) -> String {
    let word = word.trim_end_matches(';');
    match word.strip_prefix('"').and_then(|w| w.strip_suffix('"')) {
        Some(quoted) => quoted.to_string(),
        None => word.to_ascii_lowercase(),
    }
}

/// Why a read was denied, and whether a policy means to deny it (`Some(category)`).
#[expect(clippy::too_many_lines, reason = "one list of categories")]
fn deny_reason(
    sql: &str,
    c: &Classification,
    builtins: &Builtins,
) -> (String, Option<&'static str>) {
    let lead = sql
        .split(|ch: char| !ch.is_ascii_alphabetic())
        .find(|w| !w.is_empty())
        .unwrap_or_default()
        .to_ascii_lowercase();
    let lower = sql.to_ascii_lowercase();
    let words: Vec<&str> = lower.split_whitespace().take(8).collect();
    if words.first() == Some(&"set") && words.iter().any(|w| matches!(*w, "role" | "authorization"))
    {
        return (
            "SET ROLE / SESSION AUTHORIZATION".into(),
            Some("a role change"),
        );
    }
    if lead == "explain"
        && words.iter().any(|w| w.contains("analyze"))
        && lower.split_whitespace().any(|w| w == "as")
    {
        // PostgreSQL 15 runs EXPLAIN ANALYZE CREATE TABLE / MATERIALIZED VIEW ... AS in a
        // read-only transaction: a write the oracle cannot see.
        if lower.contains("create table") || lower.contains("create materialized view") {
            return (
                "EXPLAIN ANALYZE CREATE ... AS".into(),
                Some("EXPLAIN ANALYZE CREATE ... AS (a write the read-only oracle lets through)"),
            );
        }
    }
    if matches!(lead.as_str(), "insert" | "update" | "delete" | "merge") {
        return (
            format!("{lead} statement"),
            Some("a write the server let through (temporary table)"),
        );
    }
    let unknown_reason = c.unknown_reasons.first();
    if c.classes.contains(&SqlClass::Unknown) && unknown_reason.is_none() {
        let missing: Vec<&String> = c
            .unknown_functions
            .iter()
            .filter(|f| !f.contains('.') && builtins.all.contains(f.as_str()))
            .collect();
        if !missing.is_empty()
            && missing
                .iter()
                .all(|f| builtins.volatile.contains(f.as_str()))
        {
            return (
                format!("volatile built-in: {missing:?}"),
                Some("a VOLATILE built-in not vetted as read-only (large objects)"),
            );
        }
        if missing.is_empty() {
            return (
                format!("user function {:?}", c.unknown_functions),
                Some("a function that is not a built-in"),
            );
        }
        return (format!("built-in function not listed: {missing:?}"), None);
    }
    if let Some(reason) = unknown_reason {
        let reason = reason
            .split(" at Line:")
            .next()
            .unwrap_or(reason)
            .to_string();
        if reason.contains("prepared") {
            return (
                reason,
                Some("EXECUTE of a statement not prepared as a read"),
            );
        }
        if reason.starts_with("search_path set to") || reason.starts_with("setting ") {
            return (
                reason,
                Some("a setting the gateway judges (search_path, standard_conforming_strings)"),
            );
        }
        return (reason, None);
    }
    let denied: Vec<SqlClass> = c
        .classes
        .iter()
        .copied()
        .filter(|k| {
            !matches!(
                k,
                SqlClass::Read | SqlClass::Transaction | SqlClass::Session
            )
        })
        .collect();
    let names: Vec<&str> = denied.iter().map(|k| k.name()).collect();
    let category = match denied.as_slice() {
        [SqlClass::Procedural] => Some("DO or CALL (code the gateway cannot see)"),
        [SqlClass::Lock] => Some("an explicit lock (LOCK TABLE, FOR UPDATE on nothing)"),
        [SqlClass::Role] => Some("a role change"),
        [SqlClass::Maintenance] => Some("ANALYZE (the server runs it read-only)"),
        [SqlClass::FileAccess] => Some("server files (pg_ls_waldir, ...)"),
        _ if denied.iter().all(|k| {
            matches!(
                k,
                SqlClass::Insert
                    | SqlClass::Update
                    | SqlClass::Delete
                    | SqlClass::Merge
                    | SqlClass::Sequence
                    | SqlClass::AdminFunction
                    | SqlClass::Notify
                    | SqlClass::Lock
                    | SqlClass::Procedural
            )
        }) =>
        {
            Some("a write or side effect the server did not reach (no row, temporary table)")
        }
        _ => None,
    };
    (format!("class {}", names.join("+")), category)
}

#[test]
#[expect(
    clippy::too_many_lines,
    reason = "the oracle loop reads best in one place"
)]
fn regression_corpus_under_read_only_policy() {
    require_root();
    let started = Instant::now();
    let dir = corpus_dir();
    let schedule = std::fs::read_to_string(dir.join("schedule")).expect("schedule");
    let files: Vec<&str> = schedule.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(files.len() > 100, "schedule lists {} files", files.len());

    let parsed = parse_file(Path::new("read-only.toml"), READ_ONLY_POLICY).expect("policy");
    let set =
        PolicySet::new(parsed.rules.clone(), parsed.targets.clone(), Vec::new()).without_cache();
    // The daemon's way, through the classification cache: every verdict must be the same.
    let cached = PolicySet::new(parsed.rules, parsed.targets, Vec::new());
    let identity = ProcessIdentity::default();
    let target = TargetRef {
        name: "db",
        protocol: Protocol::Postgres,
    };

    let topo = Topology::new("");
    let pg = topo.postgres("scram-sha-256");
    let socket_dir = pg.data.clone();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let mut tally = Tally::default();
    rt.block_on(async {
        let admin = connect(&socket_dir, "postgres").await;
        for setup in [
            "CREATE DATABASE regression TEMPLATE template0",
            "ALTER DATABASE regression SET statement_timeout = '5s'",
            "ALTER DATABASE regression SET lock_timeout = '2s'",
        ] {
            admin.batch_execute(setup).await.expect(setup);
        }
        let names = |sql: &'static str| {
            let admin = &admin;
            async move {
                admin
                    .simple_query(sql)
                    .await
                    .expect("built-in functions")
                    .into_iter()
                    .filter_map(|m| match m {
                        SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
                        _ => None,
                    })
                    .collect::<HashSet<String>>()
            }
        };
        let builtins = Builtins {
            all: names("SELECT DISTINCT proname FROM pg_proc WHERE pronamespace = 'pg_catalog'::regnamespace").await,
            volatile: names("SELECT DISTINCT proname FROM pg_proc WHERE pronamespace = 'pg_catalog'::regnamespace AND provolatile = 'v'").await,
        };
        drop(admin);

        for file in &files {
            tally.files += 1;
            let text = std::fs::read_to_string(dir.join("sql").join(format!("{file}.sql")))
                .unwrap_or_else(|e| panic!("{file}: {e}"));
            let mut variables = HashSet::new();
            let split = split_psql(&text, &mut variables);
            tally.meta_commands += split.meta_commands;
            tally.copy_data_blocks += split.copy_data_blocks;
            let mut client = connect(&socket_dir, "regression").await;
            let mut in_txn = false;
            let mut prepared = PreparedStatements::default();
            let mut cursors: HashSet<String> = HashSet::new();
            for stmt in split.statements {
                tally.statements += 1;
                let lower = stmt.sql.to_ascii_lowercase();
                if lower.starts_with("copy") && lower.contains("stdin") {
                    tally.copy_from_stdin += 1;
                    continue;
                }
                // psql's variables are known only as they are set, including by \gset.
                if stmt.uses_variables {
                    tally.uses_variables += 1;
                    continue;
                }
                if client.is_closed() {
                    tally.reconnects += 1;
                    client = connect(&socket_dir, "regression").await;
                    in_txn = false;
                }
                let control = txn_control(&stmt.sql);
                let judged = if control.is_some() {
                    tally.transaction_control += 1;
                    None
                } else {
                    Some(oracle(&client, &stmt.sql, in_txn).await)
                };
                // Run it for real, so what it creates exists for the statements after it.
                let real = client.simple_query(&stmt.sql).await;
                match control {
                    Some(TxnControl::Begin) => in_txn = true,
                    Some(TxnControl::End) => in_txn = false,
                    _ => {}
                }
                if let (Some(prefix), Ok(messages)) = (&stmt.gset, &real) {
                    for m in messages {
                        if let SimpleQueryMessage::Row(r) = m {
                            for col in r.columns() {
                                variables.insert(format!("{prefix}{}", col.name()));
                            }
                        }
                    }
                }
                let Some(mut judged) = judged else { continue };
                let words: Vec<&str> = stmt.sql.split_whitespace().collect();
                let lead = words.first().map(|w| w.to_ascii_lowercase());
                if matches!(lead.as_deref(), Some("fetch" | "move"))
                    && words.last().is_some_and(|w| !cursors.contains(&cursor_name(w)))
                {
                    judged = Err("cursor the gateway would not have opened".into());
                }
                let decision = set.evaluate(&Request {
                    target,
                    identity: &identity,
                    action: Action::Sql {
                        text: &stmt.sql,
                        prepared: Some(&prepared),
                    },
                });
                let through_cache = cached.evaluate(&Request {
                    target,
                    identity: &identity,
                    action: Action::Sql {
                        text: &stmt.sql,
                        prepared: Some(&prepared),
                    },
                });
                if through_cache.decided != decision.decided {
                    tally.cache_differs.push(format!(
                        "{file}.sql:{}: {} uncached, {} cached",
                        stmt.line, decision.decided, through_cache.decided
                    ));
                }
                let classification = decision.sql.clone().unwrap_or_default();
                for (name, what) in &classification.prepared {
                    prepared.insert(name, Arc::clone(what));
                }
                let allowed = decision.decided == Verdict::Allow;
                match (lead.as_deref(), words.get(1)) {
                    (Some("declare"), Some(name)) if allowed => {
                        cursors.insert(cursor_name(name));
                    }
                    (Some("declare" | "close"), Some(name)) => {
                        cursors.remove(&cursor_name(name));
                    }
                    _ => {}
                }
                let here = format!("{file}.sql:{}", stmt.line);
                let text: String = stmt.sql.chars().take(300).collect();
                match judged {
                    Err(code) => {
                        *tally.not_comparable.entry(code).or_default() += 1;
                    }
                    Ok(Oracle::Writes) => {
                        tally.writes += 1;
                        if allowed {
                            tally.writes_allowed.push((
                                here,
                                text,
                                format!("{:?}", classification.classes),
                            ));
                        } else {
                            tally.writes_denied += 1;
                        }
                    }
                    Ok(Oracle::Reads) => {
                        tally.reads += 1;
                        if allowed {
                            tally.reads_allowed += 1;
                        } else {
                            let (reason, by_design) =
                                deny_reason(&stmt.sql, &classification, &builtins);
                            match by_design {
                                Some(category) => {
                                    *tally.denied_by_design.entry(category).or_default() += 1;
                                }
                                None => tally.false_denies.push((here, text, reason)),
                            }
                        }
                    }
                }
            }
        }
    });
    drop(pg);

    let report = report(&tally, started);
    println!("{report}");
    // Every false deny, for whoever works on the classifier.
    if let Some(path) = std::env::var_os("BH_CORPUS_FALSE_DENIES") {
        let mut all = String::new();
        for (at, sql, reason) in &tally.false_denies {
            let _ = writeln!(all, "{at}\t{reason}\t{}", sql.replace(['\n', '\t'], " "));
        }
        std::fs::write(&path, all).expect("write the false denies");
    }
    let compared = tally.reads + tally.writes;
    assert!(
        compared >= MIN_COMPARED,
        "only {compared} statements compared\n{report}"
    );
    assert!(
        tally.writes_allowed.is_empty(),
        "{} statements the server runs as writes were allowed:\n{}\n{report}",
        tally.writes_allowed.len(),
        tally
            .writes_allowed
            .iter()
            .map(|(at, sql, classes)| format!("  {at}: {classes} {sql}"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(
        tally.cache_differs.is_empty(),
        "the classification cache changed {} verdicts:\n{}",
        tally.cache_differs.len(),
        tally.cache_differs.join("\n")
    );
    let rate = false_deny_rate(&tally);
    assert!(
        rate < MAX_FALSE_DENY_RATE,
        "false-deny rate {:.2}% is not under {:.0}%\n{report}",
        rate * 100.0,
        MAX_FALSE_DENY_RATE * 100.0
    );
}

#[expect(clippy::cast_precision_loss, reason = "counts far below 2^52")]
fn false_deny_rate(t: &Tally) -> f64 {
    t.false_denies.len() as f64 / t.reads.max(1) as f64
}

fn report(t: &Tally, started: Instant) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "corpus: {} files, {} statements in {:.1}s",
        t.files,
        t.statements,
        started.elapsed().as_secs_f64()
    );
    let _ = writeln!(
        s,
        "skipped: {} psql meta-commands, {} COPY FROM STDIN (+{} data blocks), {} using psql variables, {} transaction control; {} reconnects",
        t.meta_commands, t.copy_from_stdin, t.copy_data_blocks, t.uses_variables, t.transaction_control, t.reconnects
    );
    let not_comparable: usize = t.not_comparable.values().sum();
    let mut codes: Vec<(&String, &usize)> = t.not_comparable.iter().collect();
    codes.sort_by(|a, b| b.1.cmp(a.1));
    let codes: Vec<String> = codes
        .iter()
        .take(8)
        .map(|(c, n)| format!("{c}:{n}"))
        .collect();
    let _ = writeln!(
        s,
        "not comparable (other errors): {not_comparable} [{}]",
        codes.join(" ")
    );
    let _ = writeln!(
        s,
        "verdicts that differ through the classification cache: {}",
        t.cache_differs.len()
    );
    let _ = writeln!(
        s,
        "oracle writes: {} (denied {}, ALLOWED {})",
        t.writes,
        t.writes_denied,
        t.writes_allowed.len()
    );
    let by_design: usize = t.denied_by_design.values().sum();
    let _ = writeln!(
        s,
        "oracle reads: {} (allowed {}, denied by design {by_design}, false denies {} = {:.2}%)",
        t.reads,
        t.reads_allowed,
        t.false_denies.len(),
        false_deny_rate(t) * 100.0
    );
    for (category, n) in &t.denied_by_design {
        let _ = writeln!(s, "  by design: {n:5} {category}");
    }
    let mut reasons: HashMap<&str, Vec<&(String, String, String)>> = HashMap::new();
    for fd in &t.false_denies {
        reasons.entry(fd.2.as_str()).or_default().push(fd);
    }
    let mut reasons: Vec<_> = reasons.into_iter().collect();
    reasons.sort_by(|a, b| b.1.len().cmp(&a.1.len()).then(a.0.cmp(b.0)));
    let _ = writeln!(s, "top false-deny reasons:");
    for (reason, list) in reasons.iter().take(40) {
        let (at, sql, _) = list[0];
        let sql: String = sql.split_whitespace().collect::<Vec<_>>().join(" ");
        let sql: String = sql.chars().take(140).collect();
        let _ = writeln!(s, "  {:5} {reason}\n        e.g. {at}: {sql}", list.len());
    }
    s
}
