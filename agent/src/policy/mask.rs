//! Masking of result data: by column identity and by value detectors.
//!
//! Column rules need the real column (schema, table, column from `RowDescription`'s table OID),
//! not the alias the query gave it. Value detectors run over every text value, so an alias,
//! `row_to_json(u)` or a COPY line does not leak what the column rule would have hidden. Card
//! numbers and IBANs are only masked when their checksum holds, which keeps order ids and
//! phone numbers readable.

use std::{borrow::Cow, fmt, fmt::Write as _, sync::LazyLock};

use regex::Regex;
use serde::{Serialize, Serializer};
use sha2::{Digest as _, Sha256};

use super::matchers::Glob;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Detector {
    Email,
    /// Payment card numbers, 13-19 digits, Luhn-valid.
    Card,
    /// IBANs with a valid mod-97 checksum.
    Iban,
    /// API tokens and keys by shape (AWS, GitHub, GitLab, Slack, OpenAI-style, Google, JWT,
    /// PEM private keys).
    Token,
}

impl Detector {
    pub fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "email" => Detector::Email,
            "card" => Detector::Card,
            "iban" => Detector::Iban,
            "token" => Detector::Token,
            _ => return None,
        })
    }

    fn regex(self) -> &'static Regex {
        static EMAIL: LazyLock<Regex> = LazyLock::new(|| {
            Regex::new(r"(?i)\b[a-z0-9._%+-]+@[a-z0-9-]+(?:\.[a-z0-9-]+)*\.[a-z]{2,}\b")
                .expect("valid regex")
        });
        static CARD: LazyLock<Regex> =
            LazyLock::new(|| Regex::new(r"\b\d(?:[ -]?\d){12,18}\b").expect("valid regex"));
        static IBAN: LazyLock<Regex> = LazyLock::new(|| {
            Regex::new(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]){11,30}\b").expect("valid regex")
        });
        static TOKEN: LazyLock<Regex> = LazyLock::new(|| {
            Regex::new(concat!(
                r"\bAKIA[0-9A-Z]{16}\b",
                r"|\bgh[pousr]_[A-Za-z0-9]{36,}\b",
                r"|\bgithub_pat_[A-Za-z0-9_]{22,}\b",
                r"|\bglpat-[A-Za-z0-9_-]{20,}",
                r"|\bxox[abprs]-[A-Za-z0-9-]{10,}",
                r"|\bsk-[A-Za-z0-9_-]{20,}",
                r"|\bAIza[0-9A-Za-z_-]{35}",
                r"|\beyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}",
                r"|-----BEGIN [A-Z ]*PRIVATE KEY-----[\s\S]*?(?:-----END [A-Z ]*PRIVATE KEY-----|$)",
            ))
            .expect("valid regex")
        });
        match self {
            Detector::Email => &EMAIL,
            Detector::Card => &CARD,
            Detector::Iban => &IBAN,
            Detector::Token => &TOKEN,
        }
    }

    fn confirms(self, candidate: &str) -> bool {
        match self {
            Detector::Card => luhn_valid(candidate),
            Detector::Iban => iban_valid(candidate),
            Detector::Email | Detector::Token => true,
        }
    }
}

impl fmt::Display for Detector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Detector::Email => "email",
            Detector::Card => "card",
            Detector::Iban => "iban",
            Detector::Token => "token",
        })
    }
}

/// How a masked value is shown. Ordered from most to least revealing, so that when two rules
/// mask the same thing the stronger style wins, whatever the order of the rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MaskStyle {
    /// Keep the last N characters, star the rest (`************1234`).
    KeepLast(usize),
    /// A stable digest (`hash:3f7a...`), joinable across rows without showing the value.
    Hash { salt: String },
    /// `[redacted]`.
    Redact,
}

impl MaskStyle {
    /// Higher hides more: redact > hash > keep-last with fewer characters kept.
    pub(crate) fn strength(&self) -> (u8, usize) {
        match self {
            MaskStyle::KeepLast(n) => (0, usize::MAX - n),
            MaskStyle::Hash { .. } => (1, 0),
            MaskStyle::Redact => (2, 0),
        }
    }

    /// `redact`, `hash`, or `keep-last-N`.
    pub fn parse(s: &str, salt: Option<&str>) -> Option<Self> {
        match s {
            "redact" => Some(MaskStyle::Redact),
            "hash" => Some(MaskStyle::Hash {
                salt: salt.unwrap_or_default().to_string(),
            }),
            _ => s
                .strip_prefix("keep-last-")
                .and_then(|n| n.parse().ok())
                .filter(|n| *n <= 64)
                .map(MaskStyle::KeepLast),
        }
    }

    pub fn apply(&self, value: &str) -> String {
        match self {
            MaskStyle::Redact => "[redacted]".to_string(),
            MaskStyle::Hash { salt } => {
                let mut h = Sha256::new();
                h.update(salt.as_bytes());
                h.update(value.as_bytes());
                let digest = h.finalize();
                let hex = digest.iter().take(8).fold(String::new(), |mut s, b| {
                    let _ = write!(s, "{b:02x}");
                    s
                });
                format!("hash:{hex}")
            }
            MaskStyle::KeepLast(n) => {
                let count = value.chars().count();
                value
                    .chars()
                    .enumerate()
                    .map(|(i, c)| if i + n >= count { c } else { '*' })
                    .collect()
            }
        }
    }
}

impl fmt::Display for MaskStyle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MaskStyle::Redact => f.write_str("redact"),
            MaskStyle::Hash { .. } => f.write_str("hash"),
            MaskStyle::KeepLast(n) => write!(f, "keep-last-{n}"),
        }
    }
}

impl Serialize for MaskStyle {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// `column`, `table.column` or `schema.table.column`, each part a glob; matched against the
/// real column identity, aligned from the right.
#[derive(Debug, Clone)]
pub struct ColumnPattern {
    parts: Vec<Glob>,
}

impl ColumnPattern {
    pub fn new(pattern: &str) -> Result<Self, String> {
        let parts: Vec<&str> = pattern.split('.').collect();
        if parts.len() > 3 || parts.iter().any(|p| p.is_empty()) {
            return Err(format!(
                "{pattern:?} is not `column`, `table.column` or `schema.table.column`"
            ));
        }
        Ok(Self {
            parts: parts
                .iter()
                .map(|p| Glob::new(p, None, false))
                .collect::<Result<_, _>>()?,
        })
    }

    pub fn matches(&self, schema: &str, table: &str, column: &str) -> bool {
        let id = [schema, table, column];
        let offset = 3 - self.parts.len();
        self.parts
            .iter()
            .zip(&id[offset..])
            .all(|(g, v)| g.is_match(v))
    }

    /// Whether the pattern could name `column` of `table` in `schema` (`None`: unqualified,
    /// any schema).
    pub fn may_match(&self, schema: Option<&str>, table: &str, column: &str) -> bool {
        self.parts.last().is_some_and(|g| g.is_match(column)) && self.may_match_table(schema, table)
    }

    /// Whether some column of a table could match: the schema and table parts, where the
    /// pattern has them. An unknown schema (`None`: the name was not qualified) matches.
    pub fn may_match_table(&self, schema: Option<&str>, table: &str) -> bool {
        let n = self.parts.len();
        let table_ok = n < 2 || self.parts[n - 2].is_match(table);
        let schema_ok = n < 3 || schema.is_none_or(|s| self.parts[0].is_match(s));
        table_ok && schema_ok
    }
}

impl Serialize for ColumnPattern {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let text: Vec<&str> = self.parts.iter().map(Glob::as_str).collect();
        s.serialize_str(&text.join("."))
    }
}

/// One mask rule from a policy file.
#[derive(Debug, Clone, Serialize)]
pub struct MaskRule {
    pub rule: String,
    pub columns: Vec<ColumnPattern>,
    pub detectors: Vec<Detector>,
    pub style: MaskStyle,
}

#[cfg(test)]
impl MaskRule {
    /// A rule named `r` for tests: `columns` are patterns (valid ones), `detectors` scan.
    pub(crate) fn for_test(columns: &[&str], detectors: &[Detector], style: MaskStyle) -> Self {
        Self {
            rule: "r".into(),
            columns: columns
                .iter()
                .map(|c| ColumnPattern::new(c).expect("a valid column pattern"))
                .collect(),
            detectors: detectors.to_vec(),
            style,
        }
    }
}

/// The masks of one decision, ready to apply to result values.
#[derive(Debug, Clone, Default)]
pub struct Masker<'a> {
    rules: Vec<&'a MaskRule>,
    detectors: Detectors,
}

/// The value detectors of a set of rules, each with its strongest style; owned, so a result
/// can keep it for all its rows.
#[derive(Debug, Clone, Default)]
pub struct Detectors {
    found: Vec<(Detector, MaskStyle)>,
}

impl<'a> Masker<'a> {
    pub fn new(rules: impl IntoIterator<Item = &'a MaskRule>) -> Self {
        let rules: Vec<&MaskRule> = rules.into_iter().collect();
        let mut detectors: Vec<(Detector, MaskStyle)> = Vec::new();
        for r in &rules {
            for d in &r.detectors {
                match detectors.iter_mut().find(|(x, _)| x == d) {
                    Some((_, style)) if style.strength() < r.style.strength() => {
                        *style = r.style.clone();
                    }
                    Some(_) => {}
                    None => detectors.push((*d, r.style.clone())),
                }
            }
        }
        detectors.sort_by_key(|(d, _)| *d);
        Self {
            rules,
            detectors: Detectors { found: detectors },
        }
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Whether any rule names columns (only those need the real column identity).
    pub fn has_column_rules(&self) -> bool {
        self.rules.iter().any(|r| !r.columns.is_empty())
    }

    /// The strongest style for a column, if any rule names it.
    pub fn column_style(&self, schema: &str, table: &str, column: &str) -> Option<&MaskStyle> {
        self.rules
            .iter()
            .filter(|r| r.columns.iter().any(|c| c.matches(schema, table, column)))
            .map(|r| &r.style)
            .max_by_key(|s| s.strength())
    }

    /// The strongest style for a column named without its schema (`None`: any schema).
    pub fn column_style_maybe(
        &self,
        schema: Option<&str>,
        table: &str,
        column: &str,
    ) -> Option<&MaskStyle> {
        self.rules
            .iter()
            .filter(|r| r.columns.iter().any(|c| c.may_match(schema, table, column)))
            .map(|r| &r.style)
            .max_by_key(|s| s.strength())
    }

    /// The strongest style of any column rule: what a value gets when its column cannot be
    /// identified but a column rule might name it.
    pub fn strongest_column_style(&self) -> Option<&MaskStyle> {
        self.rules
            .iter()
            .filter(|r| !r.columns.is_empty())
            .map(|r| &r.style)
            .max_by_key(|s| s.strength())
    }

    /// Whether a column rule could name some column of `schema.table` (`None`: unqualified).
    pub fn may_mask_table(&self, schema: Option<&str>, table: &str) -> bool {
        self.rules
            .iter()
            .flat_map(|r| &r.columns)
            .any(|c| c.may_match_table(schema, table))
    }

    /// The value detectors, for keeping beyond this masker.
    pub fn detectors(&self) -> &Detectors {
        &self.detectors
    }

    /// Masks a value: the whole of it if its column is named, else what the detectors find.
    pub fn mask<'v>(&self, column: Option<(&str, &str, &str)>, value: &'v str) -> Cow<'v, str> {
        if let Some(style) = column.and_then(|(s, t, c)| self.column_style(s, t, c)) {
            return Cow::Owned(style.apply(value));
        }
        self.mask_text(value)
    }

    /// Replaces what the detectors find in free text.
    pub fn mask_text<'v>(&self, text: &'v str) -> Cow<'v, str> {
        self.detectors.mask_text(text)
    }
}

impl Detectors {
    pub fn is_empty(&self) -> bool {
        self.found.is_empty()
    }

    /// Replaces what the detectors find in free text.
    pub fn mask_text<'v>(&self, text: &'v str) -> Cow<'v, str> {
        let mut found: Vec<(usize, usize, &MaskStyle)> = Vec::new();
        for (d, style) in &self.found {
            for m in d.regex().find_iter(text) {
                if d.confirms(m.as_str()) {
                    found.push((m.start(), m.end(), style));
                }
            }
        }
        if found.is_empty() {
            return Cow::Borrowed(text);
        }
        found.sort_by_key(|(s, e, _)| (*s, std::cmp::Reverse(*e)));
        let mut out = String::with_capacity(text.len());
        let mut at = 0;
        for (start, end, style) in found {
            if start < at {
                continue;
            }
            out.push_str(&text[at..start]);
            out.push_str(&style.apply(&text[start..end]));
            at = end;
        }
        out.push_str(&text[at..]);
        Cow::Owned(out)
    }
}

pub fn luhn_valid(candidate: &str) -> bool {
    let digits: Vec<u32> = candidate.chars().filter_map(|c| c.to_digit(10)).collect();
    if !(13..=19).contains(&digits.len()) {
        return false;
    }
    let sum: u32 = digits
        .iter()
        .rev()
        .enumerate()
        .map(|(i, d)| {
            if i % 2 == 1 {
                if *d * 2 > 9 {
                    *d * 2 - 9
                } else {
                    *d * 2
                }
            } else {
                *d
            }
        })
        .sum();
    sum.is_multiple_of(10)
}

pub fn iban_valid(candidate: &str) -> bool {
    let compact: Vec<char> = candidate.chars().filter(|c| !c.is_whitespace()).collect();
    if !(15..=34).contains(&compact.len()) || !compact.iter().all(char::is_ascii_alphanumeric) {
        return false;
    }
    let rotated = compact[4..].iter().chain(&compact[..4]);
    let mut rem: u32 = 0;
    for c in rotated {
        let Some(v) = c.to_digit(36) else {
            return false;
        };
        rem = if v >= 10 {
            (rem * 100 + v) % 97
        } else {
            (rem * 10 + v) % 97
        };
    }
    rem == 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums() {
        assert!(luhn_valid("4111 1111 1111 1111"));
        assert!(luhn_valid("5500-0000-0000-0004"));
        assert!(!luhn_valid("4111 1111 1111 1112"));
        assert!(!luhn_valid("1234"));
        assert!(iban_valid("GB82 WEST 1234 5698 7654 32"));
        assert!(iban_valid("DE89370400440532013000"));
        assert!(!iban_valid("DE89370400440532013001"));
    }

    #[test]
    fn detectors_find_values_in_free_text_and_respect_checksums() {
        let r = MaskRule::for_test(
            &[],
            &[
                Detector::Email,
                Detector::Card,
                Detector::Iban,
                Detector::Token,
            ],
            MaskStyle::Redact,
        );
        let m = Masker::new([&r]);
        assert_eq!(
            m.mask_text("mail bob@example.com now"),
            "mail [redacted] now"
        );
        assert_eq!(
            m.mask_text("{\"card\":\"4111111111111111\"}"),
            "{\"card\":\"[redacted]\"}"
        );
        assert_eq!(
            m.mask_text("order 4111111111111112"),
            "order 4111111111111112",
            "not Luhn-valid"
        );
        assert_eq!(
            m.mask_text("iban DE89 3704 0044 0532 0130 00."),
            "iban [redacted]."
        );
        assert_eq!(m.mask_text("key AKIAIOSFODNN7EXAMPLE"), "key [redacted]");
        assert_eq!(m.mask_text("plain text 42"), "plain text 42");
        assert!(matches!(m.mask_text("nothing"), Cow::Borrowed(_)));
    }

    #[test]
    fn styles_and_columns() {
        assert_eq!(
            MaskStyle::KeepLast(4).apply("4111111111111111"),
            "************1111"
        );
        assert_eq!(MaskStyle::KeepLast(4).apply("ab"), "ab");
        assert!(MaskStyle::KeepLast(2).strength() > MaskStyle::KeepLast(4).strength());
        let h1 = MaskStyle::Hash { salt: "s".into() }.apply("x");
        assert_eq!(h1, MaskStyle::Hash { salt: "s".into() }.apply("x"));
        assert_ne!(h1, MaskStyle::Hash { salt: "t".into() }.apply("x"));
        assert!(h1.starts_with("hash:") && h1.len() == 21);
        assert_eq!(
            MaskStyle::parse("keep-last-4", None),
            Some(MaskStyle::KeepLast(4))
        );
        assert_eq!(MaskStyle::parse("keep-last-x", None), None);
        assert_eq!(MaskStyle::parse("blur", None), None);

        let weak = MaskRule::for_test(&["public.users.email"], &[], MaskStyle::KeepLast(3));
        let strong = MaskRule::for_test(&["users.email", "*.ssn"], &[], MaskStyle::Redact);
        let m = Masker::new([&weak, &strong]);
        assert_eq!(
            m.column_style("public", "users", "email"),
            Some(&MaskStyle::Redact),
            "stronger wins"
        );
        assert_eq!(
            m.column_style("hr", "people", "ssn"),
            Some(&MaskStyle::Redact)
        );
        assert_eq!(m.column_style("public", "users", "name"), None);
        assert_eq!(
            m.column_style_maybe(None, "users", "email"),
            Some(&MaskStyle::Redact),
            "an unqualified table may be in any schema"
        );
        assert_eq!(
            m.column_style_maybe(Some("hr"), "users", "email"),
            Some(&MaskStyle::Redact)
        );
        assert_eq!(m.column_style_maybe(None, "users", "name"), None);
        let only_public = Masker::new([&weak]);
        assert_eq!(
            only_public.column_style_maybe(Some("hr"), "users", "email"),
            None
        );
        assert_eq!(
            m.mask(Some(("hr", "people", "ssn")), "123-45-6789"),
            "[redacted]"
        );
        assert!(ColumnPattern::new("a.b.c.d").is_err());
        assert!(ColumnPattern::new("a..c").is_err());
    }
}
