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
    sync::Arc,
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
        let parsed = Parser::new(&dialect)
            .with_recursion_limit(RECURSION_LIMIT)
            .with_tokens_with_locations(piece.to_vec())
            .parse_statements();
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
