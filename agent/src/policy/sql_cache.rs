//! The classification cache, and the key that lets statements differing only in values share
//! an entry.
//!
//! A client that inlines its values (the simple query protocol, pgbench `-M simple`) sends a
//! new text for every statement. Parsing each costs more than relaying it, so classifications
//! are cached by a *shape key*: the text with some numeric literals written as `0`. That is
//! sound only where no value of the literal can change the classification, and the classifier
//! does read values in places (`EXPLAIN (ANALYZE 0)` only plans its statement, `ANALYZE 1` runs
//! it; `SET` values, `set_config` arguments, COPY and VACUUM options). So [`shape_key`] folds a
//! literal only in positions it proves are plain data, and keeps every other literal verbatim:
//! a literal it is unsure about costs a cache miss, never a verdict. A differential property
//! test (`cache_tests.rs`) classifies generated statements through a warm cache and without
//! one, and requires the same classification every time.

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, PoisonError,
    },
};

use super::sql::{classify, Classification, PreparedStatements};

/// Writes into `out` the cache key of `sql`: its text with the numeric literals that cannot
/// change its classification written as `0`. Returns false, with `out` empty, when it has no
/// such literal (the key is then the exact text); true when it has one, even one already `0`,
/// since the message then shares its key with others.
///
/// A literal is folded only when it is a plain unsigned integer (digits alone, after a space,
/// an operator, `(` or `,`, and before a space, `,`, `)`, `;` or the end), in one of:
///
/// - the right operand of a comparison (`=`, `<>`, `!=`, `<`, `>`, `<=`, `>=`, optionally
///   negated) whose left operand is a column name, in a WHERE, HAVING or ON condition, outside
///   function calls (`WHERE aid = 12345`);
/// - the count of LIMIT or OFFSET;
/// - in an `UPDATE`'s SET list, an assigned value or the right operand of `+`/`-` on a column
///   (`SET abalance = abalance + -1234`);
/// - an element of a row of an `INSERT`'s VALUES list (`VALUES (7, 1, 5, -1234, now())`).
///
/// The condition, LIMIT, assignment and VALUES contexts are tracked per parenthesis level and
/// statement, from reserved words: a condition lasts until a clause keyword, a call's
/// parentheses start a plain level. Nothing is folded in a message that names `pg_settings`
/// (whose UPDATE sets settings), and nothing at all in a message with a form this scanner does
/// not follow: dollar quotes, backslashes (escapes), control characters other than tab and
/// line breaks, unbalanced parentheses or more than 32 levels of them, an unterminated quote
/// or comment.
///
/// Why a shared entry is sound: two messages with one key are byte-identical outside folded
/// literals, so the scanner made the same decisions for both, and every folded literal is
/// data: the classifier reads the kinds of statements, names, functions and options, never a
/// compared, limiting, assigned or inserted number.
pub fn shape_key(sql: &str, out: &mut String) -> bool {
    out.clear();
    let folded = Scanner::new(sql, out).run();
    if !folded {
        out.clear();
    }
    folded
}

/// A token, as far as folding cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tok {
    Word(Word),
    QuotedIdent,
    /// `=`, `<>`, `!=`, `<`, `>`, `<=`, `>=`.
    Compare,
    Plus,
    Minus,
    LParen,
    RParen,
    Comma,
    Number,
    /// Strings, parameters, other operators and punctuation.
    Other,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Word {
    /// WHERE, HAVING, ON: a condition starts.
    Condition,
    /// AND, OR, NOT: a condition goes on.
    Connective,
    Limit,
    Connection,
    Set,
    Values,
    /// A keyword that starts another clause: the level's context ends.
    Clause,
    /// Anything else: a name, or a keyword inside an expression.
    Name,
}

/// What a parenthesis level (or the statement's top level) is inside.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Context {
    Plain,
    Condition,
    /// The SET list of an UPDATE (top level only).
    UpdateSet,
    /// After an INSERT's VALUES (top level only), where rows start.
    InsertValues,
    /// Inside one row of an INSERT's VALUES.
    ValuesRow,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Statement {
    Unknown,
    Update,
    Insert,
    Other,
}

struct Scanner<'a> {
    sql: &'a str,
    b: &'a [u8],
    out: &'a mut String,
    /// `sql[..copied]` is in `out`.
    copied: usize,
    folded: bool,
    /// Context per open parenthesis level, the statement's top level first: `levels[..depth]`.
    levels: [Context; MAX_DEPTH],
    depth: usize,
    statement: Statement,
    /// The last four tokens, the latest first.
    recent: [Tok; 4],
}

/// Deepest parenthesis nesting followed; deeper messages are keyed by their exact text.
const MAX_DEPTH: usize = 32;

/// Reserved words (and statement words) that end a condition, an assignment list or a VALUES
/// list when they appear at the same level.
const CLAUSES: &[&[u8]] = &[
    b"AS",
    b"CASE",
    b"CONFLICT",
    b"DELETE",
    b"DO",
    b"ELSE",
    b"END",
    b"EXCEPT",
    b"FETCH",
    b"FOR",
    b"FROM",
    b"GROUP",
    b"INSERT",
    b"INTERSECT",
    b"INTO",
    b"MATCHED",
    b"MERGE",
    b"ORDER",
    b"RETURNING",
    b"SELECT",
    b"THEN",
    b"TO",
    b"UNION",
    b"UPDATE",
    b"USING",
    b"WHEN",
    b"WINDOW",
    b"WITH",
];

fn is_word_start(c: u8) -> bool {
    c.is_ascii_alphabetic() || c == b'_' || c >= 0x80
}

fn is_word_part(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_' || c == b'$' || c >= 0x80
}

fn is_operator_char(c: u8) -> bool {
    b"+-*/<>=~!@#%^&|`?".contains(&c)
}

impl<'a> Scanner<'a> {
    fn new(sql: &'a str, out: &'a mut String) -> Self {
        Self {
            sql,
            b: sql.as_bytes(),
            out,
            copied: 0,
            folded: false,
            levels: [Context::Plain; MAX_DEPTH],
            depth: 1,
            statement: Statement::Unknown,
            recent: [Tok::Other; 4],
        }
    }

    fn push(&mut self, t: Tok) {
        self.recent = [t, self.recent[0], self.recent[1], self.recent[2]];
    }

    fn context(&self) -> Context {
        self.levels[self.depth - 1]
    }

    fn set_context(&mut self, c: Context) {
        self.levels[self.depth - 1] = c;
    }

    /// Scans the whole text; true if it folded a literal and nothing made it give up.
    fn run(mut self) -> bool {
        let b = self.b;
        let mut i = 0;
        while i < b.len() {
            let c = b[i];
            let next = b.get(i + 1).copied();
            i = match c {
                b' ' | b'\t' | b'\n' | b'\r' => i + 1,
                b'\'' | b'"' => {
                    let Some(end) = quoted(b, i) else {
                        return false;
                    };
                    if c == b'"' {
                        if b[i + 1..end - 1].eq_ignore_ascii_case(b"pg_settings") {
                            return false;
                        }
                        self.push(Tok::QuotedIdent);
                    } else {
                        self.push(Tok::Other);
                    }
                    end
                }
                b'-' if next == Some(b'-') => b[i..]
                    .iter()
                    .position(|&c| c == b'\n')
                    .map_or(b.len(), |n| i + n),
                b'/' if next == Some(b'*') => {
                    let Some(end) = block_comment(b, i) else {
                        return false;
                    };
                    end
                }
                b'$' => {
                    // `$1` is a parameter; `$tag$` a dollar quote, not followed here.
                    let digits = b[i + 1..].iter().take_while(|c| c.is_ascii_digit()).count();
                    if digits == 0 {
                        return false;
                    }
                    self.push(Tok::Other);
                    i + 1 + digits
                }
                b'(' => {
                    let parent = self.context();
                    let inner = match (parent, self.recent[0]) {
                        (
                            Context::Condition,
                            Tok::Word(Word::Condition | Word::Connective)
                            | Tok::Compare
                            | Tok::LParen,
                        ) => Context::Condition,
                        (Context::InsertValues, Tok::Word(Word::Values) | Tok::Comma) => {
                            Context::ValuesRow
                        }
                        _ => Context::Plain,
                    };
                    if self.depth == MAX_DEPTH {
                        return false;
                    }
                    self.levels[self.depth] = inner;
                    self.depth += 1;
                    self.push(Tok::LParen);
                    i + 1
                }
                b')' => {
                    if self.depth < 2 {
                        return false;
                    }
                    self.depth -= 1;
                    self.push(Tok::RParen);
                    i + 1
                }
                b';' => {
                    if self.depth != 1 {
                        return false;
                    }
                    self.levels[0] = Context::Plain;
                    self.statement = Statement::Unknown;
                    self.recent = [Tok::Other; 4];
                    i + 1
                }
                b',' => {
                    self.push(Tok::Comma);
                    i + 1
                }
                b'\\' => return false,
                c if c < 0x20 || c == 0x7f => return false,
                c if c.is_ascii_digit() => self.number(i),
                c if is_word_start(c) => {
                    let end = i + b[i..].iter().take_while(|&&c| is_word_part(c)).count();
                    if !self.word(&b[i..end]) {
                        return false;
                    }
                    end
                }
                c if is_operator_char(c) => {
                    let mut end = i;
                    while end < b.len()
                        && is_operator_char(b[end])
                        && !(b[end..].starts_with(b"--") || b[end..].starts_with(b"/*"))
                    {
                        end += 1;
                    }
                    self.push(match &b[i..end] {
                        b"=" | b"<>" | b"!=" | b"<" | b">" | b"<=" | b">=" => Tok::Compare,
                        b"+" => Tok::Plus,
                        b"-" => Tok::Minus,
                        _ => Tok::Other,
                    });
                    end
                }
                _ => {
                    self.push(Tok::Other);
                    i + 1
                }
            };
        }
        if self.depth != 1 {
            return false;
        }
        if self.folded {
            self.out.push_str(&self.sql[self.copied..]);
        }
        self.folded
    }

    /// A word: what it does to the level's context. False: give up (`pg_settings`).
    fn word(&mut self, w: &[u8]) -> bool {
        // Uppercased into a buffer as long as the longest word that means anything here.
        let mut buf = [0u8; 11];
        let upper: &[u8] = match buf.get_mut(..w.len()) {
            Some(b) => {
                b.copy_from_slice(w);
                b.make_ascii_uppercase();
                b
            }
            None => b"",
        };
        if upper == b"PG_SETTINGS" {
            return false;
        }
        if self.statement == Statement::Unknown {
            self.statement = match upper {
                b"UPDATE" => Statement::Update,
                b"INSERT" => Statement::Insert,
                _ => Statement::Other,
            };
        }
        let top = self.depth == 1;
        let kind = match upper {
            // ON after a table (`JOIN u x ON`, `JOIN (...) ON`) starts a join condition; after
            // anything else it is a value (`autovacuum_enabled = on`) or another clause.
            b"WHERE" | b"HAVING" | b"ON"
                if upper != b"ON"
                    || matches!(
                        self.recent[0],
                        Tok::Word(Word::Name) | Tok::QuotedIdent | Tok::RParen
                    ) =>
            {
                self.set_context(Context::Condition);
                Word::Condition
            }
            b"ON" => {
                self.set_context(Context::Plain);
                Word::Clause
            }
            b"AND" | b"OR" | b"NOT" => Word::Connective,
            b"LIMIT" | b"OFFSET" => {
                self.set_context(Context::Plain);
                Word::Limit
            }
            b"CONNECTION" => Word::Connection,
            b"SET" => {
                let assigning =
                    top && self.statement == Statement::Update && self.context() == Context::Plain;
                self.set_context(if assigning {
                    Context::UpdateSet
                } else {
                    Context::Plain
                });
                Word::Set
            }
            b"VALUES" => {
                self.set_context(if top && self.statement == Statement::Insert {
                    Context::InsertValues
                } else {
                    Context::Plain
                });
                Word::Values
            }
            _ if CLAUSES.contains(&upper) => {
                self.set_context(Context::Plain);
                Word::Clause
            }
            _ => Word::Name,
        };
        self.push(Tok::Word(kind));
        true
    }

    /// A numeric literal starting at `start`; folds it where it is data. Returns its end.
    fn number(&mut self, start: usize) -> usize {
        let b = self.b;
        let digits_end = start + b[start..].iter().take_while(|c| c.is_ascii_digit()).count();
        let plain_end = matches!(
            b.get(digits_end),
            None | Some(b' ' | b'\t' | b'\n' | b'\r' | b',' | b')' | b';')
        );
        let after_dot = start > 0 && b[start - 1] == b'.';
        if !plain_end || after_dot {
            // `1.5`, `1e5`, `0x1F`, `1_000`: never folded; the rest of it is read on.
            let end = digits_end
                + b[digits_end..]
                    .iter()
                    .take_while(|&&c| is_word_part(c) || c == b'.')
                    .count();
            self.push(Tok::Number);
            return end;
        }
        if self.is_data() {
            // A `0` already is its folded form, but the message is still one of a class.
            if &b[start..digits_end] != b"0" {
                self.out.push_str(&self.sql[self.copied..start]);
                self.out.push('0');
                self.copied = digits_end;
            }
            self.folded = true;
        }
        self.push(Tok::Number);
        digits_end
    }

    /// Whether a plain integer after the recent tokens is data (see [`shape_key`]).
    fn is_data(&self) -> bool {
        use Tok::{Comma, Compare, LParen, Minus, Plus, QuotedIdent};
        let column = |t: Tok| matches!(t, Tok::Word(Word::Name) | QuotedIdent);
        let r = self.recent;
        if r[0] == Tok::Word(Word::Limit) {
            return r[1] != Tok::Word(Word::Connection);
        }
        match self.context() {
            Context::Condition => {
                (r[0] == Compare && column(r[1]))
                    || (r[0] == Minus && r[1] == Compare && column(r[2]))
            }
            Context::UpdateSet => {
                (r[0] == Compare && column(r[1]))
                    || (r[0] == Minus && r[1] == Compare && column(r[2]))
                    || (matches!(r[0], Plus | Minus) && column(r[1]) && r[2] == Compare)
                    || (r[0] == Minus
                        && matches!(r[1], Plus | Minus)
                        && column(r[2])
                        && r[3] == Compare)
            }
            Context::ValuesRow => {
                matches!(r[0], LParen | Comma) || (r[0] == Minus && matches!(r[1], LParen | Comma))
            }
            Context::Plain | Context::InsertValues => false,
        }
    }
}

/// The end of the quoted string or identifier starting at `start` (a doubled quote stands for
/// itself); `None` if it is unterminated or holds a backslash (an escape in `E'...'`, or in any
/// string with standard_conforming_strings off).
fn quoted(b: &[u8], start: usize) -> Option<usize> {
    let quote = b[start];
    let mut i = start + 1;
    loop {
        match *b.get(i)? {
            b'\\' => return None,
            c if c == quote => {
                if b.get(i + 1) == Some(&quote) {
                    i += 2;
                } else {
                    return Some(i + 1);
                }
            }
            _ => i += 1,
        }
    }
}

/// The end of the (nested) block comment starting at `start`; `None` if unterminated.
fn block_comment(b: &[u8], start: usize) -> Option<usize> {
    let mut depth = 0usize;
    let mut i = start;
    loop {
        match (b.get(i)?, b.get(i + 1)) {
            (b'/', Some(b'*')) => {
                depth += 1;
                i += 2;
            }
            (b'*', Some(b'/')) => {
                depth -= 1;
                i += 2;
                if depth == 0 {
                    return Some(i);
                }
            }
            _ => i += 1,
        }
    }
}

/// A bounded cache of classifications by [`shape_key`]. Only messages whose meaning does not
/// depend on session state (no `EXECUTE`) are cached. A folded message that is `unknown` for a
/// reason is not: the parser's reasons quote the text, literals and positions included.
#[derive(Debug)]
pub struct SqlCache {
    map: Mutex<HashMap<Box<str>, Arc<Classification>>>,
    capacity: usize,
    hits: AtomicU64,
}

impl Default for SqlCache {
    fn default() -> Self {
        Self::with_capacity(Self::CAPACITY)
    }
}

impl SqlCache {
    /// Entries kept before the cache starts over.
    pub const CAPACITY: usize = 4096;
    /// Longest text cached: long messages are rarely repeated.
    pub const MAX_KEY: usize = 4096;

    pub(super) fn with_capacity(capacity: usize) -> Self {
        Self {
            map: Mutex::new(HashMap::new()),
            capacity,
            hits: AtomicU64::new(0),
        }
    }

    /// A cache that never keeps anything.
    pub fn disabled() -> Self {
        Self::with_capacity(0)
    }

    pub fn classify(
        &self,
        sql: &str,
        prepared: Option<&PreparedStatements>,
    ) -> Arc<Classification> {
        let cacheable = self.capacity > 0 && sql.len() <= Self::MAX_KEY;
        // A key is never longer than its text (a literal folds to `0`): one allocation.
        let mut shape = String::with_capacity(if cacheable { sql.len() } else { 0 });
        let folded = cacheable && shape_key(sql, &mut shape);
        let key: &str = if folded { &shape } else { sql };
        if cacheable {
            let map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(hit) = map.get(key) {
                self.hits.fetch_add(1, Ordering::Relaxed);
                return Arc::clone(hit);
            }
        }
        let c = Arc::new(classify(sql, prepared));
        if cacheable && !c.uses_prepared && (!folded || c.unknown_reasons.is_empty()) {
            let mut map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
            if map.len() >= self.capacity {
                map.clear();
            }
            map.insert(key.into(), Arc::clone(&c));
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

    /// How many classifications were answered from the cache.
    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::Relaxed)
    }
}
