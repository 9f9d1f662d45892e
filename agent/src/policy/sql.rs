//! SQL classification: what a whole simple-query message (or a prepared statement) would do.
//!
//! A message is judged by everything in it: every statement of a multi-statement message, every
//! data-modifying CTE, every function call, every statement a `PREPARE` holds or an `EXECUTE`
//! runs. The result is the *set* of classes; its most consequential member is the headline.
//!
//! Fail closed: what `sqlparser` cannot parse is split at top-level semicolons (the tokenizer
//! knows quotes, comments and dollar-quoting) and each piece parsed alone; a piece that still
//! fails is placed by its leading keywords only for a few statements the parser lacks (`DO`,
//! `ALTER SYSTEM`, `REINDEX`, ...), and otherwise is `unknown`. A call to a function that is not
//! a vetted read-only built-in is `unknown` too (see `sql_functions`).

use std::{
    collections::{BTreeSet, HashMap},
    fmt,
    ops::ControlFlow,
    sync::{Arc, Mutex, PoisonError},
};

use serde::{Deserialize, Serialize};
use sqlparser::{
    ast::{
        CopySource, CopyTarget, Expr, FunctionArg, FunctionArgExpr, FunctionArguments, ObjectName,
        ObjectType, OnConflictAction, OnInsert, Query, Reset, Select, Set, Statement, TableFactor,
        Value, Visit, Visitor,
    },
    dialect::PostgreSqlDialect,
    parser::Parser,
    tokenizer::{Token, TokenWithSpan, Tokenizer},
};

use super::sql_functions::function_effect;

/// Longest message classified; longer ones are `unknown` (the parser's time grows with size).
pub const MAX_SQL_LEN: usize = 1024 * 1024;
/// Deepest nesting the parser follows before giving up (its own stack guard).
const RECURSION_LIMIT: usize = 64;

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
    /// NOTIFY, pg_notify().
    Notify,
    Insert,
    Update,
    Delete,
    Merge,
    /// COPY ... FROM STDIN.
    CopyIn,
    /// nextval(), setval().
    Sequence,
    /// VACUUM, ANALYZE, REINDEX, CLUSTER, CHECKPOINT, REFRESH MATERIALIZED VIEW.
    Maintenance,
    Truncate,
    /// CREATE / ALTER / DROP / COMMENT of schema objects, SELECT INTO.
    Ddl,
    /// GRANT, REVOKE, ALTER DEFAULT PRIVILEGES.
    Grant,
    /// SET ROLE, SET SESSION AUTHORIZATION, set_config('role', ...), CREATE/ALTER/DROP ROLE.
    Role,
    /// DO, CALL: code the gateway cannot see.
    Procedural,
    /// pg_terminate_backend, pg_reload_conf, pg_sleep and other server-affecting functions.
    AdminFunction,
    /// Server-side files: pg_read_file, lo_export, COPY to/from a file.
    FileAccess,
    /// dblink and friends: the server connects elsewhere.
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
}

impl Classification {
    fn unknown(reason: impl Into<String>) -> Self {
        let mut c = Self::default();
        c.classes.insert(SqlClass::Unknown);
        c.unknown_reasons.push(reason.into());
        c
    }

    /// The most consequential class, `None` for an empty message.
    pub fn headline(&self) -> Option<SqlClass> {
        self.classes.iter().next_back().copied()
    }

    fn merge(&mut self, other: &Classification) {
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

/// Classifies `sql` as one message.
pub fn classify(sql: &str, prepared: Option<&PreparedStatements>) -> Classification {
    if sql.len() > MAX_SQL_LEN {
        return Classification::unknown(format!("message longer than {MAX_SQL_LEN} bytes"));
    }
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
        Ok(statements) => {
            for s in &statements {
                classify_statement(s, prepared, &mut out);
            }
        }
        Err(_) => classify_pieces(sql, prepared, &mut out),
    }
    out
}

fn classify_statement(
    s: &Statement,
    prepared: Option<&PreparedStatements>,
    out: &mut Classification,
) {
    out.statements += 1;
    let mut walker = Walker {
        out,
        prepared,
        frames: Vec::new(),
        query_pushed: Vec::new(),
        cte_bodies: HashMap::new(),
        skip_relation: None,
        explain_plain: Vec::new(),
        suppress: 0,
    };
    let _ = s.visit(&mut walker);
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
                out.statements += 1;
                out.objects_complete = false;
                match keyword_fallback(piece) {
                    Some(class) => {
                        out.classes.insert(class);
                    }
                    None => {
                        out.classes.insert(SqlClass::Unknown);
                        out.unknown_reasons.push(format!("not understood: {e}"));
                    }
                }
            }
        }
    }
}

/// Statements PostgreSQL has and the parser lacks, placed by their leading keywords. Only
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
        ("REASSIGN", "OWNED") | ("DROP", "OWNED") => SqlClass::Role,
        ("SECURITY", "LABEL") | ("IMPORT", "FOREIGN") => SqlClass::Ddl,
        _ => return None,
    })
}

/// One frame of CTE names in scope; `hides` masks the frame of the query that defines them
/// while one of its own non-recursive CTE bodies is visited.
struct Frame {
    names: Vec<String>,
    hides: Option<usize>,
}

struct Walker<'a, 'p> {
    out: &'a mut Classification,
    prepared: Option<&'p PreparedStatements>,
    frames: Vec<Frame>,
    /// Per visited query, how many frames it pushed (popped in `post_visit_query`).
    query_pushed: Vec<usize>,
    /// CTE body queries by address: (frame index of the defining query, names visible).
    cte_bodies: HashMap<*const Query, (usize, Vec<String>)>,
    /// A table-function name in FROM, reported as a function, not a relation.
    skip_relation: Option<*const ObjectName>,
    /// Per visited statement, whether it is a plain EXPLAIN (its body does not run).
    explain_plain: Vec<bool>,
    suppress: usize,
}

impl Walker<'_, '_> {
    fn add(&mut self, class: SqlClass) {
        if self.suppress == 0 || class == SqlClass::Unknown {
            self.out.classes.insert(class);
        }
    }

    fn unknown(&mut self, reason: String) {
        self.out.classes.insert(SqlClass::Unknown);
        self.out.unknown_reasons.push(reason);
    }

    fn cte_in_scope(&self, name: &str) -> bool {
        let mut hidden = Vec::new();
        for (i, f) in self.frames.iter().enumerate().rev() {
            if hidden.contains(&i) {
                continue;
            }
            if f.names.iter().any(|n| n == name) {
                return true;
            }
            if let Some(h) = f.hides {
                hidden.push(h);
            }
        }
        false
    }

    fn function(&mut self, name: &ObjectName, args: Option<&FunctionArguments>) {
        let full = normalize_name(name);
        let short = full
            .strip_prefix("pg_catalog.")
            .unwrap_or(&full)
            .to_string();
        let effect = if short == "set_config" {
            Some(set_config_effect(args))
        } else {
            function_effect(&short)
        };
        match effect {
            None => {}
            Some(SqlClass::Unknown) => {
                self.out.classes.insert(SqlClass::Unknown);
                self.out.unknown_functions.insert(short.clone());
            }
            Some(class) => self.add(class),
        }
        self.out.functions.insert(short);
    }

    /// Relations the visitor does not report for some statements; statements whose objects
    /// we have not checked it reports are marked incomplete instead (an allow rule naming
    /// objects then cannot vouch for them).
    fn statement_objects(&mut self, s: &Statement) {
        let names: Vec<&ObjectName> = match s {
            Statement::Drop { names, .. } => names.iter().collect(),
            Statement::Copy {
                source: CopySource::Table { table_name, .. },
                ..
            } => vec![table_name],
            Statement::Vacuum(v) => v.table_name.iter().collect(),
            Statement::Comment { object_name, .. } => vec![object_name],
            Statement::Query(_)
            | Statement::Insert(_)
            | Statement::Update(_)
            | Statement::Delete(_)
            | Statement::Merge(_)
            | Statement::Copy { .. }
            | Statement::Truncate(_)
            | Statement::Lock(_)
            | Statement::Analyze(_)
            | Statement::CreateTable(_)
            | Statement::CreateView(_)
            | Statement::CreateIndex(_)
            | Statement::AlterTable(_)
            | Statement::RefreshMaterializedView(_)
            | Statement::Explain { .. }
            | Statement::Prepare { .. }
            | Statement::Execute { .. }
            | Statement::Declare { .. }
            | Statement::Fetch { .. }
            | Statement::Close { .. }
            | Statement::StartTransaction { .. }
            | Statement::Commit { .. }
            | Statement::Rollback { .. }
            | Statement::Savepoint { .. }
            | Statement::ReleaseSavepoint { .. }
            | Statement::Set(_)
            | Statement::Reset(_)
            | Statement::ShowVariable { .. }
            | Statement::Discard { .. }
            | Statement::Deallocate { .. }
            | Statement::LISTEN { .. }
            | Statement::UNLISTEN { .. }
            | Statement::NOTIFY { .. } => Vec::new(),
            _ => {
                self.out.objects_complete = false;
                Vec::new()
            }
        };
        for n in names {
            self.out.objects.insert(normalize_name(n));
        }
    }

    fn statement(&mut self, s: &Statement) {
        use SqlClass as C;
        self.statement_objects(s);
        let class = match s {
            Statement::Query(q) => {
                if q.locks.is_empty() {
                    C::Read
                } else {
                    C::Lock
                }
            }
            Statement::Insert(i) => {
                if let Some(OnInsert::OnConflict(c)) = &i.on {
                    if matches!(c.action, OnConflictAction::DoUpdate(_)) {
                        self.add(C::Update);
                    }
                } else if i.on.is_some() {
                    self.add(C::Update);
                }
                C::Insert
            }
            Statement::Update(_) => C::Update,
            Statement::Delete(_) => C::Delete,
            Statement::Merge(_) => C::Merge,
            Statement::Copy {
                source, to, target, ..
            } => copy_class(source, *to, target),
            Statement::Set(set) => set_class(set),
            Statement::Reset(r) => match &r.reset {
                Reset::SessionAuthorization => C::Role,
                Reset::ConfigurationParameter(name) if is_role_setting(&normalize_name(name)) => {
                    C::Role
                }
                _ => C::Session,
            },
            Statement::StartTransaction { .. }
            | Statement::Commit { .. }
            | Statement::Rollback { .. }
            | Statement::Savepoint { .. }
            | Statement::ReleaseSavepoint { .. } => C::Transaction,
            Statement::ShowVariable { .. }
            | Statement::ShowVariables { .. }
            | Statement::ShowStatus { .. }
            | Statement::ExplainTable { .. }
            | Statement::Declare { .. }
            | Statement::Fetch { .. }
            | Statement::Close { .. } => C::Read,
            Statement::Explain { .. } | Statement::Prepare { .. } => C::Read,
            Statement::Execute { name, .. } => {
                self.out.uses_prepared = true;
                let key = name.as_ref().map(normalize_name).unwrap_or_default();
                match self.prepared.and_then(|p| p.get(&key)) {
                    Some(what) => {
                        let what = Arc::clone(what);
                        self.out.merge(&what);
                        return;
                    }
                    None => {
                        self.unknown(format!(
                            "EXECUTE of {key:?}, which this session has not prepared"
                        ));
                        return;
                    }
                }
            }
            Statement::Deallocate { .. }
            | Statement::Discard { .. }
            | Statement::LISTEN { .. }
            | Statement::UNLISTEN { .. } => C::Session,
            Statement::NOTIFY { .. } => C::Notify,
            Statement::Lock(_) | Statement::LockTables { .. } => C::Lock,
            Statement::Truncate(_) => C::Truncate,
            Statement::Vacuum(_)
            | Statement::Analyze(_)
            | Statement::RefreshMaterializedView(_) => C::Maintenance,
            Statement::Grant(_)
            | Statement::Revoke(_)
            | Statement::GrantRole(_)
            | Statement::RevokeRole(_)
            | Statement::AlterDefaultPrivileges(_) => C::Grant,
            Statement::CreateRole(_)
            | Statement::AlterRole { .. }
            | Statement::CreateUser(_)
            | Statement::AlterUser(_) => C::Role,
            Statement::Drop { object_type, .. } => match object_type {
                ObjectType::Role | ObjectType::User | ObjectType::Group => C::Role,
                _ => C::Ddl,
            },
            Statement::CreateExtension(_)
            | Statement::DropExtension(_)
            | Statement::Load { .. } => C::Extension,
            Statement::Call(_) => {
                self.out.objects_complete = false;
                C::Procedural
            }
            Statement::CreateView(_)
            | Statement::CreateTable(_)
            | Statement::CreateIndex(_)
            | Statement::CreateServer(_)
            | Statement::CreateForeignTable(_)
            | Statement::CreateForeignDataWrapper(_)
            | Statement::CreateUserMapping(_)
            | Statement::CreatePolicy(_)
            | Statement::CreateRule(_)
            | Statement::CreateOperator(_)
            | Statement::CreateOperatorFamily(_)
            | Statement::CreateOperatorClass(_)
            | Statement::CreateTextSearch(_)
            | Statement::CreateAggregate(_)
            | Statement::CreateCollation(_)
            | Statement::CreateSchema { .. }
            | Statement::CreateDatabase { .. }
            | Statement::CreateFunction(_)
            | Statement::CreateTrigger(_)
            | Statement::CreateProcedure { .. }
            | Statement::CreateSequence { .. }
            | Statement::CreateDomain(_)
            | Statement::CreateType { .. }
            | Statement::AlterTable(_)
            | Statement::AlterSchema(_)
            | Statement::AlterIndex { .. }
            | Statement::AlterView(_)
            | Statement::AlterFunction(_)
            | Statement::AlterType(_)
            | Statement::AlterCollation(_)
            | Statement::AlterOperator(_)
            | Statement::AlterOperatorFamily(_)
            | Statement::AlterOperatorClass(_)
            | Statement::AlterTextSearch(_)
            | Statement::AlterPolicy(_)
            | Statement::AlterTrigger(_)
            | Statement::DropFunction(_)
            | Statement::DropDomain(_)
            | Statement::DropProcedure { .. }
            | Statement::DropPolicy(_)
            | Statement::DropRule(_)
            | Statement::DropOperator(_)
            | Statement::DropOperatorFamily(_)
            | Statement::DropOperatorClass(_)
            | Statement::DropTrigger(_)
            | Statement::Comment { .. }
            | Statement::RenameTable(_) => C::Ddl,
            other => {
                let kind = format!("{other:?}");
                let kind = kind
                    .split(|c: char| !c.is_alphanumeric())
                    .next()
                    .unwrap_or("?");
                self.unknown(format!("statement kind {kind} is not classified"));
                return;
            }
        };
        self.add(class);
    }
}

impl Visitor for Walker<'_, '_> {
    type Break = ();

    fn pre_visit_statement(&mut self, s: &Statement) -> ControlFlow<()> {
        self.statement(s);
        let plain_explain = match s {
            Statement::Explain {
                analyze, options, ..
            } => !*analyze && !explain_options_analyze(options.as_deref()),
            _ => false,
        };
        if plain_explain {
            self.suppress += 1;
        }
        self.explain_plain.push(plain_explain);
        if let Statement::Prepare {
            name, statement, ..
        } = s
        {
            let mut inner = Classification {
                objects_complete: true,
                ..Classification::default()
            };
            classify_statement(statement, self.prepared, &mut inner);
            inner.statements = 1;
            self.out
                .prepared
                .push((normalize_ident(name), Arc::new(inner)));
        }
        ControlFlow::Continue(())
    }

    fn post_visit_statement(&mut self, _s: &Statement) -> ControlFlow<()> {
        if self.explain_plain.pop() == Some(true) {
            self.suppress = self.suppress.saturating_sub(1);
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_query(&mut self, q: &Query) -> ControlFlow<()> {
        let mut pushed = 0;
        if let Some((hides, names)) = self.cte_bodies.remove(&std::ptr::from_ref(q)) {
            self.frames.push(Frame {
                names,
                hides: Some(hides),
            });
            pushed += 1;
        }
        if let Some(with) = &q.with {
            let names: Vec<String> = with
                .cte_tables
                .iter()
                .map(|c| normalize_ident(&c.alias.name))
                .collect();
            let frame = self.frames.len();
            for (i, cte) in with.cte_tables.iter().enumerate() {
                let visible = if with.recursive {
                    names.clone()
                } else {
                    names[..i].to_vec()
                };
                self.cte_bodies
                    .insert(std::ptr::from_ref(cte.query.as_ref()), (frame, visible));
            }
            self.frames.push(Frame { names, hides: None });
            pushed += 1;
        }
        self.query_pushed.push(pushed);
        if !q.locks.is_empty() {
            self.add(SqlClass::Lock);
        }
        ControlFlow::Continue(())
    }

    fn post_visit_query(&mut self, _q: &Query) -> ControlFlow<()> {
        let pushed = self.query_pushed.pop().unwrap_or(0);
        self.frames
            .truncate(self.frames.len().saturating_sub(pushed));
        ControlFlow::Continue(())
    }

    fn pre_visit_select(&mut self, select: &Select) -> ControlFlow<()> {
        if select.into.is_some() {
            self.out.objects_complete = false;
            self.add(SqlClass::Ddl);
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_table_factor(&mut self, t: &TableFactor) -> ControlFlow<()> {
        match t {
            TableFactor::Table {
                name,
                args: Some(_),
                ..
            } => {
                self.skip_relation = Some(std::ptr::from_ref(name));
                self.function(name, None);
            }
            TableFactor::Function { name, .. } => self.function(name, None),
            _ => {}
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_relation(&mut self, relation: &ObjectName) -> ControlFlow<()> {
        if self.skip_relation == Some(std::ptr::from_ref(relation)) {
            self.skip_relation = None;
            return ControlFlow::Continue(());
        }
        let name = normalize_name(relation);
        if relation.0.len() == 1 && self.cte_in_scope(&name) {
            return ControlFlow::Continue(());
        }
        self.out.objects.insert(name);
        ControlFlow::Continue(())
    }

    fn pre_visit_expr(&mut self, e: &Expr) -> ControlFlow<()> {
        if let Expr::Function(f) = e {
            self.function(&f.name, Some(&f.args));
        }
        ControlFlow::Continue(())
    }
}

/// `EXPLAIN (ANALYZE [TRUE|ON|1])` runs the statement; `ANALYZE FALSE|OFF|0` does not.
fn explain_options_analyze(options: Option<&[sqlparser::ast::UtilityOption]>) -> bool {
    options.unwrap_or_default().iter().any(|o| {
        if !o.name.value.eq_ignore_ascii_case("analyze") {
            return false;
        }
        let off = match &o.arg {
            None => false,
            Some(Expr::Value(v)) => matches!(
                v.value.to_string().to_ascii_lowercase().trim_matches('\''),
                "false" | "off" | "0"
            ),
            Some(Expr::Identifier(i)) => {
                matches!(i.value.to_ascii_lowercase().as_str(), "false" | "off")
            }
            Some(_) => false,
        };
        !off
    })
}

fn copy_class(source: &CopySource, to: bool, target: &CopyTarget) -> SqlClass {
    match (to, target) {
        (true, CopyTarget::Stdout) => SqlClass::Read,
        (false, CopyTarget::Stdin) => {
            if matches!(source, CopySource::Table { .. }) {
                SqlClass::CopyIn
            } else {
                SqlClass::Unknown
            }
        }
        (_, CopyTarget::File { .. }) => SqlClass::FileAccess,
        (_, CopyTarget::Program { .. }) => SqlClass::CopyProgram,
        _ => SqlClass::Unknown,
    }
}

fn is_role_setting(name: &str) -> bool {
    matches!(name, "role" | "session_authorization")
}

fn set_class(set: &Set) -> SqlClass {
    match set {
        Set::SetRole { .. } | Set::SetSessionAuthorization(_) => SqlClass::Role,
        Set::SetTransaction { .. } => SqlClass::Transaction,
        Set::SingleAssignment { variable, .. } => {
            if is_role_setting(&normalize_name(variable)) {
                SqlClass::Role
            } else {
                SqlClass::Session
            }
        }
        Set::ParenthesizedAssignments { variables, .. } => {
            if variables
                .iter()
                .any(|v| is_role_setting(&normalize_name(v)))
            {
                SqlClass::Role
            } else {
                SqlClass::Session
            }
        }
        Set::MultipleAssignments { assignments } => {
            if assignments
                .iter()
                .any(|a| is_role_setting(&normalize_name(&a.name)))
            {
                SqlClass::Role
            } else {
                SqlClass::Session
            }
        }
        Set::SetTimeZone { .. } | Set::SetNames { .. } | Set::SetNamesDefault {} => {
            SqlClass::Session
        }
        _ => SqlClass::Unknown,
    }
}

/// `set_config('role', ...)` changes who we are; other settings are session state. A name
/// that is not a literal could be either: judged as the worse.
fn set_config_effect(args: Option<&FunctionArguments>) -> SqlClass {
    let first = match args {
        Some(FunctionArguments::List(list)) => list.args.first(),
        _ => None,
    };
    match first {
        Some(FunctionArg::Unnamed(FunctionArgExpr::Expr(Expr::Value(v)))) => match &v.value {
            Value::SingleQuotedString(s)
            | Value::EscapedStringLiteral(s)
            | Value::DollarQuotedString(sqlparser::ast::DollarQuotedString { value: s, .. }) => {
                if is_role_setting(&s.to_ascii_lowercase()) {
                    SqlClass::Role
                } else {
                    SqlClass::Session
                }
            }
            _ => SqlClass::Role,
        },
        _ => SqlClass::Role,
    }
}

/// An identifier as PostgreSQL resolves it: unquoted names fold to lowercase.
fn normalize_ident(ident: &sqlparser::ast::Ident) -> String {
    if ident.quote_style.is_some() {
        ident.value.clone()
    } else {
        ident.value.to_lowercase()
    }
}

fn normalize_name(name: &ObjectName) -> String {
    let mut out = String::new();
    for (i, part) in name.0.iter().enumerate() {
        if i > 0 {
            out.push('.');
        }
        match part.as_ident() {
            Some(ident) => out.push_str(&normalize_ident(ident)),
            None => out.push_str("?"),
        }
    }
    out
}

/// A bounded cache of classifications by exact message text. Only messages whose meaning does
/// not depend on session state (no `EXECUTE`) are cached, so a hit can never change a verdict.
/// Exact text, not a normalized form: normalizing would need the tokenizer, which is most of
/// the cost it saves, and drivers send the same text for the same statement anyway.
#[derive(Debug)]
pub struct SqlCache {
    map: Mutex<HashMap<Box<str>, Arc<Classification>>>,
    capacity: usize,
}

impl Default for SqlCache {
    fn default() -> Self {
        Self {
            map: Mutex::new(HashMap::new()),
            capacity: Self::CAPACITY,
        }
    }
}

impl SqlCache {
    /// Entries kept before the cache starts over.
    pub const CAPACITY: usize = 4096;
    /// Longest text cached: long messages are rarely repeated.
    pub const MAX_KEY: usize = 4096;

    /// A cache that never keeps anything.
    pub fn disabled() -> Self {
        Self {
            map: Mutex::new(HashMap::new()),
            capacity: 0,
        }
    }

    pub fn classify(
        &self,
        sql: &str,
        prepared: Option<&PreparedStatements>,
    ) -> Arc<Classification> {
        let cacheable = self.capacity > 0 && sql.len() <= Self::MAX_KEY;
        if cacheable {
            let map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(hit) = map.get(sql) {
                return Arc::clone(hit);
            }
        }
        let c = Arc::new(classify(sql, prepared));
        if cacheable && !c.uses_prepared {
            let mut map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
            if map.len() >= self.capacity {
                map.clear();
            }
            map.insert(sql.into(), Arc::clone(&c));
        }
        c
    }

    pub fn len(&self) -> usize {
        self.map
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
