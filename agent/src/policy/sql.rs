//! SQL classification: what a whole simple-query message (or a prepared statement) would do.
//!
//! A message is judged by everything in it: every statement of a multi-statement message, every
//! data-modifying CTE, every function call, every statement a `PREPARE` holds or an `EXECUTE`
//! runs. The result is the *set* of classes; its most consequential member is the headline.
//!
//! Fail closed: what `sqlparser` cannot parse is split at top-level semicolons (the tokenizer
//! knows quotes, comments and dollar-quoting) and each piece parsed alone; a piece that still
//! fails is read from its tokens if it is a `COPY` with options the parser lacks (see
//! `sql_utility`), placed by its leading keywords only for a few statements the parser lacks
//! (`DO`, `ALTER SYSTEM`, `REINDEX`, ...), and otherwise is `unknown`. `VACUUM` and `ANALYZE`
//! are always read from their tokens (the parser rejects or misreads most of their forms). A call to a function that is not
//! a vetted read-only built-in is `unknown` too (see `sql_functions`).

use std::{
    collections::{BTreeSet, HashMap},
    fmt,
    sync::{Arc, LazyLock},
};

use serde::{Deserialize, Serialize};
use sqlparser::{
    ast::{Query, Statement},
    dialect::PostgreSqlDialect,
    keywords::Keyword,
    parser::Parser,
    tokenizer::{Token, TokenWithSpan, Tokenizer},
};

use super::{sql_settings, sql_utility, sql_walk::classify_statement};

/// Longest message classified; longer ones are `unknown` (the parser's time grows with size).
pub const MAX_SQL_LEN: usize = 1024 * 1024;
/// Deepest nesting the parser follows before giving up (its own stack guard).
pub(super) const RECURSION_LIMIT: usize = 64;

/// Longest identifier the server keeps, in bytes (`NAMEDATALEN - 1`); it cuts longer ones.
const MAX_IDENTIFIER_BYTES: usize = 63;

/// An identifier as PostgreSQL reads it with a UTF8 server encoding: an unquoted name loses its
/// ASCII capitals only (`downcase_identifier` leaves every other letter alone in a multibyte
/// encoding: `É` stays `É`), and any name is cut to 63 bytes at a character boundary
/// (`truncate_identifier`), so `SELECT * FROM ABC` and `"abc"` name one table and `"É"` and `é`
/// two.
pub fn fold_identifier(value: &str, quoted: bool) -> String {
    let mut out = if quoted {
        value.to_string()
    } else {
        value.to_ascii_lowercase()
    };
    if out.len() > MAX_IDENTIFIER_BYTES {
        let mut end = MAX_IDENTIFIER_BYTES;
        while !out.is_char_boundary(end) {
            end -= 1;
        }
        out.truncate(end);
    }
    out
}

/// PostgreSQL 15's `pg_catalog` relations, one a line, `#` comments, sorted (a test checks).
const CATALOG_RELATIONS_TEXT: &str = include_str!("builtin/pg15_catalog_relations.txt");

static CATALOG_RELATIONS: LazyLock<Vec<&'static str>> = LazyLock::new(|| {
    CATALOG_RELATIONS_TEXT
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect()
});

/// Where the server may find an unqualified relation name, given a search path the gateway
/// admits (`"$user", public` or `public`: neither names `pg_catalog`, which the server then
/// searches first). A relation of PostgreSQL 15's catalog is `pg_catalog.name`; another name
/// beginning with `pg_` may be a catalog relation of a newer server or a table in `public`, so
/// it is both; any other name is `public.name` (relations in `pg_catalog` all begin with `pg_`).
pub fn unqualified_resolutions(name: &str) -> &'static [&'static str] {
    if CATALOG_RELATIONS.binary_search(&name).is_ok() {
        &["pg_catalog"]
    } else if name.starts_with("pg_") {
        &["pg_catalog", "public"]
    } else {
        &["public"]
    }
}

/// What a statement does, ordered from least to most consequential.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SqlClass {
    /// BEGIN, COMMIT, ROLLBACK, SAVEPOINT, SET TRANSACTION.
    Transaction,
    /// SET (ordinary settings), RESET, DISCARD, LISTEN, UNLISTEN, DEALLOCATE.
    Session,
    /// SELECT, VALUES, SHOW, EXPLAIN (without ANALYZE), COPY ... TO STDOUT, cursors.
    Read,
    /// LOCK TABLE, SELECT ... FOR UPDATE/SHARE, advisory locks.
    Lock,
    /// NOTIFY, `pg_notify()`.
    Notify,
    Insert,
    Update,
    Delete,
    Merge,
    /// COPY ... FROM STDIN.
    CopyIn,
    /// `nextval()`, `setval()`.
    Sequence,
    /// VACUUM, ANALYZE, REINDEX, CLUSTER, CHECKPOINT, REFRESH MATERIALIZED VIEW.
    Maintenance,
    Truncate,
    /// CREATE / ALTER / DROP / COMMENT of schema objects, SELECT INTO.
    Ddl,
    /// GRANT, REVOKE, ALTER DEFAULT PRIVILEGES.
    Grant,
    /// SET ROLE, SET SESSION AUTHORIZATION, `set_config('role', ...)`, CREATE/ALTER/DROP ROLE.
    Role,
    /// DO, CALL: code the gateway cannot see.
    Procedural,
    /// `pg_terminate_backend`, `pg_reload_conf`, `pg_sleep` and other server-affecting functions.
    AdminFunction,
    /// Server-side files: `pg_read_file`, `lo_export`, COPY to/from a file.
    FileAccess,
    /// `dblink` and friends: the server connects elsewhere.
    Network,
    /// COPY ... PROGRAM: a shell command on the database server.
    CopyProgram,
    /// CREATE / ALTER / DROP EXTENSION, LOAD.
    Extension,
    AlterSystem,
    /// Not parsed or not placed: gets the target's `on_unknown` verdict.
    Unknown,
}

impl SqlClass {
    /// Whether statements of this class can change anything: every class but `read`,
    /// `transaction` and `session` (a session whose rules allow none of them can be opened
    /// read-only at the server).
    pub fn writes(self) -> bool {
        !matches!(
            self,
            SqlClass::Read | SqlClass::Transaction | SqlClass::Session
        )
    }

    pub const ALL: [SqlClass; 24] = [
        SqlClass::Transaction,
        SqlClass::Session,
        SqlClass::Read,
        SqlClass::Lock,
        SqlClass::Notify,
        SqlClass::Insert,
        SqlClass::Update,
        SqlClass::Delete,
        SqlClass::Merge,
        SqlClass::CopyIn,
        SqlClass::Sequence,
        SqlClass::Maintenance,
        SqlClass::Truncate,
        SqlClass::Ddl,
        SqlClass::Grant,
        SqlClass::Role,
        SqlClass::Procedural,
        SqlClass::AdminFunction,
        SqlClass::FileAccess,
        SqlClass::Network,
        SqlClass::CopyProgram,
        SqlClass::Extension,
        SqlClass::AlterSystem,
        SqlClass::Unknown,
    ];

    pub fn name(self) -> &'static str {
        match self {
            SqlClass::Transaction => "transaction",
            SqlClass::Session => "session",
            SqlClass::Read => "read",
            SqlClass::Lock => "lock",
            SqlClass::Notify => "notify",
            SqlClass::Insert => "insert",
            SqlClass::Update => "update",
            SqlClass::Delete => "delete",
            SqlClass::Merge => "merge",
            SqlClass::CopyIn => "copy_in",
            SqlClass::Sequence => "sequence",
            SqlClass::Maintenance => "maintenance",
            SqlClass::Truncate => "truncate",
            SqlClass::Ddl => "ddl",
            SqlClass::Grant => "grant",
            SqlClass::Role => "role",
            SqlClass::Procedural => "procedural",
            SqlClass::AdminFunction => "admin_function",
            SqlClass::FileAccess => "file_access",
            SqlClass::Network => "network",
            SqlClass::CopyProgram => "copy_program",
            SqlClass::Extension => "extension",
            SqlClass::AlterSystem => "alter_system",
            SqlClass::Unknown => "unknown",
        }
    }

    /// A class name, or a group a rule may name instead of listing classes.
    pub fn parse_set(name: &str) -> Option<Vec<SqlClass>> {
        use SqlClass as C;
        let group: &[SqlClass] = match name {
            "write" => &[
                C::Insert,
                C::Update,
                C::Delete,
                C::Merge,
                C::CopyIn,
                C::Sequence,
                C::Truncate,
            ],
            "privileged" => &[
                C::Grant,
                C::Role,
                C::Procedural,
                C::AdminFunction,
                C::FileAccess,
                C::Network,
                C::CopyProgram,
                C::Extension,
                C::AlterSystem,
            ],
            "any" => &C::ALL[..C::ALL.len() - 1],
            _ => return C::ALL.iter().find(|c| c.name() == name).map(|c| vec![*c]),
        };
        Some(group.to_vec())
    }
}

impl fmt::Display for SqlClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What a message does and touches.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Classification {
    pub classes: BTreeSet<SqlClass>,
    /// Relations read or written, normalized (`schema.table`, unquoted names lowercased).
    pub objects: BTreeSet<String>,
    /// Functions called, normalized (`pg_catalog.` dropped).
    pub functions: BTreeSet<String>,
    /// Functions that alone made the message `unknown` (a policy may vouch for them).
    pub unknown_functions: BTreeSet<String>,
    /// Why the message is `unknown`, besides unknown functions.
    pub unknown_reasons: Vec<String>,
    /// False when part of the message was judged without seeing what it touches (DO, CALL,
    /// keyword fallback): an allow rule that names objects then cannot vouch for it.
    pub objects_complete: bool,
    pub statements: usize,
    /// Statements this message prepares, by name, with what each would do when executed.
    #[serde(skip)]
    pub prepared: Vec<(String, Arc<Classification>)>,
    /// The message ran a prepared statement: its meaning depends on session state.
    #[serde(skip)]
    pub uses_prepared: bool,
    /// What the message does to the session's named statements and cursors, in order (the
    /// PostgreSQL gateway's model of them follows it; a `FETCH` reads what its cursor holds).
    #[serde(skip)]
    pub names: Vec<NameEffect>,
}

/// One statement's effect on the session's prepared statements and cursors (portals).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NameEffect {
    /// `PREPARE name AS ...`: what running it would do.
    Prepare {
        name: String,
        what: Arc<Classification>,
    },
    /// `DEALLOCATE name`; `None`: `DEALLOCATE ALL`.
    Deallocate(Option<String>),
    /// `DECLARE name CURSOR [WITH HOLD] FOR query`: what reading it does.
    Declare {
        name: String,
        what: Arc<Classification>,
        hold: bool,
    },
    /// `FETCH ... name`: reads what the cursor holds.
    Fetch(String),
    /// `CLOSE name`; `None`: `CLOSE ALL`.
    Close(Option<String>),
    /// `DISCARD ALL`: every prepared statement and cursor.
    DiscardAll,
    /// `COMMIT`, `ROLLBACK` (to a savepoint too): the transaction's cursors (those not
    /// declared `WITH HOLD`) are closed.
    EndTransaction,
}

impl Classification {
    pub(super) fn unknown(reason: impl Into<String>) -> Self {
        let mut c = Self::default();
        c.classes.insert(SqlClass::Unknown);
        c.unknown_reasons.push(reason.into());
        c
    }

    /// The most consequential class, `None` for an empty message.
    pub fn headline(&self) -> Option<SqlClass> {
        self.classes.iter().next_back().copied()
    }

    /// Adds what `other` does (its session-name effects excepted).
    pub fn merge(&mut self, other: &Classification) {
        self.classes.extend(other.classes.iter().copied());
        self.objects.extend(other.objects.iter().cloned());
        self.functions.extend(other.functions.iter().cloned());
        self.unknown_functions
            .extend(other.unknown_functions.iter().cloned());
        self.unknown_reasons
            .extend(other.unknown_reasons.iter().cloned());
        self.objects_complete &= other.objects_complete;
    }
}

/// What each prepared-statement name of a session was prepared as. The protocol handler keeps
/// one per session: from `PREPARE` (see [`Classification::prepared`]) and from extended-protocol
/// Parse messages, and removes names on `DEALLOCATE` / Close.
#[derive(Debug, Default, Clone)]
pub struct PreparedStatements {
    by_name: HashMap<String, Arc<Classification>>,
}

impl PreparedStatements {
    /// Most names a session may hold; past it, new names are not recorded (and so their
    /// `EXECUTE` is unknown: fail closed, bounded memory).
    pub const MAX: usize = 4096;

    pub fn insert(&mut self, name: &str, what: Arc<Classification>) {
        if self.by_name.len() < Self::MAX || self.by_name.contains_key(name) {
            self.by_name.insert(name.to_string(), what);
        }
    }

    pub fn remove(&mut self, name: &str) {
        self.by_name.remove(name);
    }

    pub fn clear(&mut self) {
        self.by_name.clear();
    }

    pub fn get(&self, name: &str) -> Option<&Arc<Classification>> {
        self.by_name.get(name)
    }
}

/// Longest message classified on the caller's stack. Each level of nesting takes at least two
/// bytes (`+1`), and dropping a deeply nested tree recurses: longer messages are classified on a
/// thread whose stack grows with the message, so no input can overflow the daemon's stacks.
const INLINE_MAX: usize = 16 * 1024;
/// Stack bytes per message byte for long messages (about four times what a debug build uses
/// per nesting level).
const STACK_PER_BYTE: usize = 256;

/// Classifies `sql` as one message.
pub fn classify(sql: &str, prepared: Option<&PreparedStatements>) -> Classification {
    if sql.len() > MAX_SQL_LEN {
        return Classification::unknown(format!("message longer than {MAX_SQL_LEN} bytes"));
    }
    if sql.len() <= INLINE_MAX {
        return classify_inline(sql, prepared);
    }
    let stack = (sql.len() * STACK_PER_BYTE).max(8 << 20);
    std::thread::scope(|scope| {
        match std::thread::Builder::new()
            .name("bulkhead-sql".into())
            .stack_size(stack)
            .spawn_scoped(scope, || classify_inline(sql, prepared))
        {
            Ok(worker) => worker.join().unwrap_or_else(|_| {
                Classification::unknown("the classifier failed on this message")
            }),
            Err(e) => Classification::unknown(format!("no thread to classify a long message: {e}")),
        }
    })
}

fn classify_inline(sql: &str, prepared: Option<&PreparedStatements>) -> Classification {
    let dialect = PostgreSqlDialect {};
    let mut out = Classification {
        objects_complete: true,
        ..Classification::default()
    };
    let parsed = Parser::new(&dialect)
        .with_recursion_limit(RECURSION_LIMIT)
        .try_with_sql(sql)
        .and_then(|mut p| p.parse_statements());
    match parsed {
        Ok(statements)
            if !statements
                .iter()
                .any(|s| matches!(s, Statement::Vacuum(_) | Statement::Analyze(_))) =>
        {
            for s in &statements {
                classify_statement(s, prepared, &mut out);
            }
        }
        Ok(_) | Err(_) => classify_pieces(sql, prepared, &mut out),
    }
    out
}

/// The slow path: split at top-level semicolons and judge each piece alone.
fn classify_pieces(sql: &str, prepared: Option<&PreparedStatements>, out: &mut Classification) {
    let dialect = PostgreSqlDialect {};
    let Ok(tokens) = Tokenizer::new(&dialect, sql).tokenize_with_location() else {
        out.merge(&Classification::unknown(
            "cannot tokenize (unterminated quote or comment?)",
        ));
        return;
    };
    for piece in tokens.split(|t| t.token == Token::SemiColon) {
        if piece
            .iter()
            .all(|t| matches!(t.token, Token::Whitespace(_) | Token::EOF))
        {
            continue;
        }
        if sql_utility::is_vacuum_or_analyze(piece) {
            utility_piece(sql_utility::vacuum_or_analyze(piece), out);
            continue;
        }
        let parse = |tokens: Vec<TokenWithSpan>| {
            Parser::new(&dialect)
                .with_recursion_limit(RECURSION_LIMIT)
                .with_tokens_with_locations(tokens)
                .parse_statements()
        };
        let parsed = parse(piece.to_vec()).or_else(|e| {
            without_noise_words(piece)
                .ok_or(())
                .and_then(|tokens| parse(tokens).map_err(|_| ()))
                .map_err(|()| e)
        });
        match parsed {
            Ok(statements) => {
                for s in &statements {
                    classify_statement(s, prepared, out);
                }
            }
            Err(e) => {
                if let Some(copy) = sql_utility::copy_with_options(piece) {
                    utility_piece(Some(copy), out);
                    continue;
                }
                if let Some(class) = sql_utility::set_extras(piece) {
                    out.statements += 1;
                    out.classes.insert(class);
                    continue;
                }
                if let Some(fetch) = sql_utility::fetch_or_move(piece) {
                    utility_piece(Some(fetch), out);
                    continue;
                }
                if let Some(query) = table_statement(piece) {
                    classify_statement(&Statement::Query(query), prepared, out);
                    continue;
                }
                if let Some(judged) = sql_settings::set_schema(piece) {
                    out.statements += 1;
                    match judged {
                        Ok(class) => {
                            out.classes.insert(class);
                        }
                        Err(reason) => {
                            out.classes.insert(SqlClass::Unknown);
                            out.unknown_reasons.push(reason);
                        }
                    }
                    continue;
                }
                out.statements += 1;
                out.objects_complete = false;
                if let Some(class) = keyword_fallback(piece) {
                    out.classes.insert(class);
                } else {
                    out.classes.insert(SqlClass::Unknown);
                    out.unknown_reasons.push(format!("not understood: {e}"));
                }
            }
        }
    }
}

/// A piece rewritten without the syntax the parser lacks, where leaving it out changes neither
/// which statement it is nor what it calls or touches (every expression stays, as an argument):
///
/// - `VARIADIC` before a function argument (a reserved keyword: never a name unquoted);
/// - a window frame's `EXCLUDE CURRENT ROW | GROUP | TIES | NO OTHERS`, and a cast on a frame
///   offset (`'1 year'::interval PRECEDING`);
/// - `XMLEXISTS(x PASSING [BY REF|VALUE] doc [BY REF|VALUE])` read as two arguments;
/// - `XMLELEMENT(NAME tag, ...)` and `XMLPI(NAME target, ...)` without `NAME`;
/// - `SUBSTRING(s SIMILAR pattern ESCAPE e)` read as three arguments;
/// - `(composite).*` read as `(composite)`; `BETWEEN SYMMETRIC` as `BETWEEN`; postfix `ISNULL` /
///   `NOTNULL` as `IS [NOT] NULL`; `IS [NOT] DOCUMENT` as `IS [NOT] NULL`; `XMLROOT`'s
///   `VERSION`/`STANDALONE` clauses as plain arguments;
/// - a recursive CTE's `SEARCH ... SET col` and `CYCLE ... USING col` (names and constants);
/// - `ROWS FROM (f(...), g(...))` read as `UNNEST(f(...), g(...))`: the same calls.
///
/// What remains is parsed and judged as the statement; `None` when nothing was rewritten.
#[expect(
    clippy::too_many_lines,
    reason = "one table of narrow rewrites, each a few lines, read best side by side"
)]
fn without_noise_words(piece: &[TokenWithSpan]) -> Option<Vec<TokenWithSpan>> {
    #[derive(Clone, PartialEq)]
    enum Edit {
        Keep,
        Drop,
        Comma,
        Words(&'static [&'static str]),
    }
    let word = |t: &TokenWithSpan, k: &str| matches!(&t.token, Token::Word(w) if w.quote_style.is_none() && w.value.eq_ignore_ascii_case(k));
    let sig: Vec<usize> = (0..piece.len())
        .filter(|&i| !matches!(piece[i].token, Token::Whitespace(_)))
        .collect();
    let at = |n: usize| sig.get(n).map(|&j| &piece[j]);
    let is = |n: usize, k: &str| at(n).is_some_and(|t| word(t, k));
    let mut edit = vec![Edit::Keep; piece.len()];
    let mut set = |n: usize, e: Edit| {
        if let Some(&j) = sig.get(n) {
            edit[j] = e;
        }
    };
    let token = |n: usize, t: &Token| at(n).is_some_and(|x| &x.token == t);
    let ident = |n: usize| {
        at(n).is_some_and(
            |x| matches!(&x.token, Token::Word(w) if w.quote_style.is_none_or(|q| q == '"')),
        )
    };
    // `col {, col}` from `n`: the index after it.
    let idents = |mut n: usize| {
        if !ident(n) {
            return None;
        }
        while token(n + 1, &Token::Comma) && ident(n + 2) {
            n += 2;
        }
        Some(n + 1)
    };
    // A recursive CTE's `SEARCH {DEPTH | BREADTH} FIRST BY cols SET col` or `CYCLE cols SET col
    // [TO const DEFAULT const] USING col`: names and constants only. The index after it.
    let search_or_cycle = |n: usize| -> Option<usize> {
        if n == 0 || !token(n - 1, &Token::RParen) {
            return None;
        }
        let m = if is(n, "search") && (is(n + 1, "depth") || is(n + 1, "breadth")) {
            (is(n + 2, "first") && is(n + 3, "by")).then_some(())?;
            idents(n + 4)?
        } else if is(n, "cycle") {
            idents(n + 1)?
        } else {
            return None;
        };
        (is(m, "set") && ident(m + 1)).then_some(())?;
        let mut m = m + 2;
        if is(n, "cycle") {
            if is(m, "to") {
                let constant = |k: usize| {
                    at(k).is_some_and(|x| {
                        matches!(x.token, Token::SingleQuotedString(_) | Token::Number(..))
                            || word(x, "true")
                            || word(x, "false")
                    })
                };
                (constant(m + 1) && is(m + 2, "default") && constant(m + 3)).then_some(())?;
                m += 4;
            }
            (is(m, "using") && ident(m + 1)).then_some(())?;
            m += 2;
        }
        Some(m)
    };
    let mut similar = false;
    for n in 0..sig.len() {
        if let Some(end) = search_or_cycle(n) {
            for k in n..end {
                set(k, Edit::Drop);
            }
        } else if is(n, "rows")
            && is(n + 1, "from")
            && token(n + 2, &Token::LParen)
            && n > 0
            && (is(n - 1, "from")
                || is(n - 1, "join")
                || is(n - 1, "lateral")
                || token(n - 1, &Token::Comma))
        {
            // `ROWS FROM (f(...), g(...))`: the same calls, as arguments of UNNEST.
            set(n, Edit::Words(&["UNNEST"]));
            set(n + 1, Edit::Drop);
        } else if is(n, "variadic") {
            set(n, Edit::Drop);
        } else if is(n, "exclude") {
            let len = if (is(n + 1, "current") && is(n + 2, "row"))
                || (is(n + 1, "no") && is(n + 2, "others"))
            {
                3
            } else if is(n + 1, "group") || is(n + 1, "ties") {
                2
            } else {
                0
            };
            for k in 0..len {
                set(n + k, Edit::Drop);
            }
        } else if at(n).is_some_and(|t| t.token == Token::DoubleColon)
            && at(n + 1).is_some_and(|t| matches!(t.token, Token::Word(_)))
            && (is(n + 2, "preceding") || is(n + 2, "following"))
        {
            set(n, Edit::Drop);
            set(n + 1, Edit::Drop);
        } else if is(n, "passing") {
            set(n, Edit::Comma);
            if is(n + 1, "by") && (is(n + 2, "ref") || is(n + 2, "value")) {
                set(n + 1, Edit::Drop);
                set(n + 2, Edit::Drop);
            }
        } else if is(n, "by")
            && (is(n + 1, "ref") || is(n + 1, "value"))
            && at(n + 2).is_some_and(|t| t.token == Token::RParen)
            && (0..n).any(|m| is(m, "passing"))
        {
            set(n, Edit::Drop);
            set(n + 1, Edit::Drop);
        } else if is(n, "name")
            && n >= 2
            && at(n - 1).is_some_and(|t| t.token == Token::LParen)
            && (is(n - 2, "xmlelement") || is(n - 2, "xmlpi"))
        {
            set(n, Edit::Drop);
        } else if is(n, "similar") && !is(n + 1, "to") && n > 0 && !is(n - 1, "not") {
            similar = true;
            set(n, Edit::Comma);
        } else if similar && is(n, "escape") {
            set(n, Edit::Comma);
        } else if token(n, &Token::RParen)
            && token(n + 1, &Token::Period)
            && token(n + 2, &Token::Mul)
        {
            // `(composite).*`: the expansion, not what is expanded.
            set(n + 1, Edit::Drop);
            set(n + 2, Edit::Drop);
        } else if is(n, "symmetric") && n > 0 && is(n - 1, "between") {
            set(n, Edit::Drop);
        } else if is(n, "isnull") {
            set(n, Edit::Words(&["IS", "NULL"]));
        } else if is(n, "notnull") {
            set(n, Edit::Words(&["IS", "NOT", "NULL"]));
        } else if is(n, "document")
            && n > 0
            && (is(n - 1, "is") || (n > 1 && is(n - 1, "not") && is(n - 2, "is")))
        {
            set(n, Edit::Words(&["NULL"]));
        } else if (is(n, "version") || is(n, "standalone"))
            && n > 0
            && token(n - 1, &Token::Comma)
            && (0..n).any(|m| is(m, "xmlroot"))
        {
            // XMLROOT(x, VERSION v | VERSION NO VALUE, STANDALONE YES | NO | NO VALUE).
            if is(n + 1, "no") && is(n + 2, "value") {
                set(n, Edit::Words(&["NULL"]));
                set(n + 1, Edit::Drop);
                set(n + 2, Edit::Drop);
            } else if is(n, "standalone") && (is(n + 1, "yes") || is(n + 1, "no")) {
                set(n, Edit::Words(&["NULL"]));
                set(n + 1, Edit::Drop);
            } else if is(n, "version")
                && at(n + 1).is_some_and(|t| matches!(t.token, Token::SingleQuotedString(_)))
            {
                // Only before a literal: `version(...)` may be a user's function.
                set(n, Edit::Drop);
            }
        }
    }
    edit.iter().any(|e| *e != Edit::Keep).then(|| {
        let mut out = Vec::with_capacity(piece.len() + 2);
        for (t, e) in piece.iter().zip(edit) {
            match e {
                Edit::Keep => out.push(t.clone()),
                Edit::Drop => {}
                Edit::Comma => out.push(TokenWithSpan {
                    token: Token::Comma,
                    span: t.span,
                }),
                Edit::Words(words) => {
                    for (i, w) in words.iter().enumerate() {
                        if i > 0 {
                            out.push(TokenWithSpan {
                                token: Token::Whitespace(sqlparser::tokenizer::Whitespace::Space),
                                span: t.span,
                            });
                        }
                        out.push(TokenWithSpan {
                            token: Token::make_keyword(w),
                            span: t.span,
                        });
                    }
                }
            }
        }
        out
    })
}

/// `TABLE name ...` as a statement of its own, which the parser reads only inside a query:
/// read as the query it is (`SELECT * FROM name ...`), with what may follow it (set operations,
/// ORDER BY, LIMIT, FOR UPDATE).
fn table_statement(piece: &[TokenWithSpan]) -> Option<Box<Query>> {
    let first = piece
        .iter()
        .find(|t| !matches!(t.token, Token::Whitespace(_)))?;
    if !matches!(&first.token, Token::Word(w) if w.quote_style.is_none() && w.keyword == Keyword::TABLE)
    {
        return None;
    }
    let dialect = PostgreSqlDialect {};
    let mut parser = Parser::new(&dialect)
        .with_recursion_limit(RECURSION_LIMIT)
        .with_tokens_with_locations(piece.to_vec());
    let query = parser.parse_query().ok()?;
    (parser.peek_token().token == Token::EOF).then_some(query)
}

/// Adds a statement read by `sql_utility`; `None` (outside its grammar) is `unknown`.
fn utility_piece(read: Option<sql_utility::Utility>, out: &mut Classification) {
    out.statements += 1;
    if let Some(u) = read {
        out.classes.insert(u.class);
        out.objects.extend(u.objects);
        out.objects_complete &= u.objects_complete;
    } else {
        out.objects_complete = false;
        out.classes.insert(SqlClass::Unknown);
        out.unknown_reasons
            .push("not understood: a VACUUM or ANALYZE form the gateway does not read".into());
    }
}

/// Statements the server has and the parser lacks, placed by their leading keywords. Only
/// statements whose kind the first words fix, and never a class below `maintenance`.
fn keyword_fallback(piece: &[TokenWithSpan]) -> Option<SqlClass> {
    let mut words = piece.iter().filter_map(|t| match &t.token {
        Token::Word(w) if w.quote_style.is_none() => Some(w.value.to_ascii_uppercase()),
        Token::Whitespace(_) => None,
        _ => Some(String::new()),
    });
    let first = words.next()?;
    let second = words.next().unwrap_or_default();
    Some(match (first.as_str(), second.as_str()) {
        ("DO", _) => SqlClass::Procedural,
        ("ALTER", "SYSTEM") => SqlClass::AlterSystem,
        ("ALTER" | "CREATE" | "DROP", "EXTENSION") => SqlClass::Extension,
        ("REINDEX" | "CLUSTER" | "CHECKPOINT", _) => SqlClass::Maintenance,
        ("REASSIGN" | "DROP", "OWNED") => SqlClass::Role,
        ("SECURITY", "LABEL") | ("IMPORT", "FOREIGN") => SqlClass::Ddl,
        _ => return None,
    })
}
