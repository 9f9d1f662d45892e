//! Settings whose value changes what the server does with the bytes the gateway judged.
//!
//! Most settings are session state: assigning them is `session` whatever the value. A few are
//! judged by name and value, because the gateway's reading of every later statement is only
//! right while they keep the values it assumes:
//!
//! - `standard_conforming_strings`, `backslash_quote`: how string literals are read. The
//!   gateway reads them the standard way, so assigning either is `unknown`.
//! - `client_encoding`: which bytes form one character. See [`encoding`].
//! - `search_path`: which schema an unqualified name is in. Allow rules take an unqualified name
//!   as `public.name`; see [`search_path`].
//! - `role`, `session_authorization`: who the session is (`role`).
//!
//! Setting names are compared case-insensitively, as the server does (`SET "CLIENT_ENCODING"`
//! sets `client_encoding`). `RESET` and `DEFAULT` return a setting to the value the session
//! started with, which was judged at startup (the startup parameters, see
//! `proxy/postgres/startup.rs`) and checked at login (the server's reported `client_encoding`
//! and `standard_conforming_strings`, see [`login_hazard`]).

use sqlparser::tokenizer::{Token, TokenWithSpan};

use super::sql_class::SqlClass;

/// A setting's new value as a statement gives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum SettingValue {
    /// `RESET`, `SET ... TO DEFAULT`, `SET NAMES DEFAULT`: the value the session started with.
    Reset,
    /// The items of a `SET` value list: a literal's text (a string's contents, or an
    /// identifier as the server folds it), `None` for anything else.
    Items(Vec<Option<String>>),
    /// The one text `set_config` or a startup parameter passes, which the server reads in the
    /// setting's own syntax (for `search_path`, a comma-separated list of names).
    Raw(String),
    /// An expression the gateway cannot evaluate.
    NotLiteral,
}

/// How assigning `value` to the setting `name` is judged: its class, or why it is `unknown`.
pub(super) fn judge(name: &str, value: &SettingValue) -> Result<SqlClass, String> {
    let name = name.to_ascii_lowercase();
    match name.as_str() {
        "standard_conforming_strings" | "backslash_quote" => Err(format!(
            "setting {name} changes how the server reads string literals, which the gateway reads the standard way"
        )),
        "role" | "session_authorization" => Ok(SqlClass::Role),
        "client_encoding" => match one_text(value) {
            Ok(None) => Ok(SqlClass::Session),
            Ok(Some(text)) => encoding(text).map(|()| SqlClass::Session),
            Err(()) => Err("client_encoding set to a value the gateway cannot read".into()),
        },
        "search_path" => search_path(value).map(|()| SqlClass::Session),
        // A read-only session is opened with default_transaction_read_only on; turning it (or
        // the current transaction's) off is judged as the write it allows. On, or back to the
        // value the session started with, is session state.
        "default_transaction_read_only" | "transaction_read_only" => match one_text(value) {
            Ok(None) => Ok(SqlClass::Session),
            Ok(Some(text)) if is_true(text) => Ok(SqlClass::Session),
            _ => Err(format!(
                "setting {name} to anything but on would let the session write"
            )),
        },
        _ => Ok(SqlClass::Session),
    }
}

/// A boolean setting's text the server reads as true (`parse_bool`: a unique prefix of `true`
/// or `yes`, `on`, `1`, any case, surrounding spaces ignored).
fn is_true(text: &str) -> bool {
    let t = text.trim().to_ascii_lowercase();
    !t.is_empty() && ("true".starts_with(&t) || "yes".starts_with(&t) || t == "on" || t == "1")
}

/// The one text of a value (`None`: back to the starting value); an error for a list or an
/// expression.
fn one_text(value: &SettingValue) -> Result<Option<&str>, ()> {
    match value {
        SettingValue::Reset => Ok(None),
        SettingValue::Raw(text) => Ok(Some(text)),
        SettingValue::Items(items) => match items.as_slice() {
            [Some(text)] => Ok(Some(text)),
            _ => Err(()),
        },
        SettingValue::NotLiteral => Err(()),
    }
}

/// Judges a `client_encoding`.
///
/// The gateway reads a message as UTF-8 (the codec refuses bytes that are not) and the server
/// converts it from the client encoding before its lexer runs. In every encoding PostgreSQL
/// can store (all but the client-only ones below), the bytes of a multibyte character are all
/// 0x80 or above, so an ASCII byte — a quote, a backslash, a semicolon, a dash — is that ASCII
/// character for the gateway and the server alike, whatever else they make of the high bytes.
/// `SQL_ASCII` is such an encoding too: the server then converts nothing and checks the bytes
/// as the database's own encoding, which is one of those. The client-only encodings (SJIS,
/// SHIFT_JIS_2004, BIG5, GBK, GB18030, UHC, JOHAB) allow ASCII bytes as the second byte of a
/// character (0x5C, backslash, in all but UHC; `;` and digits in some): valid UTF-8 such as
/// `E'\u{81}\'; DELETE ...` is then one string to the gateway and a string that ends early to
/// the server. So they are refused outright. A name the gateway does not know (a future alias,
/// a name with non-ASCII letters, which the server folds by its locale) is refused as well.
pub(super) fn encoding(name: &str) -> Result<(), String> {
    match encoding_kind(name) {
        EncodingKind::ServerSafe => Ok(()),
        EncodingKind::ClientOnly(canonical) => Err(format!(
            "client_encoding {name:?} is {canonical}, a client-only encoding: an ASCII byte such as a backslash can be part of a multibyte character there, so the server would not read the statements as the gateway does"
        )),
        EncodingKind::NotKnown => Err(format!(
            "client_encoding {name:?} is not an encoding the gateway knows to keep ASCII bytes apart from multibyte characters"
        )),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EncodingKind {
    ServerSafe,
    /// With the encoding's canonical name.
    ClientOnly(&'static str),
    NotKnown,
}

/// Encoding names as PostgreSQL's `pg_char_to_encoding` finds them (`src/common/encnames.c`):
/// only ASCII letters and digits count, lowercased (`Shift-JIS`, `shift_jis` and `SHIFTJIS` are
/// one name), and a name of 64 bytes or more is no encoding.
fn encoding_kind(name: &str) -> EncodingKind {
    if name.len() >= 64 || !name.is_ascii() {
        return EncodingKind::NotKnown;
    }
    let key: String = name
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .map(|c| c.to_ascii_lowercase())
        .collect();
    if SERVER_SAFE.binary_search(&key.as_str()).is_ok() {
        return EncodingKind::ServerSafe;
    }
    CLIENT_ONLY
        .iter()
        .find(|(alias, _)| *alias == key)
        .map_or(EncodingKind::NotKnown, |(_, canonical)| {
            EncodingKind::ClientOnly(canonical)
        })
}

/// Every name `encnames.c` gives an encoding PostgreSQL can store (sorted, cleaned).
const SERVER_SAFE: &[&str] = &[
    "abc",
    "alt",
    "euccn",
    "eucjis2004",
    "eucjp",
    "euckr",
    "euctw",
    "iso88591",
    "iso885910",
    "iso885913",
    "iso885914",
    "iso885915",
    "iso885916",
    "iso88592",
    "iso88593",
    "iso88594",
    "iso88595",
    "iso88596",
    "iso88597",
    "iso88598",
    "iso88599",
    "koi8",
    "koi8r",
    "koi8u",
    "latin1",
    "latin10",
    "latin2",
    "latin3",
    "latin4",
    "latin5",
    "latin6",
    "latin7",
    "latin8",
    "latin9",
    "muleinternal",
    "sqlascii",
    "tcvn",
    "tcvn5712",
    "unicode",
    "utf8",
    "vscii",
    "win",
    "win1250",
    "win1251",
    "win1252",
    "win1253",
    "win1254",
    "win1255",
    "win1256",
    "win1257",
    "win1258",
    "win866",
    "win874",
    "windows1250",
    "windows1251",
    "windows1252",
    "windows1253",
    "windows1254",
    "windows1255",
    "windows1256",
    "windows1257",
    "windows1258",
    "windows866",
    "windows874",
];

/// Every name `encnames.c` gives a client-only encoding, with its canonical name.
const CLIENT_ONLY: &[(&str, &str)] = &[
    ("big5", "BIG5"),
    ("gb18030", "GB18030"),
    ("gbk", "GBK"),
    ("johab", "JOHAB"),
    ("mskanji", "SJIS"),
    ("shiftjis", "SJIS"),
    ("shiftjis2004", "SHIFT_JIS_2004"),
    ("sjis", "SJIS"),
    ("uhc", "UHC"),
    ("win932", "SJIS"),
    ("win936", "GBK"),
    ("win949", "UHC"),
    ("win950", "BIG5"),
    ("windows932", "SJIS"),
    ("windows936", "GBK"),
    ("windows949", "UHC"),
    ("windows950", "BIG5"),
];

/// Judges a `search_path`. Allow rules take an unqualified name as `public.name`; that holds
/// for the default path (`"$user", public`, where a schema named after the user, if one
/// exists, comes first, as it always has under these rules) and for `public` alone, and for no
/// other: any other value is `unknown`, since names would resolve elsewhere than the policy
/// assumes. (`pg_catalog` and the session's temporary schema are searched first either way.)
fn search_path(value: &SettingValue) -> Result<(), String> {
    let names: Option<Vec<String>> = match value {
        SettingValue::Reset => return Ok(()),
        SettingValue::Items(items) => items.iter().cloned().collect(),
        SettingValue::Raw(text) => split_identifier_list(text),
        SettingValue::NotLiteral => None,
    };
    match names {
        Some(names) if is_assumed_search_path(&names) => Ok(()),
        Some(names) => Err(format!(
            "search_path set to {}: unqualified names would resolve elsewhere than the policy assumes (public)",
            names
                .iter()
                .map(|n| format!("{n:?}"))
                .collect::<Vec<_>>()
                .join(", ")
        )),
        None => Err(
            "search_path set to a value the gateway cannot read: unqualified names could resolve elsewhere than the policy assumes (public)"
                .into(),
        ),
    }
}

fn is_assumed_search_path(names: &[String]) -> bool {
    match names {
        [only] => only == "public",
        [user, public] => user == "$user" && public == "public",
        _ => false,
    }
}

/// A list of names as the server's `SplitIdentifierString` reads `search_path` text: comma
/// separated, whitespace around names ignored, `"quoted"` names kept as they are (`""` for a
/// quote), others lowercased. `None` where the server would reject the text.
pub fn split_identifier_list(text: &str) -> Option<Vec<String>> {
    let is_space = |c: char| matches!(c, ' ' | '\t' | '\n' | '\r' | '\x0b' | '\x0c');
    let mut names = Vec::new();
    let mut rest = text.trim_start_matches(is_space);
    if rest.is_empty() {
        return Some(names);
    }
    loop {
        let name;
        if let Some(quoted) = rest.strip_prefix('"') {
            let mut out = String::new();
            let mut chars = quoted.char_indices();
            let end = loop {
                match chars.next() {
                    None => return None,
                    Some((i, '"')) => {
                        if quoted[i + 1..].starts_with('"') {
                            out.push('"');
                            chars.next();
                        } else {
                            break i + 1;
                        }
                    }
                    Some((_, c)) => out.push(c),
                }
            };
            name = super::sql_class::fold_identifier(&out, true);
            rest = &quoted[end..];
        } else {
            let end = rest
                .find(|c: char| c == ',' || is_space(c))
                .unwrap_or(rest.len());
            if end == 0 {
                return None;
            }
            name = super::sql_class::fold_identifier(&rest[..end], false);
            rest = &rest[end..];
        }
        names.push(name);
        rest = rest.trim_start_matches(is_space);
        match rest.strip_prefix(',') {
            Some(after) => rest = after.trim_start_matches(is_space),
            None if rest.is_empty() => return Some(names),
            None => return None,
        }
    }
}

/// `SET [SESSION | LOCAL] SCHEMA 'name'`, which the parser lacks: PostgreSQL's alias for
/// setting `search_path` to that one name. `None` for anything else.
pub(super) fn set_schema(piece: &[TokenWithSpan]) -> Option<Result<SqlClass, String>> {
    let mut tokens = piece
        .iter()
        .filter(|t| !matches!(t.token, Token::Whitespace(_) | Token::EOF));
    let mut word = |expected: &[&str]| match tokens.next().map(|t| &t.token) {
        Some(Token::Word(w))
            if w.quote_style.is_none()
                && expected.iter().any(|e| w.value.eq_ignore_ascii_case(e)) =>
        {
            Some(w.value.to_ascii_uppercase())
        }
        _ => None,
    };
    word(&["SET"])?;
    let mut next = word(&["SESSION", "LOCAL", "SCHEMA"])?;
    if next != "SCHEMA" {
        next = word(&["SCHEMA"])?;
    }
    debug_assert_eq!(next, "SCHEMA");
    let name = match tokens.next().map(|t| &t.token) {
        Some(Token::SingleQuotedString(s) | Token::EscapedStringLiteral(s)) => s.clone(),
        _ => return None,
    };
    if tokens.next().is_some() {
        return None;
    }
    Some(judge("search_path", &SettingValue::Items(vec![Some(name)])))
}

/// Why a session whose server reports `value` for `parameter` at login (ParameterStatus) cannot
/// be judged, if it cannot: a client-only `client_encoding` or `standard_conforming_strings`
/// off, set for the role or database or in the server's configuration, where no statement or
/// startup parameter of the client's was there to judge.
pub fn login_hazard(parameter: &str, value: &str) -> Option<String> {
    match parameter {
        "client_encoding" => encoding(value).err(),
        "standard_conforming_strings" if value != "on" => Some(format!(
            "the target starts sessions with standard_conforming_strings {value:?}, and the gateway reads string literals the standard way"
        )),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_encoding_tables_are_sorted_and_disjoint() {
        assert!(SERVER_SAFE.windows(2).all(|w| w[0] < w[1]));
        for (alias, _) in CLIENT_ONLY {
            assert!(SERVER_SAFE.binary_search(alias).is_err(), "{alias}");
        }
    }

    #[test]
    fn client_only_encodings_by_any_name_are_refused() {
        for name in [
            "SJIS",
            "sjis",
            "Shift-JIS",
            "shift_jis",
            "ShiftJIS",
            "Mskanji",
            "WIN932",
            "Windows-932",
            "SHIFT_JIS_2004",
            "BIG5",
            "Big-5",
            "win950",
            "GBK",
            "WIN936",
            "windows_936",
            "GB18030",
            "gb-18030",
            "UHC",
            "WIN949",
            "JOHAB",
            " sjis ",
        ] {
            let e = encoding(name).expect_err(name);
            assert!(e.contains("client-only"), "{name}: {e}");
        }
    }

    #[test]
    fn server_encodings_pass_and_unknown_names_do_not() {
        for name in [
            "UTF8",
            "utf-8",
            "Unicode",
            "SQL_ASCII",
            "LATIN1",
            "iso-8859-15",
            "ISO_8859_5",
            "WIN1252",
            "windows-1251",
            "EUC_JP",
            "euc-kr",
            "EUC_JIS_2004",
            "KOI8R",
            "koi8-u",
            "MULE_INTERNAL",
            "TCVN",
            "WIN866",
        ] {
            assert_eq!(encoding(name), Ok(()), "{name}");
        }
        for name in ["", "auto", "utf16", "sjís", "6", &"u".repeat(64)] {
            let e = encoding(name).expect_err(name);
            assert!(
                e.contains("not an encoding the gateway knows"),
                "{name}: {e}"
            );
        }
    }

    #[test]
    fn search_path_lists_are_split_as_the_server_splits_them() {
        let s = |t: &str| split_identifier_list(t);
        let v = |names: &[&str]| Some(names.iter().map(|n| (*n).to_string()).collect());
        assert_eq!(s(r#""$user", public"#), v(&["$user", "public"]));
        assert_eq!(s(r#"  "$user",PUBLIC  "#), v(&["$user", "public"]));
        assert_eq!(s("$user, public"), v(&["$user", "public"]));
        assert_eq!(s(r#""Pub""lic",x"#), v(&["Pub\"lic", "x"]));
        assert_eq!(s(""), v(&[]));
        assert_eq!(s("a b"), None);
        assert_eq!(s("a,"), None);
        assert_eq!(s(r#""open"#), None);
        assert_eq!(s(",a"), None);
    }

    #[test]
    fn only_the_assumed_search_paths_are_session_state() {
        let raw = |t: &str| judge("search_path", &SettingValue::Raw(t.into()));
        assert_eq!(raw(r#""$user", public"#), Ok(SqlClass::Session));
        assert_eq!(raw("public"), Ok(SqlClass::Session));
        for bad in [
            "secret",
            "secret, public",
            "public, secret",
            "",
            r#""PUBLIC""#,
            "a b",
        ] {
            let e = raw(bad).expect_err(bad);
            assert!(e.contains("resolve elsewhere"), "{bad}: {e}");
        }
        assert_eq!(
            judge("SEARCH_PATH", &SettingValue::Reset),
            Ok(SqlClass::Session)
        );
        assert!(judge("search_path", &SettingValue::NotLiteral).is_err());
    }

    #[test]
    fn login_hazards() {
        assert!(login_hazard("client_encoding", "SJIS").is_some());
        assert!(login_hazard("client_encoding", "UTF8").is_none());
        assert!(login_hazard("standard_conforming_strings", "off").is_some());
        assert!(login_hazard("standard_conforming_strings", "on").is_none());
        assert!(login_hazard("TimeZone", "UTC").is_none());
    }
}
