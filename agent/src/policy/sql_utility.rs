//! PostgreSQL utility statements read from their tokens, where the parser fails or misreads.
//!
//! - `VACUUM` and `ANALYZE` in every form: the parser rejects `VACUUM ANALYZE t`, `VACUUM
//!   (VERBOSE) t` and table lists, and reads `VACUUM ANALYZE` as a vacuum of a table named
//!   `analyze`. So pieces that begin with either keyword are always read here, never parsed.
//! - `COPY table FROM STDIN` / `TO STDOUT` with an option list the parser lacks (`WITH (FREEZE
//!   ON)`, as `pgbench -i` sends); asked only after the parser failed.
//!
//! - `FETCH` and `MOVE` in every direction PostgreSQL has (the parser lacks `FETCH c`,
//!   `FETCH ALL c`, `FETCH PRIOR c`, signed counts and `MOVE`); asked only after the parser
//!   failed. Both read from a cursor whose query was judged when it was declared.
//!
//! Each grammar is narrow: a piece outside it is `None`, and the caller judges it `unknown`.
//! Relation names are normalized as the parser's are (unquoted names fold to lowercase, quoted
//! ones keep their case, parts joined with `.`).

use sqlparser::tokenizer::{Token, TokenWithSpan};

use super::sql_class::SqlClass;

/// What a utility statement does and touches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Utility {
    pub class: SqlClass,
    pub objects: Vec<String>,
    /// False when the statement touches relations it does not name (`VACUUM` alone: every
    /// table in the database).
    pub objects_complete: bool,
}

/// Options `VACUUM ( ... )` and `ANALYZE ( ... )` take (PostgreSQL 15-17).
const VACUUM_OPTIONS: &[&str] = &[
    "ANALYZE",
    "ANALYSE",
    "BUFFER_USAGE_LIMIT",
    "DISABLE_PAGE_SKIPPING",
    "FREEZE",
    "FULL",
    "INDEX_CLEANUP",
    "ONLY_DATABASE_STATS",
    "PARALLEL",
    "PROCESS_MAIN",
    "PROCESS_TOAST",
    "SKIP_DATABASE_STATS",
    "SKIP_LOCKED",
    "TRUNCATE",
    "VERBOSE",
];

/// Options `COPY ... WITH ( ... )` takes (PostgreSQL 15-17).
const COPY_OPTIONS: &[&str] = &[
    "DEFAULT",
    "DELIMITER",
    "ENCODING",
    "ESCAPE",
    "FORCE_NOT_NULL",
    "FORCE_NULL",
    "FORCE_QUOTE",
    "FORMAT",
    "FREEZE",
    "HEADER",
    "LOG_VERBOSITY",
    "NULL",
    "ON_ERROR",
    "QUOTE",
];

/// Whether the piece is a `VACUUM` or `ANALYZE` statement (by its first word).
pub(super) fn is_vacuum_or_analyze(piece: &[TokenWithSpan]) -> bool {
    let c = Cursor::new(piece);
    ["VACUUM", "ANALYZE", "ANALYSE"]
        .iter()
        .any(|k| c.peek_keyword(k))
}

/// `VACUUM [ ( option [, ...] ) | [FULL] [FREEZE] [VERBOSE] [ANALYZE] ] [ table [ (columns) ] [, ...] ]`
/// and `ANALYZE [ ( option [, ...] ) | VERBOSE ] [ table [ (columns) ] [, ...] ]`.
pub(super) fn vacuum_or_analyze(piece: &[TokenWithSpan]) -> Option<Utility> {
    let mut c = Cursor::new(piece);
    if c.keyword("VACUUM") {
        if !c.option_list(VACUUM_OPTIONS, false)? {
            for flag in ["FULL", "FREEZE", "VERBOSE"] {
                c.keyword(flag);
            }
            let _ = c.keyword("ANALYZE") || c.keyword("ANALYSE");
        }
    } else if c.keyword("ANALYZE") || c.keyword("ANALYSE") {
        if !c.option_list(VACUUM_OPTIONS, false)? {
            c.keyword("VERBOSE");
        }
    } else {
        return None;
    }
    let mut objects = Vec::new();
    if !c.at_end() {
        loop {
            objects.push(c.relation()?);
            if c.peek(&Token::LParen) {
                c.ident_list()?;
            }
            if !c.token(&Token::Comma) {
                break;
            }
        }
    }
    if !c.at_end() {
        return None;
    }
    Some(Utility {
        class: SqlClass::Maintenance,
        objects_complete: !objects.is_empty(),
        objects,
    })
}

/// `COPY table [ (columns) ] { FROM STDIN | TO STDOUT } [ WITH ] [ ( option [, ...] ) ]`.
pub(super) fn copy_with_options(piece: &[TokenWithSpan]) -> Option<Utility> {
    let mut c = Cursor::new(piece);
    if !c.keyword("COPY") {
        return None;
    }
    let table = c.relation()?;
    if c.peek(&Token::LParen) {
        c.ident_list()?;
    }
    let class = if c.keyword("FROM") && c.keyword("STDIN") {
        SqlClass::CopyIn
    } else if c.keyword("TO") && c.keyword("STDOUT") {
        SqlClass::Read
    } else {
        return None;
    };
    c.keyword("WITH");
    c.option_list(COPY_OPTIONS, true)?;
    if !c.at_end() {
        return None;
    }
    Some(Utility {
        class,
        objects: vec![table],
        objects_complete: true,
    })
}

/// `FETCH [direction] [FROM | IN] cursor` or `MOVE ...`, as PostgreSQL 15's grammar has them:
/// direction is `NEXT`, `PRIOR`, `FIRST`, `LAST`, `ABSOLUTE n`, `RELATIVE n`, `n`, `ALL`,
/// `FORWARD [n | ALL]` or `BACKWARD [n | ALL]`, `n` a signed integer. A read; `None` outside
/// this grammar.
pub(super) fn fetch_or_move(piece: &[TokenWithSpan]) -> Option<Utility> {
    let mut c = Cursor::new(piece);
    if !(c.keyword("FETCH") || c.keyword("MOVE")) {
        return None;
    }
    let count = |c: &mut Cursor<'_>| {
        let _ = c.token(&Token::Minus) || c.token(&Token::Plus);
        matches!(c.next(), Some(Token::Number(n, false)) if n.bytes().all(|b| b.is_ascii_digit()))
            .then(|| c.at += 1)
            .is_some()
    };
    if c.keyword("ABSOLUTE") || c.keyword("RELATIVE") {
        if !count(&mut c) {
            return None;
        }
    } else if c.keyword("FORWARD") || c.keyword("BACKWARD") {
        let _ = c.keyword("ALL") || count(&mut c);
    } else if !(c.keyword("NEXT")
        || c.keyword("PRIOR")
        || c.keyword("FIRST")
        || c.keyword("LAST")
        || c.keyword("ALL"))
        && matches!(
            c.next(),
            Some(Token::Minus | Token::Plus | Token::Number(..))
        )
        && !count(&mut c)
    {
        return None;
    }
    let _ = c.keyword("FROM") || c.keyword("IN");
    // The cursor's name: one identifier, and nothing after it.
    if !matches!(c.next(), Some(Token::Word(w)) if w.quote_style.is_none_or(|q| q == '"')) {
        return None;
    }
    c.at += 1;
    c.at_end().then(|| Utility {
        class: SqlClass::Read,
        objects: Vec::new(),
        objects_complete: true,
    })
}

/// `SET CONSTRAINTS {ALL | name, ...} {DEFERRED | IMMEDIATE}` (when this transaction checks
/// deferrable constraints), `SET [SESSION | LOCAL] XML OPTION {DOCUMENT | CONTENT}` (how XML
/// text is parsed) and `RESET TIME ZONE`: statements the parser lacks that touch nothing
/// beyond the transaction or the session. `None` outside this grammar.
pub(super) fn set_extras(piece: &[TokenWithSpan]) -> Option<SqlClass> {
    let mut c = Cursor::new(piece);
    let class = if c.keyword("RESET") {
        (c.keyword("TIME") && c.keyword("ZONE")).then_some(SqlClass::Session)?
    } else if c.keyword("SET") {
        if c.keyword("CONSTRAINTS") {
            if !c.keyword("ALL") {
                loop {
                    c.ident()?;
                    if c.token(&Token::Period) {
                        c.ident()?;
                    }
                    if !c.token(&Token::Comma) {
                        break;
                    }
                }
            }
            (c.keyword("DEFERRED") || c.keyword("IMMEDIATE")).then_some(SqlClass::Transaction)?
        } else {
            let _ = c.keyword("SESSION") || c.keyword("LOCAL");
            (c.keyword("XML")
                && c.keyword("OPTION")
                && (c.keyword("DOCUMENT") || c.keyword("CONTENT")))
            .then_some(SqlClass::Session)?
        }
    } else {
        return None;
    };
    c.at_end().then_some(class)
}

/// The significant tokens of a piece: no whitespace, comments or end marker.
struct Cursor<'a> {
    tokens: Vec<&'a Token>,
    at: usize,
}

impl<'a> Cursor<'a> {
    fn new(piece: &'a [TokenWithSpan]) -> Self {
        let tokens = piece
            .iter()
            .map(|t| &t.token)
            .filter(|t| !matches!(t, Token::Whitespace(_) | Token::EOF))
            .collect();
        Self { tokens, at: 0 }
    }

    fn next(&self) -> Option<&'a Token> {
        self.tokens.get(self.at).copied()
    }

    fn at_end(&self) -> bool {
        self.at >= self.tokens.len()
    }

    fn peek(&self, token: &Token) -> bool {
        self.next() == Some(token)
    }

    fn token(&mut self, token: &Token) -> bool {
        let hit = self.peek(token);
        if hit {
            self.at += 1;
        }
        hit
    }

    /// The next token is the unquoted word `keyword` (any case).
    fn peek_keyword(&self, keyword: &str) -> bool {
        matches!(self.next(), Some(Token::Word(w))
            if w.quote_style.is_none() && w.value.eq_ignore_ascii_case(keyword))
    }

    fn keyword(&mut self, keyword: &str) -> bool {
        let hit = self.peek_keyword(keyword);
        if hit {
            self.at += 1;
        }
        hit
    }

    /// One identifier, normalized; `None` if the next token is not a word.
    fn ident(&mut self) -> Option<String> {
        match self.next()? {
            Token::Word(w) => {
                self.at += 1;
                Some(match w.quote_style {
                    Some('"') => super::sql_class::fold_identifier(&w.value, true),
                    Some(_) => return None,
                    None => super::sql_class::fold_identifier(&w.value, false),
                })
            }
            _ => None,
        }
    }

    /// `name`, `schema.name` or `database.schema.name`.
    fn relation(&mut self) -> Option<String> {
        let mut name = self.ident()?;
        for _ in 0..2 {
            if !self.token(&Token::Period) {
                break;
            }
            name.push('.');
            name.push_str(&self.ident()?);
        }
        Some(name)
    }

    /// `( ident [, ...] )`: column lists, whose names do not matter here.
    fn ident_list(&mut self) -> Option<()> {
        if !self.token(&Token::LParen) {
            return None;
        }
        loop {
            self.ident()?;
            if self.token(&Token::RParen) {
                return Some(());
            }
            if !self.token(&Token::Comma) {
                return None;
            }
        }
    }

    /// `( option [value] [, ...] )` with option names from `names`: `Some(false)` when there is
    /// no list, `None` when the list is malformed. A value is a word, a number or a string;
    /// with `columns`, also `*` or a column list (COPY's `FORCE_QUOTE (a, b)`).
    fn option_list(&mut self, names: &[&str], columns: bool) -> Option<bool> {
        if !self.token(&Token::LParen) {
            return Some(false);
        }
        loop {
            match self.next()? {
                Token::Word(w)
                    if w.quote_style.is_none()
                        && names.iter().any(|n| w.value.eq_ignore_ascii_case(n)) =>
                {
                    self.at += 1;
                }
                _ => return None,
            }
            match self.next()? {
                Token::Comma | Token::RParen => {}
                Token::Word(_)
                | Token::Number(..)
                | Token::SingleQuotedString(_)
                | Token::EscapedStringLiteral(_) => self.at += 1,
                Token::Mul if columns => self.at += 1,
                Token::LParen if columns => self.ident_list()?,
                _ => return None,
            }
            if self.token(&Token::RParen) {
                return Some(true);
            }
            if !self.token(&Token::Comma) {
                return None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use sqlparser::{
        dialect::PostgreSqlDialect,
        tokenizer::{Tokenizer, Whitespace},
    };

    use super::*;

    fn is_comment(t: &Token) -> bool {
        matches!(
            t,
            Token::Whitespace(
                Whitespace::SingleLineComment { .. } | Whitespace::MultiLineComment(_)
            )
        )
    }

    fn tokens(sql: &str) -> Vec<TokenWithSpan> {
        Tokenizer::new(&PostgreSqlDialect {}, sql)
            .tokenize_with_location()
            .expect("test input tokenizes")
    }

    fn vacuum(sql: &str) -> Option<(SqlClass, Vec<String>, bool)> {
        let t = tokens(sql);
        assert!(is_vacuum_or_analyze(&t), "{sql}");
        vacuum_or_analyze(&t).map(|u| (u.class, u.objects, u.objects_complete))
    }

    fn copy(sql: &str) -> Option<(SqlClass, Vec<String>)> {
        copy_with_options(&tokens(sql)).map(|u| (u.class, u.objects))
    }

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn vacuum_and_analyze_forms_name_their_tables() {
        let m = SqlClass::Maintenance;
        for (sql, objects) in [
            ("vacuum analyze pgbench_branches", &["pgbench_branches"][..]),
            ("VACUUM t", &["t"]),
            ("VACUUM FULL FREEZE VERBOSE ANALYZE public.t", &["public.t"]),
            ("VACUUM (VERBOSE, ANALYZE) t, s.u", &["t", "s.u"]),
            (
                "VACUUM (PARALLEL 4, INDEX_CLEANUP off, BUFFER_USAGE_LIMIT '1MB') t",
                &["t"],
            ),
            ("VACUUM (SKIP_LOCKED) \"Mixed\" (a, \"B\")", &["Mixed"]),
            ("ANALYZE t", &["t"]),
            ("analyse verbose T (a, b), u", &["t", "u"]),
            ("ANALYZE (SKIP_LOCKED true) t", &["t"]),
            ("VACUUM /* why */ ANALYZE -- note\n t", &["t"]),
            ("VACUUM db.s.t", &["db.s.t"]),
        ] {
            assert_eq!(vacuum(sql), Some((m, names(objects), true)), "{sql}");
        }
        for sql in [
            "VACUUM",
            "VACUUM ANALYZE",
            "ANALYZE",
            "VACUUM (VERBOSE)",
            "ANALYZE VERBOSE",
        ] {
            assert_eq!(
                vacuum(sql),
                Some((m, Vec::new(), false)),
                "{sql}: every table, so the objects are not all named"
            );
        }
    }

    #[test]
    fn vacuum_outside_the_grammar_is_not_read() {
        for sql in [
            "VACUUM t WHERE 1 = 1",
            "VACUUM t u",
            "VACUUM (EXPLODE) t",
            "VACUUM (VERBOSE t",
            "VACUUM (VERBOSE, ) t",
            "VACUUM (PARALLEL (SELECT 1)) t",
            "VACUUM t (a",
            "VACUUM t (a + 1)",
            "VACUUM t,",
            "VACUUM 't'",
            "VACUUM ANALYZE t; DROP TABLE t",
            "ANALYZE t.",
            "ANALYZE a.b.c.d",
            "VACUUM ANALYZE pg_sleep(10)",
        ] {
            assert_eq!(vacuum(sql), None, "{sql}");
        }
        assert!(!is_vacuum_or_analyze(&tokens("\"vacuum\" t")));
        assert!(!is_vacuum_or_analyze(&tokens("EXPLAIN ANALYZE SELECT 1")));
        assert!(vacuum_or_analyze(&tokens("SELECT 1")).is_none());
    }

    #[test]
    fn copy_with_options_the_parser_lacks() {
        assert_eq!(
            copy("copy pgbench_accounts from stdin with (freeze on)"),
            Some((SqlClass::CopyIn, names(&["pgbench_accounts"])))
        );
        assert_eq!(
            copy("COPY s.\"T\" (a, b) FROM STDIN (FORMAT csv, FREEZE ON, DELIMITER E'\\t', FORCE_NOT_NULL (a), ON_ERROR ignore)"),
            Some((SqlClass::CopyIn, names(&["s.T"])))
        );
        assert_eq!(
            copy("COPY t TO STDOUT WITH (FORMAT csv, HEADER on, FORCE_QUOTE *)"),
            Some((SqlClass::Read, names(&["t"])))
        );
        assert_eq!(
            copy("COPY t FROM STDIN"),
            Some((SqlClass::CopyIn, names(&["t"])))
        );
    }

    #[test]
    fn copy_outside_the_grammar_is_not_read() {
        for sql in [
            "COPY t FROM '/etc/passwd' WITH (FREEZE ON)",
            "COPY t FROM PROGRAM 'id' WITH (FREEZE ON)",
            "COPY t TO '/tmp/x' (FREEZE ON)",
            "COPY t FROM STDOUT",
            "COPY t TO STDIN",
            "COPY (SELECT 1) TO STDOUT (FREEZE ON)",
            "COPY t FROM STDIN WITH (FREEZE ON) WHERE f(a)",
            "COPY t FROM STDIN WITH (PROGRAM 'id')",
            "COPY t FROM STDIN WITH (FORMAT (SELECT 1))",
            "COPY t FROM STDIN WITH (FREEZE ON",
            "COPY t FROM STDIN; DELETE FROM u",
            "COPY t FROM STDIN WITH (FREEZE ON);\nDELETE FROM u;\n",
        ] {
            assert_eq!(copy(sql), None, "{sql}");
        }
    }

    #[test]
    fn comments_are_whitespace_to_the_grammar() {
        let t = tokens("VACUUM -- c\n t /* d */");
        assert!(t.iter().any(|t| is_comment(&t.token)));
        assert_eq!(
            vacuum_or_analyze(&t).map(|u| u.objects),
            Some(names(&["t"]))
        );
    }
}
