//! Startup parameters as settings.
//!
//! PostgreSQL applies every startup parameter other than `user`, `database` and `replication`
//! as a setting at login (`role=admin` works as well as `SET role = admin`), and so is every
//! `-c name=value` in `options`. The gateway passes them upstream, so it judges each as the
//! `SET` statement it amounts to: a client cannot take at login what a statement would be
//! refused.

use crate::policy;

/// The `SET` statements `params` amount to, in order. `user`, `database` and `replication`
/// (which the gateway drops) are not settings. Errors on an `options` word other than
/// `-c name=value` / `--name=value`, or a setting name that is not a plain identifier.
pub fn settings(params: &[(String, String)]) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    for (name, value) in params {
        match name.as_str() {
            "user" | "database" | "replication" => {}
            "options" => {
                let words = split_options(value);
                let mut words = words.iter();
                while let Some(word) = words.next() {
                    let setting = if word == "-c" {
                        words
                            .next()
                            .ok_or_else(|| "startup option -c without a setting".to_string())?
                            .as_str()
                    } else if let Some(s) = word.strip_prefix("-c") {
                        s
                    } else if let Some(s) = word.strip_prefix("--") {
                        s
                    } else {
                        return Err(format!(
                            "startup option {word:?} is not accepted through the gateway (only -c name=value)"
                        ));
                    };
                    let (name, value) = setting
                        .split_once('=')
                        .ok_or_else(|| format!("startup option {setting:?} has no value"))?;
                    out.push(set_statement(&name.replace('-', "_"), value)?);
                }
            }
            _ => out.push(set_statement(name, value)?),
        }
    }
    Ok(out)
}

/// `options` split as the server splits it: on whitespace, a backslash taking the next
/// character literally.
fn split_options(options: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut chars = options.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => word.extend(chars.next()),
            c if c.is_whitespace() => {
                if !word.is_empty() {
                    words.push(std::mem::take(&mut word));
                }
            }
            c => word.push(c),
        }
    }
    if !word.is_empty() {
        words.push(word);
    }
    words
}

fn set_statement(name: &str, value: &str) -> Result<String, String> {
    let lower = name.to_ascii_lowercase();
    if lower == "search_path" {
        return Ok(search_path_statement(value));
    }
    let plain = lower.split('.').all(|part| {
        part.chars()
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
            && part
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
    });
    if !plain {
        return Err(format!("startup parameter {name:?} is not a setting name"));
    }
    Ok(format!("SET {lower} = {}", quote_literal(value)))
}

fn quote_literal(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

/// A startup `search_path` is a list in the setting's own syntax (`"$user", public`), which
/// `SET` with one string would take as one schema name: it becomes the `SET` of the names the
/// server reads from it, each quoted. Text the server would not read as a list stays one string
/// (and is judged as that one odd name).
fn search_path_statement(value: &str) -> String {
    match policy::split_identifier_list(value) {
        Some(names) if !names.is_empty() => format!(
            "SET search_path = {}",
            names
                .iter()
                .map(|n| format!("\"{}\"", n.replace('"', "\"\"")))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        _ => format!("SET search_path = {}", quote_literal(value)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
            .collect()
    }

    #[test]
    fn parameters_and_options_become_set_statements() {
        let got = settings(&p(&[
            ("user", "app"),
            ("database", "db"),
            ("application_name", "psql"),
            ("Role", "admin"),
            (
                "options",
                r"-c statement_timeout=5s --search-path=a\ b -crole=x -c x.y='q",
            ),
        ]))
        .unwrap();
        assert_eq!(
            got,
            [
                "SET application_name = 'psql'",
                "SET role = 'admin'",
                "SET statement_timeout = '5s'",
                "SET search_path = 'a b'",
                "SET role = 'x'",
                "SET x.y = '''q'",
            ]
        );
    }

    #[test]
    fn a_startup_search_path_is_read_as_the_list_it_is() {
        let got = settings(&p(&[
            ("search_path", r#""$user", public"#),
            (
                "options",
                r"-c search_path=secret,public -csearch_path=\ public",
            ),
            ("SEARCH_PATH", r#""a""b", C"#),
            ("search_path", ""),
            ("search_path", "a b"),
        ]))
        .unwrap();
        assert_eq!(
            got,
            [
                r#"SET search_path = "$user", "public""#,
                r#"SET search_path = "secret", "public""#,
                r#"SET search_path = "public""#,
                r#"SET search_path = "a""b", "c""#,
                "SET search_path = ''",
                "SET search_path = 'a b'",
            ]
        );
        let judged = |text: &str| crate::policy::classify(text, None);
        assert_eq!(
            judged(&got[0]).headline(),
            Some(crate::policy::SqlClass::Session)
        );
        assert_eq!(
            judged(&got[2]).headline(),
            Some(crate::policy::SqlClass::Session)
        );
        for refused in [&got[1], &got[3], &got[4], &got[5]] {
            assert_eq!(
                judged(refused).headline(),
                Some(crate::policy::SqlClass::Unknown),
                "{refused}"
            );
        }
    }

    #[test]
    fn a_startup_client_encoding_is_judged_by_its_value() {
        for (params, session) in [
            (&[("client_encoding", "UTF8")][..], true),
            (&[("client_encoding", "SJIS")], false),
            (&[("options", "-c client_encoding=Shift-JIS")], false),
            (&[("options", "--client-encoding=big5")], false),
            (&[("client_encoding", "LATIN1")], true),
        ] {
            let statements = settings(&p(params)).unwrap();
            let c = crate::policy::classify(&statements[0], None);
            assert_eq!(
                c.headline() == Some(crate::policy::SqlClass::Session),
                session,
                "{params:?}: {c:?}"
            );
        }
    }

    #[test]
    fn anything_else_is_refused() {
        for bad in [
            &[("options", "-B 100")][..],
            &[("options", "-c")],
            &[("options", "-c novalue")],
            &[("bad name", "x")],
            &[("x;drop", "x")],
        ] {
            assert!(settings(&p(bad)).is_err(), "{bad:?}");
        }
    }
}
