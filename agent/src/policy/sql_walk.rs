//! The walk over one parsed statement: what each statement kind, nested statement, function
//! call and relation adds to a [`Classification`].
//!
//! The visitor sees every nested statement (a CTE's DELETE, a PREPARE's body, an EXPLAIN
//! ANALYZE's statement), every expression and every relation, so nothing inside a statement is
//! skipped by construction; statement kinds not listed here are `unknown`.

use std::{collections::HashMap, ops::ControlFlow, sync::Arc};

use sqlparser::ast::{
    CloseCursor, CopySource, CopyTarget, DiscardObject, DollarQuotedString, Expr, FunctionArg,
    FunctionArgExpr, FunctionArguments, Ident, ObjectName, ObjectType, OnConflictAction, OnInsert,
    Query, Reset, Select, Set, SetExpr, Statement, TableFactor, TransactionAccessMode,
    TransactionMode, UtilityOption, Value, Visit, Visitor,
};

use super::{
    sql_class::{fold_identifier, Classification, NameEffect, PreparedStatements, SqlClass},
    sql_functions::function_effect,
    sql_settings::{self, SettingValue},
};

pub(super) fn classify_statement(
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
        settings_view: false,
        writes: false,
    };
    let _ = s.visit(&mut walker);
    if walker.settings_view && walker.writes {
        walker.unknown(
            "a write to pg_settings, which changes server settings the gateway judges (client_encoding, search_path, role, ...)"
                .into(),
        );
    }
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
    /// The statement names `pg_settings`, a view whose rows the server turns into `set_config`.
    settings_view: bool,
    /// The statement writes rows (insert, update, delete, merge, copy in).
    writes: bool,
}

impl Walker<'_, '_> {
    fn add(&mut self, class: SqlClass) {
        if class == SqlClass::Unknown {
            // With a reason: an `unknown` without one reads as "only functions a policy may
            // vouch for", which a statement kind is not.
            self.unknown("a statement the gateway does not judge by its kind".into());
        } else if self.suppress == 0 {
            self.writes |= matches!(
                class,
                SqlClass::Insert
                    | SqlClass::Update
                    | SqlClass::Delete
                    | SqlClass::Merge
                    | SqlClass::CopyIn
            );
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

    fn relation(&mut self, name: String) {
        self.settings_view |= matches!(name.as_str(), "pg_settings" | "pg_catalog.pg_settings");
        self.out.objects.insert(name);
    }

    /// `TABLE name` in a query body (alone, or as a branch of UNION / INTERSECT / EXCEPT) is
    /// `SELECT * FROM name`; the parser keeps it out of the relations the visitor reports.
    /// Bodies in parentheses are queries of their own, visited separately.
    fn body_tables(&mut self, body: &SetExpr) {
        match body {
            SetExpr::Table(t) => match (&t.schema_name, &t.table_name) {
                (None, Some(table)) => {
                    let name = normalize_ident(table);
                    if !self.cte_in_scope(&name) {
                        self.relation(name);
                    }
                }
                (Some(schema), Some(table)) => self.relation(format!(
                    "{}.{}",
                    normalize_ident(schema),
                    normalize_ident(table)
                )),
                (_, None) => self.out.objects_complete = false,
            },
            SetExpr::SetOperation { left, right, .. } => {
                self.body_tables(left);
                self.body_tables(right);
            }
            _ => {}
        }
    }

    fn function(&mut self, name: &ObjectName, args: Option<&FunctionArguments>) {
        if is_constructor_keyword(name) {
            // What it holds is visited as any other expression or query.
            return;
        }
        let full = normalize_name(name);
        let short = full
            .strip_prefix("pg_catalog.")
            .unwrap_or(&full)
            .to_string();
        let effect = if short == "set_config" {
            match set_config_effect(args) {
                Ok(class) => Some(class),
                Err(reason) => {
                    self.unknown(reason);
                    None
                }
            }
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

    #[expect(
        clippy::too_many_lines,
        reason = "one arm per statement kind: a table reads best whole"
    )]
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
                payload: Some(_), ..
            } => {
                // The wire protocol carries COPY data in CopyData messages, never in the query
                // text: lines the tokenizer took for inline data are statements the server runs.
                self.unknown("COPY data inside the statement text".into());
                return;
            }
            Statement::Copy {
                source, to, target, ..
            } => copy_class(source, *to, target),
            Statement::Set(set) => match set_class(set) {
                Ok(class) => class,
                Err(reason) => {
                    self.unknown(reason);
                    return;
                }
            },
            Statement::Reset(r) => match &r.reset {
                Reset::SessionAuthorization => C::Role,
                Reset::ConfigurationParameter(name) => {
                    match sql_settings::judge(&normalize_name(name), &SettingValue::Reset) {
                        Ok(class) => class,
                        Err(reason) => {
                            self.unknown(reason);
                            return;
                        }
                    }
                }
                _ => C::Session,
            },
            Statement::StartTransaction { modes, .. } if read_write(modes) => {
                self.unknown(READ_WRITE.into());
                return;
            }
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
            | Statement::Close { .. }
            | Statement::Explain { .. }
            | Statement::Prepare { .. } => C::Read,
            Statement::Execute { name, .. } => {
                self.out.uses_prepared = true;
                let key = name.as_ref().map(normalize_name).unwrap_or_default();
                if let Some(what) = self.prepared.and_then(|p| p.get(&key)) {
                    let what = Arc::clone(what);
                    self.out.merge(&what);
                } else {
                    self.unknown(format!(
                        "EXECUTE of {key:?}, which this session has not prepared"
                    ));
                }
                return;
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
            _ => {
                // Not named from the tree: formatting a deeply nested statement recurses.
                self.unknown("a kind of statement the gateway does not classify".into());
                return;
            }
        };
        self.add(class);
    }
}

impl Walker<'_, '_> {
    /// What `s` does to the session's named statements and cursors (besides `PREPARE`).
    fn name_effects(&mut self, s: &Statement) {
        // `ALL` unquoted is the keyword, not a name.
        let all = |i: &Ident| i.quote_style.is_none() && i.value.eq_ignore_ascii_case("all");
        match s {
            Statement::Declare { stmts, .. } => {
                for d in stmts {
                    let mut what = Classification {
                        objects_complete: true,
                        ..Classification::default()
                    };
                    if let Some(q) = &d.for_query {
                        classify_statement(&Statement::Query(q.clone()), self.prepared, &mut what);
                    }
                    let what = Arc::new(what);
                    for name in &d.names {
                        self.out.names.push(NameEffect::Declare {
                            name: normalize_ident(name),
                            what: Arc::clone(&what),
                            hold: d.hold == Some(true),
                        });
                    }
                }
            }
            Statement::Fetch { name, .. } => {
                self.out
                    .names
                    .push(NameEffect::Fetch(normalize_ident(name)));
            }
            Statement::Close { cursor } => self.out.names.push(NameEffect::Close(match cursor {
                CloseCursor::All => None,
                CloseCursor::Specific { name } => Some(normalize_ident(name)),
            })),
            Statement::Deallocate { name, .. } => {
                self.out.names.push(NameEffect::Deallocate(
                    (!all(name)).then(|| normalize_ident(name)),
                ));
            }
            Statement::Discard {
                object_type: DiscardObject::ALL,
            } => self.out.names.push(NameEffect::DiscardAll),
            Statement::Commit { .. } | Statement::Rollback { .. } => {
                self.out.names.push(NameEffect::EndTransaction);
            }
            _ => {}
        }
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
            let inner = Arc::new(inner);
            self.out.names.push(NameEffect::Prepare {
                name: normalize_ident(name),
                what: Arc::clone(&inner),
            });
            self.out.prepared.push((normalize_ident(name), inner));
        }
        self.name_effects(s);
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
        self.body_tables(&q.body);
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
        self.relation(name);
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
fn explain_options_analyze(options: Option<&[UtilityOption]>) -> bool {
    options.unwrap_or_default().iter().any(|o| {
        if !o.name.value.eq_ignore_ascii_case("analyze") {
            return false;
        }
        let off = match &o.arg {
            Some(Expr::Value(v)) => matches!(
                v.value.to_string().to_ascii_lowercase().trim_matches('\''),
                "false" | "off" | "0"
            ),
            Some(Expr::Identifier(i)) => {
                matches!(i.value.to_ascii_lowercase().as_str(), "false" | "off")
            }
            None | Some(_) => false,
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

/// The class of assigning `values` to each of `names`: the most consequential, or the first
/// reason one of them is `unknown`.
fn settings_class<'a>(
    assignments: impl Iterator<Item = (&'a ObjectName, SettingValue)>,
) -> Result<SqlClass, String> {
    let mut class = SqlClass::Session;
    for (name, value) in assignments {
        class = class.max(sql_settings::judge(&normalize_name(name), &value)?);
    }
    Ok(class)
}

/// A `SET` value list as the server reads it: strings and identifiers are the items' texts;
/// `DEFAULT` alone is the starting value.
fn set_value(values: &[Expr]) -> SettingValue {
    if let [Expr::Identifier(i)] = values {
        if i.quote_style.is_none() && i.value.eq_ignore_ascii_case("default") {
            return SettingValue::Reset;
        }
    }
    SettingValue::Items(
        values
            .iter()
            .map(|v| match v {
                Expr::Identifier(i) => Some(normalize_ident(i)),
                Expr::Value(v) => match &v.value {
                    // `SET x TO TRUE`, `= 0`: the server reads these as the words they spell.
                    Value::Boolean(b) => Some(b.to_string()),
                    Value::Number(n, _) => Some(n.clone()),
                    other => string_literal(other).map(str::to_string),
                },
                _ => None,
            })
            .collect(),
    )
}

fn string_literal(v: &Value) -> Option<&str> {
    match v {
        Value::SingleQuotedString(s)
        | Value::EscapedStringLiteral(s)
        | Value::DollarQuotedString(DollarQuotedString { value: s, .. }) => Some(s),
        _ => None,
    }
}

/// Why `READ WRITE` in BEGIN, START TRANSACTION or SET [SESSION CHARACTERISTICS AS]
/// TRANSACTION is `unknown`: a read-only session is opened with `default_transaction_read_only`
/// on, and asking for a read-write transaction is asking to write.
const READ_WRITE: &str =
    "READ WRITE would lift the read-only mode a session whose rules allow no writes runs in";

fn read_write(modes: &[TransactionMode]) -> bool {
    modes.iter().any(|m| {
        matches!(
            m,
            TransactionMode::AccessMode(TransactionAccessMode::ReadWrite)
        )
    })
}

fn set_class(set: &Set) -> Result<SqlClass, String> {
    match set {
        Set::SetRole { .. } | Set::SetSessionAuthorization(_) => Ok(SqlClass::Role),
        Set::SetTransaction { modes, .. } if read_write(modes) => Err(READ_WRITE.into()),
        Set::SetTransaction { .. } => Ok(SqlClass::Transaction),
        Set::SingleAssignment {
            variable, values, ..
        } => settings_class(std::iter::once((variable, set_value(values)))),
        Set::ParenthesizedAssignments { variables, .. } => {
            settings_class(variables.iter().map(|v| (v, SettingValue::NotLiteral)))
        }
        Set::MultipleAssignments { assignments } => settings_class(
            assignments
                .iter()
                .map(|a| (&a.name, set_value(std::slice::from_ref(&a.value)))),
        ),
        Set::SetNames { charset_name, .. } => sql_settings::judge(
            "client_encoding",
            &SettingValue::Items(vec![Some(charset_name.value.clone())]),
        ),
        Set::SetNamesDefault {} => sql_settings::judge("client_encoding", &SettingValue::Reset),
        Set::SetTimeZone { .. } => Ok(SqlClass::Session),
        Set::SetSessionParam(_) => Err("a SET form the gateway does not judge".into()),
    }
}

/// `set_config(name, value, is_local)`: judged as the `SET` it amounts to. A name that is not a
/// literal could be any setting, and a judged setting's value that is not a literal any value:
/// both are `unknown`. So is any setting's value that the statement computes rather than is
/// given (a literal or a parameter): `set_config('my.x', ssn, false) FROM users` would keep a
/// masked column in session state, where `SHOW my.x` reads it back as a constant.
fn set_config_effect(args: Option<&FunctionArguments>) -> Result<SqlClass, String> {
    let exprs: Vec<Option<&Expr>> = match args {
        Some(FunctionArguments::List(list)) => list
            .args
            .iter()
            .map(|a| match a {
                FunctionArg::Unnamed(FunctionArgExpr::Expr(e)) => Some(e),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    };
    let args: Vec<Option<&str>> = exprs
        .iter()
        .map(|e| match e {
            Some(Expr::Value(v)) => string_literal(&v.value),
            _ => None,
        })
        .collect();
    let Some(Some(name)) = args.first() else {
        return Err("set_config of a setting the gateway cannot name".into());
    };
    let value = match args.get(1) {
        Some(Some(value)) => SettingValue::Raw((*value).to_string()),
        _ => SettingValue::NotLiteral,
    };
    let class = sql_settings::judge(name, &value)?;
    if exprs.get(1).is_some_and(|e| !e.is_some_and(is_given)) {
        return Err(
            "set_config of a value the statement computes (session state could keep a masked \
             column)"
                .into(),
        );
    }
    Ok(class)
}

/// Whether an expression is given by the statement or its parameters, not computed from a
/// table or a function: a literal, a parameter (`$1`), or one of them cast or parenthesised.
fn is_given(expr: &Expr) -> bool {
    match expr {
        Expr::Value(_) | Expr::TypedString { .. } => true,
        Expr::Cast { expr, .. } | Expr::Nested(expr) => is_given(expr),
        _ => false,
    }
}

/// `ARRAY(SELECT ...)`, `ROW(1, 2)` and `(VALUES ...)` as an expression, which the parser reads
/// as calls to functions named `array`, `row` and `values`. The server never does: the three
/// are reserved keywords, so unquoted they are constructors and a subquery, and only a quoted
/// `"array"(...)` could call a function of that name.
fn is_constructor_keyword(name: &ObjectName) -> bool {
    let [part] = name.0.as_slice() else {
        return false;
    };
    part.as_ident().is_some_and(|i| {
        i.quote_style.is_none()
            && ["array", "row", "values"]
                .iter()
                .any(|k| i.value.eq_ignore_ascii_case(k))
    })
}

/// An identifier as the server resolves it (see [`fold_identifier`]).
fn normalize_ident(ident: &Ident) -> String {
    fold_identifier(&ident.value, ident.quote_style.is_some())
}

fn normalize_name(name: &ObjectName) -> String {
    let mut out = String::new();
    for (i, part) in name.0.iter().enumerate() {
        if i > 0 {
            out.push('.');
        }
        match part.as_ident() {
            Some(ident) => out.push_str(&normalize_ident(ident)),
            None => out.push('?'),
        }
    }
    out
}
