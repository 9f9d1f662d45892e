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

use sqlparser::{
    ast::{Query, Statement},
    dialect::PostgreSqlDialect,
    keywords::Keyword,
    parser::Parser,
    tokenizer::{Token, TokenWithSpan, Tokenizer},
};

pub use super::sql_class::{
    fold_identifier, unqualified_resolutions, Classification, NameEffect, PreparedStatements,
    SqlClass,
};
use super::{sql_settings, sql_utility, sql_walk::classify_statement};

/// Longest message classified; longer ones are `unknown` (the parser's time grows with size).
pub const MAX_SQL_LEN: usize = 1024 * 1024;
/// Deepest nesting the parser follows before giving up (its own stack guard).
pub(super) const RECURSION_LIMIT: usize = 64;

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
