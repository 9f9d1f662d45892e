//! Which table columns each output column of a statement is computed from, read from the
//! statement's text (sqlparser), for the result fields a RowDescription cannot place (table
//! OID 0: an expression, a cast, an aggregate, a subquery, a set operation's column).
//!
//! The reading is an over-approximation, never an under one: an unqualified column name
//! counts as a column of every relation in scope (and of the enclosing queries'), a column
//! of a subquery or CTE whose name cannot be worked out counts under every name, and whatever
//! cannot be named (a whole-row reference reads every column; `f(*)`, a table function, a
//! recursive CTE's reference to itself) is `opaque`: it may read any relation the statement
//! reads. A statement that cannot be parsed, or runs something the text does not show
//! (`EXECUTE`, `FETCH`, `CALL`), reads relations the analysis cannot list
//! (`complete == false`).
//!
//! Filters are not dependencies (WHERE, JOIN ... ON, GROUP BY, HAVING, the query's ORDER BY),
//! as for a plain column; everything inside an output expression is (a function's FILTER and
//! ORDER BY, a subquery's output columns).

use std::{collections::BTreeSet, ops::ControlFlow};

use crate::policy::fold_identifier;

use sqlparser::{
    ast::{
        visit_relations, CopySource, Expr, FunctionArg, FunctionArgExpr, FunctionArguments, Ident,
        ObjectName, Query, Select, SelectItem, SelectItemQualifiedWildcardKind, SetExpr, Statement,
        TableAlias, TableFactor, TableWithJoins, Visit, Visitor,
    },
    dialect::PostgreSqlDialect,
    parser::Parser,
};

/// Longest statement analysed (longer ones read relations the analysis cannot list).
const MAX_SQL_LEN: usize = 1024 * 1024;
/// Longest statement analysed on the caller's stack; longer ones on a thread whose stack
/// grows with the text (an operator chain nests one level per operator, and walking or
/// dropping the tree recurses), as the classifier does.
const INLINE_MAX: usize = 16 * 1024;
const STACK_PER_BYTE: usize = 256;
/// Nesting the parser follows before giving up.
const RECURSION_LIMIT: usize = 64;

/// A relation as the statement names it: names folded as the server folds them; `schema`
/// is `None` when the name is not qualified (any schema may be meant).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RelName {
    pub schema: Option<String>,
    pub name: String,
}

/// What one output column reads.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Deps {
    /// Columns of relations, by name.
    pub columns: BTreeSet<(RelName, String)>,
    /// Whole rows of relations (every column).
    pub rows: BTreeSet<RelName>,
    /// Something the analysis cannot name: any relation the statement reads.
    pub opaque: bool,
}

impl Deps {
    fn opaque() -> Self {
        Self {
            opaque: true,
            ..Self::default()
        }
    }

    /// Reads any relation the statement reads: asks whether anything it reads is masked.
    pub fn opaque_reads() -> Self {
        Self::opaque()
    }

    fn extend(&mut self, other: &Deps) {
        self.columns.extend(other.columns.iter().cloned());
        self.rows.extend(other.rows.iter().cloned());
        self.opaque |= other.opaque;
    }

    pub fn is_empty(&self) -> bool {
        self.columns.is_empty() && self.rows.is_empty() && !self.opaque
    }
}

/// One output column, or the columns of relations whose number the text does not say
/// (`*` over a table).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Item {
    Column(Deps),
    /// Columns of unknown number, each reading this (the rows of tables under a `*`).
    Expand(Deps),
}

/// What a statement's result columns read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lineage {
    /// The result's columns in order; `None` when they cannot be told apart (several
    /// statements, not parsed, no result of a known shape).
    items: Option<Vec<Item>>,
    /// Everything any output column reads.
    pub all: Deps,
    /// Every relation the statement reads (named in a FROM, anywhere).
    pub relations: BTreeSet<RelName>,
    /// False when it may read relations not in `relations`.
    pub complete: bool,
}

impl Lineage {
    /// Reads what cannot be listed: every computed column is masked under a column rule.
    pub fn unknown() -> Self {
        Self {
            items: None,
            all: Deps::opaque(),
            relations: BTreeSet::new(),
            complete: false,
        }
    }

    /// The analysis was done without seeing into something the statement calls (a function
    /// that is not a vetted built-in may read any table).
    pub fn mark_incomplete(&mut self) {
        self.complete = false;
        self.all.opaque = true;
        if let Some(items) = &mut self.items {
            for item in items {
                match item {
                    Item::Column(d) | Item::Expand(d) => d.opaque = true,
                }
            }
        }
    }

    /// What each of a result's `n` fields reads, if the fields can be aligned with the
    /// statement's output columns (one `*` of unknown width is resolved from `n`).
    pub fn fields(&self, n: usize) -> Option<Vec<Deps>> {
        let items = self.items.as_ref()?;
        let expands = items
            .iter()
            .filter(|i| matches!(i, Item::Expand(_)))
            .count();
        let fixed = items.len() - expands;
        let width = match expands {
            0 if fixed == n => 0,
            1 if n >= fixed => n - fixed,
            _ => return None,
        };
        let mut out = Vec::with_capacity(n);
        for item in items {
            match item {
                Item::Column(d) => out.push(d.clone()),
                Item::Expand(d) => out.extend(std::iter::repeat_n(d.clone(), width)),
            }
        }
        Some(out)
    }

    /// What each output column reads, if their number is fixed by the text (no `*` over a
    /// table).
    pub fn columns(&self) -> Option<Vec<Deps>> {
        self.items
            .as_ref()?
            .iter()
            .map(|i| match i {
                Item::Column(d) => Some(d.clone()),
                Item::Expand(_) => None,
            })
            .collect()
    }

    /// Every relation named anywhere in the analysis.
    pub fn names(&self) -> BTreeSet<RelName> {
        let mut names = self.relations.clone();
        names.extend(self.all.rows.iter().cloned());
        names.extend(self.all.columns.iter().map(|(r, _)| r.clone()));
        names
    }
}

/// Analyses one message (simple Query or Parse).
pub fn analyze(sql: &str) -> Lineage {
    if sql.len() > MAX_SQL_LEN {
        return Lineage::unknown();
    }
    if sql.len() <= INLINE_MAX {
        return analyze_inline(sql);
    }
    let stack = (sql.len() * STACK_PER_BYTE).max(8 << 20);
    std::thread::scope(|scope| {
        match std::thread::Builder::new()
            .name("bulkhead-lineage".into())
            .stack_size(stack)
            .spawn_scoped(scope, || analyze_inline(sql))
        {
            Ok(worker) => worker.join().unwrap_or_else(|_| Lineage::unknown()),
            Err(_) => Lineage::unknown(),
        }
    })
}

fn analyze_inline(sql: &str) -> Lineage {
    let Ok(statements) = Parser::new(&PostgreSqlDialect {})
        .with_recursion_limit(RECURSION_LIMIT)
        .try_with_sql(sql)
        .and_then(|mut p| p.parse_statements())
    else {
        return Lineage::unknown();
    };
    let mut lineages: Vec<Lineage> = statements.iter().map(statement).collect();
    match lineages.len() {
        0 => Lineage {
            items: Some(Vec::new()),
            all: Deps::default(),
            relations: BTreeSet::new(),
            complete: true,
        },
        1 => lineages.pop().unwrap_or_else(Lineage::unknown),
        _ => {
            // Several results: which one a field belongs to is not followed, so every
            // result gets what any of them reads.
            let mut out = Lineage {
                items: None,
                all: Deps::default(),
                relations: BTreeSet::new(),
                complete: true,
            };
            for l in &lineages {
                out.all.extend(&l.all);
                out.relations.extend(l.relations.iter().cloned());
                out.complete &= l.complete;
            }
            out
        }
    }
}

fn statement(s: &Statement) -> Lineage {
    match s {
        Statement::Query(q)
        | Statement::Copy {
            source: CopySource::Query(q),
            ..
        } => from_query(q),
        Statement::Execute { .. }
        | Statement::Fetch { .. }
        | Statement::Call(_)
        | Statement::Declare { .. } => Lineage::unknown(),
        // Anything else returns no rows of a table's values but RETURNING's: its output
        // may read whatever relation it names.
        other => {
            let mut relations = BTreeSet::new();
            let mut complete = true;
            let _ = visit_relations(other, |name| {
                match rel_name(name) {
                    Some(r) => {
                        relations.insert(r);
                    }
                    None => complete = false,
                }
                ControlFlow::<()>::Continue(())
            });
            Lineage {
                items: None,
                all: Deps {
                    opaque: !relations.is_empty() || !complete,
                    ..Deps::default()
                },
                relations,
                complete,
            }
        }
    }
}

fn from_query(q: &Query) -> Lineage {
    let mut ctx = Ctx {
        relations: BTreeSet::new(),
        complete: true,
    };
    let columns = query(q, None, &mut ctx);
    let mut all = Deps::default();
    for (_, item) in &columns {
        match item {
            Item::Column(d) | Item::Expand(d) => all.extend(d),
        }
    }
    Lineage {
        items: Some(columns.into_iter().map(|(_, i)| i).collect()),
        all,
        relations: ctx.relations,
        complete: ctx.complete,
    }
}

/// An identifier as the server reads it: unquoted, its ASCII capitals only are lowercased
/// (`Über` stays `Über` in a UTF8 database), and any name is cut to 63 bytes
/// ([`fold_identifier`]).
fn fold(i: &Ident) -> String {
    fold_identifier(&i.value, i.quote_style.is_some())
}

fn rel_name(name: &ObjectName) -> Option<RelName> {
    let parts: Vec<String> = name
        .0
        .iter()
        .map(|p| p.as_ident().map(fold))
        .collect::<Option<_>>()?;
    match parts.as_slice() {
        [t] => Some(RelName {
            schema: None,
            name: t.clone(),
        }),
        // database.schema.table: the database is the session's own.
        [.., s, t] if parts.len() <= 3 => Some(RelName {
            schema: Some(s.clone()),
            name: t.clone(),
        }),
        _ => None,
    }
}

/// What the walk has seen of the whole statement.
struct Ctx {
    relations: BTreeSet<RelName>,
    complete: bool,
}

/// A named output column of a query (`None`: a name the analysis does not work out, which
/// matches any name).
type Columns = Vec<(Option<String>, Item)>;

#[derive(Debug, Clone)]
enum Source {
    Base(RelName),
    Derived(Columns),
    /// Columns the analysis cannot name: each reads `Deps`.
    Opaque(Deps),
}

#[derive(Debug, Clone)]
struct Rel {
    /// The name it is referred to by: its alias, else the table's own name.
    alias: Option<String>,
    source: Source,
}

impl Rel {
    fn referred_as(&self, q: &str) -> bool {
        match (&self.alias, &self.source) {
            (Some(a), _) => a == q,
            (None, Source::Base(r)) => r.name == q,
            (None, _) => false,
        }
    }

    /// What column `name` of this relation reads.
    fn column(&self, name: &str) -> Deps {
        match &self.source {
            Source::Base(r) => {
                let mut d = Deps::default();
                d.columns.insert((r.clone(), name.to_string()));
                d
            }
            Source::Derived(columns) => {
                let mut d = Deps::default();
                for (n, item) in columns {
                    match item {
                        Item::Column(c) if n.as_deref().is_none_or(|n| n == name) => {
                            d.extend(c);
                        }
                        Item::Column(_) => {}
                        Item::Expand(e) => {
                            for r in &e.rows {
                                d.columns.insert((r.clone(), name.to_string()));
                            }
                            d.columns.extend(e.columns.iter().cloned());
                            d.opaque |= e.opaque;
                        }
                    }
                }
                d
            }
            Source::Opaque(d) => d.clone(),
        }
    }

    /// What its whole row reads.
    fn row(&self) -> Deps {
        match &self.source {
            Source::Base(r) => {
                let mut d = Deps::default();
                d.rows.insert(r.clone());
                d
            }
            Source::Derived(columns) => {
                let mut d = Deps::default();
                for (_, item) in columns {
                    match item {
                        Item::Column(c) | Item::Expand(c) => d.extend(c),
                    }
                }
                d
            }
            Source::Opaque(d) => d.clone(),
        }
    }

    /// Its columns, for `*`.
    fn expand(&self) -> Columns {
        match &self.source {
            Source::Base(r) => {
                let mut d = Deps::default();
                d.rows.insert(r.clone());
                vec![(None, Item::Expand(d))]
            }
            Source::Derived(columns) => columns.clone(),
            // Unknown width, each column reading what the function reads.
            Source::Opaque(d) => vec![(None, Item::Expand(d.clone()))],
        }
    }
}

/// The relations and CTEs visible at one query level, and the levels around it.
struct Scope<'p> {
    rels: Vec<Rel>,
    ctes: Vec<(String, Option<Columns>)>,
    parent: Option<&'p Scope<'p>>,
}

impl Scope<'_> {
    /// A CTE by name, with its columns (`None` for a recursive CTE's reference to itself).
    fn cte(&self, name: &str) -> Option<&(String, Option<Columns>)> {
        self.levels()
            .find_map(|s| s.ctes.iter().rev().find(|(n, _)| n == name))
    }

    fn levels(&self) -> impl Iterator<Item = &Scope<'_>> {
        std::iter::successors(Some(self), |s| s.parent)
    }
}

/// The output columns of a query.
fn query(q: &Query, outer: Option<&Scope<'_>>, ctx: &mut Ctx) -> Columns {
    let mut scope = Scope {
        rels: Vec::new(),
        ctes: Vec::new(),
        parent: outer,
    };
    if let Some(with) = &q.with {
        for cte in &with.cte_tables {
            let name = fold(&cte.alias.name);
            if with.recursive {
                // Its reference to itself reads what the analysis cannot name.
                scope.ctes.push((name.clone(), None));
            }
            let columns = query(&cte.query, Some(&scope), ctx);
            let columns = renamed(columns, &cte.alias);
            if with.recursive {
                scope.ctes.pop();
            }
            scope.ctes.push((name, Some(columns)));
        }
    }
    set_expr(&q.body, &scope, ctx)
}

fn set_expr(body: &SetExpr, scope: &Scope<'_>, ctx: &mut Ctx) -> Columns {
    match body {
        SetExpr::Select(s) => select(s, scope, ctx),
        SetExpr::Query(q) => query(q, Some(scope), ctx),
        SetExpr::SetOperation { left, right, .. } => {
            let left = set_expr(left, scope, ctx);
            let right = set_expr(right, scope, ctx);
            let aligned = left.len() == right.len()
                && left
                    .iter()
                    .chain(&right)
                    .all(|(_, i)| matches!(i, Item::Column(_)));
            if aligned {
                left.into_iter()
                    .zip(right)
                    .map(|((name, l), (_, r))| match (l, r) {
                        (Item::Column(mut l), Item::Column(r)) => {
                            l.extend(&r);
                            (name, Item::Column(l))
                        }
                        (l, _) => (name, l),
                    })
                    .collect()
            } else {
                // Columns of unknown width on one side: every column reads what any does.
                let mut d = Deps::default();
                for (_, i) in left.iter().chain(&right) {
                    match i {
                        Item::Column(c) | Item::Expand(c) => d.extend(c),
                    }
                }
                vec![(None, Item::Expand(d))]
            }
        }
        SetExpr::Values(values) => {
            let mut columns: Columns = Vec::new();
            for row in &values.rows {
                for (i, e) in row.iter().enumerate() {
                    let d = expr_deps(e, scope, ctx);
                    match columns.get_mut(i) {
                        Some((_, Item::Column(c))) => c.extend(&d),
                        Some(_) => {}
                        None => columns.push((None, Item::Column(d))),
                    }
                }
            }
            columns
        }
        SetExpr::Table(t) => {
            if let Some(name) = &t.table_name {
                let rel = RelName {
                    schema: t.schema_name.as_ref().map(fold),
                    name: fold(name),
                };
                table_rel(rel, None, scope, ctx).expand()
            } else {
                ctx.complete = false;
                vec![(None, Item::Expand(Deps::opaque()))]
            }
        }
        // Data-modifying statements inside a query: their RETURNING reads their table.
        SetExpr::Insert(s) | SetExpr::Update(s) | SetExpr::Delete(s) | SetExpr::Merge(s) => {
            let inner = statement(s);
            ctx.relations.extend(inner.relations.iter().cloned());
            ctx.complete &= inner.complete;
            vec![(None, Item::Expand(Deps::opaque()))]
        }
    }
}

/// A CTE's or derived table's columns renamed by its alias's column list.
fn renamed(mut columns: Columns, alias: &TableAlias) -> Columns {
    if alias.columns.is_empty() {
        return columns;
    }
    if columns.iter().any(|(_, i)| matches!(i, Item::Expand(_))) {
        // Which column gets which name is not known: names match anything.
        for c in &mut columns {
            c.0 = None;
        }
        return columns;
    }
    for (c, a) in columns.iter_mut().zip(&alias.columns) {
        c.0 = Some(fold(&a.name));
    }
    columns
}

fn table_rel(rel: RelName, alias: Option<&TableAlias>, scope: &Scope<'_>, ctx: &mut Ctx) -> Rel {
    let alias_name = alias.map(|a| fold(&a.name));
    if rel.schema.is_none() {
        if let Some((_, cte)) = scope.cte(&rel.name) {
            let source = match cte {
                Some(columns) => Source::Derived(match alias {
                    Some(a) => renamed(columns.clone(), a),
                    None => columns.clone(),
                }),
                None => Source::Opaque(Deps::opaque()),
            };
            return Rel {
                alias: alias_name.or(Some(rel.name)),
                source,
            };
        }
    }
    ctx.relations.insert(rel.clone());
    Rel {
        alias: alias_name,
        source: Source::Base(rel),
    }
}

fn from_items(from: &[TableWithJoins], scope: &mut Scope<'_>, ctx: &mut Ctx) {
    for twj in from {
        factor(&twj.relation, scope, ctx);
        for j in &twj.joins {
            factor(&j.relation, scope, ctx);
        }
    }
}

fn factor(f: &TableFactor, scope: &mut Scope<'_>, ctx: &mut Ctx) {
    let rel = match f {
        TableFactor::Table {
            name,
            alias,
            args: None,
            ..
        } => {
            if let Some(r) = rel_name(name) {
                table_rel(r, alias.as_ref(), scope, ctx)
            } else {
                ctx.complete = false;
                Rel {
                    alias: alias.as_ref().map(|a| fold(&a.name)),
                    source: Source::Opaque(Deps::opaque()),
                }
            }
        }
        TableFactor::Derived {
            subquery, alias, ..
        } => {
            let columns = query(subquery, Some(scope), ctx);
            let columns = match alias {
                Some(a) => renamed(columns, a),
                None => columns,
            };
            Rel {
                alias: alias.as_ref().map(|a| fold(&a.name)),
                source: Source::Derived(columns),
            }
        }
        TableFactor::NestedJoin {
            table_with_joins,
            alias,
        } => {
            let mut inner = Scope {
                rels: Vec::new(),
                ctes: Vec::new(),
                parent: Some(scope),
            };
            from_items(std::slice::from_ref(table_with_joins), &mut inner, ctx);
            let rels = inner.rels;
            match alias {
                None => {
                    scope.rels.extend(rels);
                    return;
                }
                Some(a) => {
                    let mut columns: Columns = Vec::new();
                    for r in &rels {
                        columns.extend(r.expand());
                    }
                    Rel {
                        alias: Some(fold(&a.name)),
                        source: Source::Derived(renamed(columns, a)),
                    }
                }
            }
        }
        // Table functions (generate_series, unnest, json_to_recordset, ...) and the rest:
        // their columns read what their arguments read, or anything.
        other => {
            let mut d = Deps::default();
            let mut visitor = ExprDeps {
                scope,
                ctx,
                depth: 0,
                deps: &mut d,
            };
            let _ = other.visit(&mut visitor);
            let alias = match other {
                TableFactor::Table { alias, .. }
                | TableFactor::Function { alias, .. }
                | TableFactor::UNNEST { alias, .. }
                | TableFactor::TableFunction { alias, .. }
                | TableFactor::JsonTable { alias, .. } => alias.as_ref().map(|a| fold(&a.name)),
                _ => None,
            };
            if !matches!(
                other,
                TableFactor::Table { .. }
                    | TableFactor::Function { .. }
                    | TableFactor::UNNEST { .. }
                    | TableFactor::TableFunction { .. }
            ) {
                d.opaque = true;
            }
            Rel {
                alias,
                source: Source::Opaque(d),
            }
        }
    };
    scope.rels.push(rel);
}

fn select(s: &Select, outer: &Scope<'_>, ctx: &mut Ctx) -> Columns {
    let mut scope = Scope {
        rels: Vec::new(),
        ctes: Vec::new(),
        parent: Some(outer),
    };
    from_items(&s.from, &mut scope, ctx);
    let mut columns = Columns::new();
    for item in &s.projection {
        match item {
            SelectItem::UnnamedExpr(e) => {
                columns.push((output_name(e), Item::Column(expr_deps(e, &scope, ctx))));
            }
            SelectItem::ExprWithAlias { expr, alias } => {
                columns.push((
                    Some(fold(alias)),
                    Item::Column(expr_deps(expr, &scope, ctx)),
                ));
            }
            SelectItem::ExprWithAliases { expr, .. } => {
                columns.push((None, Item::Column(expr_deps(expr, &scope, ctx))));
            }
            SelectItem::Wildcard(_) => {
                for r in &scope.rels {
                    columns.extend(r.expand());
                }
            }
            SelectItem::QualifiedWildcard(SelectItemQualifiedWildcardKind::ObjectName(n), _) => {
                match qualified(n, &scope) {
                    Some(r) => columns.extend(r.expand()),
                    None => columns.push((None, Item::Expand(Deps::opaque()))),
                }
            }
            SelectItem::QualifiedWildcard(SelectItemQualifiedWildcardKind::Expr(e), _) => {
                let mut d = expr_deps(e, &scope, ctx);
                d.opaque = true;
                columns.push((None, Item::Expand(d)));
            }
        }
    }
    columns
}

/// The relation a qualified name (`alias`, `table`, `schema.table`) refers to.
fn qualified<'s>(n: &ObjectName, scope: &'s Scope<'_>) -> Option<&'s Rel> {
    let parts: Vec<String> =
        n.0.iter()
            .map(|p| p.as_ident().map(fold))
            .collect::<Option<_>>()?;
    find_rel(&parts, scope)
}

fn find_rel<'s>(parts: &[String], scope: &'s Scope<'_>) -> Option<&'s Rel> {
    let levels: Vec<&Scope<'_>> = scope.levels().collect();
    match parts {
        [q] => levels
            .iter()
            .find_map(|l| l.rels.iter().find(|r| r.referred_as(q))),
        [.., s, t] => levels.iter().find_map(|l| {
            l.rels.iter().find(|r| {
                r.alias.is_none()
                    && matches!(&r.source, Source::Base(b)
                        if &b.name == t && b.schema.as_deref().is_none_or(|bs| bs == s))
            })
        }),
        [] => None,
    }
}

/// The name the server gives an output column (only where it is plain; `None` otherwise,
/// which matches any name).
fn output_name(e: &Expr) -> Option<String> {
    match e {
        Expr::Identifier(i) => Some(fold(i)),
        Expr::CompoundIdentifier(parts) => parts.last().map(fold),
        Expr::Function(f) => f.name.0.last().and_then(|p| p.as_ident()).map(fold),
        Expr::Cast { expr, .. } | Expr::Nested(expr) => output_name(expr),
        _ => None,
    }
}

/// What an expression reads, in a scope.
fn expr_deps(e: &Expr, scope: &Scope<'_>, ctx: &mut Ctx) -> Deps {
    let mut deps = Deps::default();
    let mut visitor = ExprDeps {
        scope,
        ctx,
        depth: 0,
        deps: &mut deps,
    };
    let _ = e.visit(&mut visitor);
    deps
}

/// Collects the column references of an expression at its own level; a subquery inside it
/// is analysed as a query (with this scope as its outer one), and what its output columns
/// read is added.
struct ExprDeps<'a, 's, 'p> {
    scope: &'s Scope<'p>,
    ctx: &'a mut Ctx,
    depth: usize,
    deps: &'a mut Deps,
}

impl Visitor for ExprDeps<'_, '_, '_> {
    type Break = ();

    fn pre_visit_query(&mut self, q: &Query) -> ControlFlow<()> {
        if self.depth == 0 {
            for (_, item) in query(q, Some(self.scope), self.ctx) {
                match item {
                    Item::Column(d) | Item::Expand(d) => self.deps.extend(&d),
                }
            }
        }
        self.depth += 1;
        ControlFlow::Continue(())
    }

    fn post_visit_query(&mut self, _q: &Query) -> ControlFlow<()> {
        self.depth = self.depth.saturating_sub(1);
        ControlFlow::Continue(())
    }

    fn pre_visit_expr(&mut self, e: &Expr) -> ControlFlow<()> {
        if self.depth > 0 {
            return ControlFlow::Continue(());
        }
        match e {
            Expr::Identifier(i) => self.name(&[fold(i)]),
            Expr::CompoundIdentifier(parts) => {
                let parts: Vec<String> = parts.iter().map(fold).collect();
                self.name(&parts);
            }
            Expr::Wildcard(_) => self.all_rows(),
            Expr::QualifiedWildcard(n, _) => self.qualified_row(n),
            Expr::Function(f) => {
                let count = f
                    .name
                    .0
                    .last()
                    .and_then(|p| p.as_ident())
                    .is_some_and(|i| fold(i) == "count");
                if let FunctionArguments::List(list) = &f.args {
                    for a in &list.args {
                        let arg = match a {
                            FunctionArg::Unnamed(a)
                            | FunctionArg::Named { arg: a, .. }
                            | FunctionArg::ExprNamed { arg: a, .. } => a,
                        };
                        match arg {
                            // count(*) reads no value.
                            FunctionArgExpr::Wildcard if count => {}
                            FunctionArgExpr::Wildcard | FunctionArgExpr::WildcardWithOptions(_) => {
                                self.all_rows();
                            }
                            FunctionArgExpr::QualifiedWildcard(n) => self.qualified_row(n),
                            FunctionArgExpr::Expr(_) => {}
                        }
                    }
                }
            }
            _ => {}
        }
        ControlFlow::Continue(())
    }
}

impl ExprDeps<'_, '_, '_> {
    /// A column reference, or a whole-row reference by a relation's name.
    fn name(&mut self, parts: &[String]) {
        match parts {
            [x] => {
                // A column of any relation in scope, or a relation's whole row.
                for level in self.scope.levels() {
                    for r in &level.rels {
                        if r.referred_as(x) {
                            self.deps.extend(&r.row());
                        }
                        self.deps.extend(&r.column(x));
                    }
                }
            }
            [q, x] => match find_rel(std::slice::from_ref(q), self.scope) {
                Some(r) => {
                    let d = r.column(x);
                    self.deps.extend(&d);
                }
                // `composite_column.field` or a name the scope lacks: read as the column.
                None => self.name(std::slice::from_ref(q)),
            },
            [.., schema, table, column] if parts.len() <= 4 => {
                match find_rel(&[schema.clone(), table.clone()], self.scope) {
                    Some(rel) => {
                        let reads = rel.column(column);
                        self.deps.extend(&reads);
                    }
                    None => self.deps.opaque = true,
                }
            }
            _ => self.deps.opaque = true,
        }
    }

    fn all_rows(&mut self) {
        match self.scope.levels().next() {
            Some(level) if !level.rels.is_empty() => {
                for r in &level.rels {
                    self.deps.extend(&r.row());
                }
            }
            _ => self.deps.opaque = true,
        }
    }

    fn qualified_row(&mut self, n: &ObjectName) {
        match qualified(n, self.scope) {
            Some(r) => {
                let d = r.row();
                self.deps.extend(&d);
            }
            None => self.deps.opaque = true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn show(d: &Deps) -> Vec<String> {
        let name = |r: &RelName| match &r.schema {
            Some(s) => format!("{s}.{}", r.name),
            None => r.name.clone(),
        };
        let mut out: Vec<String> = d
            .columns
            .iter()
            .map(|(r, c)| format!("{}.{c}", name(r)))
            .chain(d.rows.iter().map(|r| format!("row:{}", name(r))))
            .collect();
        if d.opaque {
            out.push("opaque".into());
        }
        out
    }

    /// What each of `n` fields reads.
    fn fields(sql: &str, n: usize) -> Vec<Vec<String>> {
        analyze(sql)
            .fields(n)
            .unwrap_or_else(|| panic!("not aligned: {sql}"))
            .iter()
            .map(show)
            .collect()
    }

    fn one(sql: &str) -> Vec<String> {
        let mut f = fields(sql, 1);
        assert_eq!(f.len(), 1);
        f.pop().unwrap()
    }

    #[test]
    fn expressions_read_the_columns_they_name() {
        for sql in [
            "SELECT upper(ssn) FROM users",
            "SELECT ssn || '' FROM users",
            "SELECT substr(ssn, 1, 3) FROM users",
            "SELECT CAST(ssn AS varchar(20)) FROM users",
            "SELECT ssn::bytea FROM users",
            "SELECT encode(convert_to(ssn, 'UTF8'), 'base64') FROM users",
            "SELECT string_agg(ssn, ',') FROM users",
            "SELECT CASE WHEN id > 0 THEN ssn END FROM users",
            "SELECT (u.ssn) FROM users u",
            "SELECT \"SSN\" FROM users",
        ] {
            let got = one(sql);
            assert!(
                got.contains(&"users.ssn".to_string()) || got.contains(&"users.SSN".to_string()),
                "{sql}: {got:?}"
            );
        }
        assert_eq!(
            one("SELECT upper(u.name) FROM public.users u JOIN other o ON o.ssn = u.ssn"),
            ["public.users.name"],
            "a join condition filters, it is not output"
        );
        assert_eq!(
            fields("SELECT upper(name), length(ssn), 1 FROM users", 3),
            [vec!["users.name"], vec!["users.ssn"], vec![]]
        );
        assert_eq!(one("SELECT count(*) FROM users"), Vec::<String>::new());
        assert_eq!(one("SELECT now()"), Vec::<String>::new());
    }

    #[test]
    fn an_unqualified_name_may_be_a_column_of_any_relation_in_scope() {
        assert_eq!(
            one("SELECT upper(ssn) FROM users, other"),
            ["other.ssn", "users.ssn"]
        );
        assert_eq!(
            one("SELECT (SELECT max(name) FROM other WHERE other.id = users.id) FROM users"),
            ["other.name", "users.name"],
            "a correlated subquery may read the outer query's column"
        );
    }

    #[test]
    fn whole_rows_and_wildcards_read_every_column() {
        assert_eq!(
            one("SELECT row_to_json(u) FROM users u"),
            ["users.u", "row:users"],
            "a relation's name, or a column of that name"
        );
        assert_eq!(one("SELECT to_jsonb(u.*) FROM users u"), ["row:users"]);
        assert_eq!(
            one("SELECT json_agg(users) FROM users"),
            ["users.users", "row:users"]
        );
        assert_eq!(
            one("SELECT (u).ssn FROM users u"),
            ["users.ssn", "users.u", "row:users"]
        );
        assert_eq!(one("SELECT to_json(*) FROM users"), ["row:users"]);
        // `*` over a table: its width comes from the field count.
        assert_eq!(
            fields("SELECT *, upper(ssn) FROM users", 4),
            [
                vec!["row:users"],
                vec!["row:users"],
                vec!["row:users"],
                vec!["users.ssn"]
            ]
        );
        assert!(analyze("SELECT *, * FROM users").fields(4).is_none());
    }

    #[test]
    fn subqueries_ctes_and_set_operations_carry_what_they_read() {
        assert_eq!(one("SELECT (SELECT ssn FROM users LIMIT 1)"), ["users.ssn"]);
        assert_eq!(
            one("WITH c AS (SELECT ssn AS s FROM users) SELECT upper(s) FROM c"),
            ["users.ssn"]
        );
        assert_eq!(
            one("WITH c(x) AS (SELECT ssn FROM users) SELECT x || '' FROM c"),
            ["users.ssn"]
        );
        assert_eq!(
            one("SELECT lower(t.x) FROM (SELECT upper(ssn) AS x, name FROM users) t"),
            ["users.ssn"]
        );
        assert_eq!(
            one("SELECT upper FROM (SELECT upper(ssn) FROM users) t"),
            ["users.ssn"],
            "the server's name for an expression"
        );
        assert_eq!(
            one("SELECT name FROM other UNION SELECT ssn FROM users"),
            ["other.name", "users.ssn"]
        );
        assert_eq!(
            one("SELECT x FROM (SELECT * FROM users) t(a, b, x)"),
            ["users.x"],
            "renamed columns of unknown origin: the name under every table"
        );
        assert_eq!(
            one("SELECT upper(ssn) FROM (SELECT * FROM users) t"),
            ["users.ssn"]
        );
        assert_eq!(one("SELECT array(SELECT ssn FROM users)"), ["users.ssn"]);
        assert_eq!(
            one("SELECT x FROM (VALUES ((SELECT ssn FROM users LIMIT 1))) v(x)"),
            ["users.ssn"]
        );
        let recursive = one(
            "WITH RECURSIVE r(n, s) AS (SELECT 1, ssn FROM users UNION ALL \
             SELECT n + 1, s FROM r WHERE n < 3) SELECT s || '' FROM r",
        );
        assert!(recursive.contains(&"opaque".to_string()), "{recursive:?}");
    }

    #[test]
    fn what_cannot_be_read_is_opaque_or_incomplete() {
        for sql in [
            "EXECUTE p",
            "FETCH ALL FROM c",
            "SELEC ssn FROM users",
            "CALL p()",
        ] {
            let l = analyze(sql);
            assert!(!l.complete && l.all.opaque, "{sql}");
        }
        let l = analyze("SELECT 1; SELECT upper(ssn) FROM users");
        assert!(l.fields(1).is_none(), "several results are not told apart");
        assert_eq!(show(&l.all), ["users.ssn"]);
        let l = analyze("DELETE FROM users RETURNING ssn");
        assert!(l.complete && l.all.opaque);
        assert_eq!(l.relations.len(), 1);
        let l = analyze("SHOW search_path");
        assert!(l.complete && l.all.is_empty());
        let l = analyze("SELECT g || '' FROM generate_series(1, 3) g");
        assert!(l.complete);
        let l = analyze("SELECT x FROM unnest(ARRAY(SELECT ssn FROM users)) x");
        assert!(show(&l.all).contains(&"users.ssn".to_string()), "{l:?}");
        let l = analyze("COPY (SELECT name, upper(ssn) FROM users) TO STDOUT");
        assert_eq!(
            l.fields(2).unwrap().iter().map(show).collect::<Vec<_>>(),
            [vec!["users.name"], vec!["users.ssn"]]
        );
        let mut l = analyze("SELECT upper(name) FROM users");
        l.mark_incomplete();
        assert!(!l.complete && l.fields(1).unwrap()[0].opaque);
        let mut l = analyze("SELECT * FROM rows_of_users()");
        assert!(
            !l.fields(3).unwrap()[0].opaque,
            "the function's arguments read nothing"
        );
        l.mark_incomplete();
        assert!(l.fields(3).unwrap().iter().all(|d| d.opaque));
    }

    #[test]
    fn long_and_deep_statements_do_not_overflow_the_stack() {
        // On a 2 MiB test thread, as on a tokio worker.
        let inline = format!("SELECT {}ssn FROM users", "ssn || ".repeat(INLINE_MAX / 8));
        assert!(inline.len() <= INLINE_MAX);
        assert_eq!(show(&analyze(&inline).all), ["users.ssn"]);
        let long = format!("SELECT {}ssn FROM users", "ssn || ".repeat(40_000));
        assert_eq!(show(&analyze(&long).all), ["users.ssn"]);
        let nested = format!(
            "SELECT {}ssn{} FROM users",
            "(".repeat(200),
            ")".repeat(200)
        );
        assert!(
            !analyze(&nested).complete,
            "past the parser's nesting limit"
        );
    }

    #[test]
    fn names_are_folded_like_the_server() {
        let l = analyze("SELECT upper(\"Ssn\") FROM Public.\"Users\"");
        assert_eq!(show(&l.all), ["public.Users.Ssn"]);
        assert_eq!(l.names().len(), 1);
    }
}
