//! `COPY ... TO STDOUT` statements read from their text: which table and columns a COPY
//! writes, in which format, so its output can be masked by column (`proxy::postgres::columns`).
//!
//! What cannot be read with certainty (a message too long or too deep to parse, a delimiter
//! that is not one byte, an unknown format) is `None`: the caller then cannot attribute the
//! COPY's fields and masks them all (fail closed).

use sqlparser::{
    ast::{CopyLegacyCsvOption, CopyLegacyOption, CopyOption, CopySource, CopyTarget, Statement},
    dialect::PostgreSqlDialect,
    parser::Parser,
};

use super::{Classification, Masker};

/// Nesting the COPY statement parser follows before giving up (the statement is then not
/// attributed: fail closed).
const PARSE_DEPTH: usize = 64;
/// Longer messages are not parsed for COPY (not attributed: fail closed).
const MAX_PARSED: usize = 64 * 1024;

/// How COPY writes its rows (from the statement's options).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CopyFormat {
    Text {
        delimiter: u8,
        null: Vec<u8>,
    },
    Csv {
        delimiter: u8,
        quote: u8,
        escape: u8,
        null: Vec<u8>,
    },
    Binary,
}

impl CopyFormat {
    pub fn text() -> Self {
        CopyFormat::Text {
            delimiter: b'\t',
            null: b"\\N".to_vec(),
        }
    }

    #[cfg(test)]
    pub fn csv() -> Self {
        CopyFormat::Csv {
            delimiter: b',',
            quote: b'"',
            escape: b'"',
            null: Vec::new(),
        }
    }
}

/// What a COPY ... TO STDOUT writes, as far as its statement says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CopySpec {
    /// `COPY [schema.]table [(columns)] TO STDOUT`: names as the server folds them.
    Table {
        schema: Option<String>,
        table: String,
        columns: Vec<String>,
        format: CopyFormat,
        header: bool,
    },
    /// `COPY (query) TO STDOUT`: columns cannot be attributed; `touches` if a column rule could
    /// name a column of a table the message reads.
    Query {
        touches: bool,
        format: CopyFormat,
        header: bool,
    },
}

/// The COPY ... TO STDOUT statements of a message, in order; `None` if it cannot be parsed.
pub fn copy_specs(
    sql: &str,
    masker: &Masker<'_>,
    touched: &Classification,
) -> Option<Vec<CopySpec>> {
    if sql.len() > MAX_PARSED {
        return None;
    }
    let statements = Parser::new(&PostgreSqlDialect {})
        .with_recursion_limit(PARSE_DEPTH)
        .try_with_sql(sql)
        .and_then(|mut p| p.parse_statements())
        .ok()?;
    let mut specs = Vec::new();
    for s in &statements {
        let Statement::Copy {
            source,
            to: true,
            target: CopyTarget::Stdout,
            options,
            legacy_options,
            ..
        } = s
        else {
            continue;
        };
        let (format, header) = copy_format(options, legacy_options)?;
        specs.push(match source {
            CopySource::Table {
                table_name,
                columns,
            } => {
                let mut parts: Vec<String> = table_name
                    .0
                    .iter()
                    .map(|p| p.as_ident().map(fold))
                    .collect::<Option<_>>()?;
                let table = parts.pop()?;
                let schema = parts.pop();
                if !parts.is_empty() && parts.len() != 1 {
                    return None;
                }
                CopySpec::Table {
                    schema,
                    table,
                    columns: columns.iter().map(fold).collect(),
                    format,
                    header,
                }
            }
            CopySource::Query(_) => CopySpec::Query {
                touches: !touched.objects_complete
                    || touched.objects.iter().any(|o| {
                        let (schema, table) = match o.rsplit_once('.') {
                            Some((s, t)) => (Some(s.rsplit('.').next().unwrap_or(s)), t),
                            None => (None, o.as_str()),
                        };
                        masker.may_mask_table(schema, table)
                    }),
                format,
                header,
            },
        });
    }
    Some(specs)
}

/// An identifier as the server resolves it (see [`super::sql::fold_identifier`]).
fn fold(ident: &sqlparser::ast::Ident) -> String {
    super::sql::fold_identifier(&ident.value, ident.quote_style.is_some())
}

/// The format a COPY's options ask for; `None` for one that cannot be followed (a delimiter
/// that is not one byte, an unknown format).
fn copy_format(options: &[CopyOption], legacy: &[CopyLegacyOption]) -> Option<(CopyFormat, bool)> {
    let mut kind = "text".to_string();
    let (mut delimiter, mut null, mut quote, mut escape, mut header) =
        (None, None, None, None, false);
    let byte = |c: char| u8::try_from(c).ok().filter(u8::is_ascii);
    for o in options {
        match o {
            CopyOption::Format(f) => kind = f.value.to_lowercase(),
            CopyOption::Delimiter(c) => delimiter = Some(byte(*c)?),
            CopyOption::Null(s) => null = Some(s.as_bytes().to_vec()),
            CopyOption::Header(h) => header = *h,
            CopyOption::Quote(c) => quote = Some(byte(*c)?),
            CopyOption::Escape(c) => escape = Some(byte(*c)?),
            _ => {}
        }
    }
    for o in legacy {
        match o {
            CopyLegacyOption::Binary => kind = "binary".into(),
            CopyLegacyOption::Delimiter(c) => delimiter = Some(byte(*c)?),
            CopyLegacyOption::Null(s) => null = Some(s.as_bytes().to_vec()),
            CopyLegacyOption::Header => header = true,
            CopyLegacyOption::Csv(csv) => {
                kind = "csv".into();
                for c in csv {
                    match c {
                        CopyLegacyCsvOption::Header => header = true,
                        CopyLegacyCsvOption::Quote(q) => quote = Some(byte(*q)?),
                        CopyLegacyCsvOption::Escape(e) => escape = Some(byte(*e)?),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    let format = match kind.as_str() {
        "text" => CopyFormat::Text {
            delimiter: delimiter.unwrap_or(b'\t'),
            null: null.unwrap_or_else(|| b"\\N".to_vec()),
        },
        "csv" => {
            let quote = quote.unwrap_or(b'"');
            CopyFormat::Csv {
                delimiter: delimiter.unwrap_or(b','),
                quote,
                escape: escape.unwrap_or(quote),
                null: null.unwrap_or_default(),
            }
        }
        "binary" => CopyFormat::Binary,
        _ => return None,
    };
    Some((format, header))
}

/// Whether `sql` could hold a COPY statement (a cheap test before parsing).
pub fn contains_copy(sql: &str) -> bool {
    sql.as_bytes()
        .windows(4)
        .any(|w| w.eq_ignore_ascii_case(b"copy"))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::policy::{mask::Detector, MaskRule, MaskStyle};

    fn masks() -> Vec<Arc<MaskRule>> {
        vec![
            Arc::new(MaskRule::for_test(
                &["public.users.ssn"],
                &[],
                MaskStyle::Redact,
            )),
            Arc::new(MaskRule::for_test(
                &[],
                &[Detector::Email],
                MaskStyle::Redact,
            )),
        ]
    }

    fn masker_of(m: &[Arc<MaskRule>]) -> Masker<'_> {
        Masker::new(m.iter().map(AsRef::as_ref))
    }

    #[test]
    fn copy_statements_are_attributed_to_their_table_and_columns() {
        let m = masks();
        let masker = masker_of(&m);
        let none = Classification {
            objects_complete: true,
            ..Classification::default()
        };
        let specs = copy_specs(
            "SELECT 1; COPY users TO STDOUT; COPY public.\"Users\" (SSN, \"Id\") TO STDOUT \
             WITH (FORMAT csv, HEADER true, DELIMITER ';'); COPY users FROM STDIN",
            &masker,
            &none,
        )
        .unwrap();
        assert_eq!(
            specs,
            vec![
                CopySpec::Table {
                    schema: None,
                    table: "users".into(),
                    columns: vec![],
                    format: CopyFormat::text(),
                    header: false,
                },
                CopySpec::Table {
                    schema: Some("public".into()),
                    table: "Users".into(),
                    columns: vec!["ssn".into(), "Id".into()],
                    format: CopyFormat::Csv {
                        delimiter: b';',
                        quote: b'"',
                        escape: b'"',
                        null: vec![],
                    },
                    header: true,
                },
            ]
        );
        let reads_users = crate::policy::classify("COPY (SELECT ssn FROM users) TO STDOUT", None);
        assert_eq!(
            copy_specs(
                "COPY (SELECT ssn FROM users) TO STDOUT",
                &masker,
                &reads_users
            )
            .unwrap(),
            vec![CopySpec::Query {
                touches: true,
                format: CopyFormat::text(),
                header: false
            }]
        );
        let reads_other = crate::policy::classify("COPY (SELECT a FROM hr.other) TO STDOUT", None);
        assert!(matches!(
            copy_specs(
                "COPY (SELECT a FROM hr.other) TO STDOUT",
                &masker,
                &reads_other
            )
            .unwrap()[..],
            [CopySpec::Query { touches: false, .. }]
        ));
        assert!(matches!(
            copy_specs("COPY users TO STDOUT (FORMAT binary)", &masker, &none).unwrap()[..],
            [CopySpec::Table {
                format: CopyFormat::Binary,
                ..
            }]
        ));
        assert!(copy_specs("COPY users TO STDOUT (FORMAT parquet)", &masker, &none).is_none());
        assert!(copy_specs("COPY (((", &masker, &none).is_none());
        assert!(contains_copy("x; CoPy t to stdout") && !contains_copy("SELECT 1"));
    }
}
