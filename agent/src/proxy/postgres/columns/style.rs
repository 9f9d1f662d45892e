//! What a column rule gives a table's column: a rule on the table, or on the same-named
//! column of its kin (partitions and `INHERITS` children and parents, from the catalog); the
//! planner's statistics, which hold sample values of every table; a stored generated column,
//! as the columns it is computed from. And the kin of the tables a statement names, for
//! rules that restrict by table ([`Tracker::kin`]).

use std::collections::BTreeSet;

use super::Tracker;
use crate::{
    policy::{fold_identifier, MaskStyle, Masker},
    proxy::postgres::catalog::{CatalogError, Catalogs, Table},
};

/// The strongest style a column rule gives `column` of table `t`: a rule on `t` itself, or on
/// the same-named column of a table it inherits from or that inherits from it. A partition's
/// or an `INHERITS` child's rows are its parent's rows (a rule on `users.ssn` covers
/// `SELECT ssn FROM users_2024`), a parent's rows include its children's (a rule on a
/// partition covers reading it through the parent, `ONLY` or not: the rows cannot be told
/// apart), and an inherited column always has its parent's name (the server refuses to rename
/// one in a child).
///
/// The planner's statistics hold sample values of every table's columns: `pg_statistic`'s
/// `stavalues1` to `stavalues5` (shown by `pg_stats` as `most_common_vals`,
/// `histogram_bounds` and `most_common_elems`) and `pg_statistic_ext_data`'s `stxdmcv` and
/// `stxdexpr` (shown by `pg_stats_ext` and `pg_stats_ext_exprs`). Which table's values a row
/// holds is in the row, not in the description, so under a column rule they get its
/// strongest style. A stored generated column is masked as the columns it is computed from.
pub(super) fn table_column_style<'m>(
    masker: &'m Masker<'_>,
    t: &Table,
    column: &str,
) -> Option<&'m MaskStyle> {
    if holds_sampled_values(t, column) {
        return masker.strongest_column_style();
    }
    let own = named_style(masker, t, column);
    let Some(expr) = t.column_named(column).and_then(|c| c.generation.as_deref()) else {
        return own;
    };
    // A stored generated column is computed from columns of its own row (never another
    // generated one): it is masked as they are. An expression that cannot be read: as the
    // strongest.
    let Some(reads) = names_in(expr) else {
        return masker.strongest_column_style();
    };
    reads
        .iter()
        .filter(|name| *name != column && t.column_named(name).is_some())
        .filter_map(|name| named_style(masker, t, name))
        .chain(own)
        .max_by_key(|s| s.strength())
}

/// The strongest style a rule naming `column` of `t` or of its kin gives it.
fn named_style<'m>(masker: &'m Masker<'_>, t: &Table, column: &str) -> Option<&'m MaskStyle> {
    std::iter::once((t.schema.as_str(), t.name.as_str()))
        .chain(t.kin.iter().map(|(s, n)| (s.as_str(), n.as_str())))
        .filter_map(|(schema, table)| masker.column_style(schema, table, column))
        .max_by_key(|s| s.strength())
}

/// The names an expression's text uses, folded as the server folds them; `None` if it
/// cannot be read.
fn names_in(expr: &str) -> Option<Vec<String>> {
    use sqlparser::{
        dialect::PostgreSqlDialect,
        tokenizer::{Token, Tokenizer},
    };
    let tokens = Tokenizer::new(&PostgreSqlDialect {}, expr)
        .tokenize()
        .ok()?;
    Some(
        tokens
            .into_iter()
            .filter_map(|t| match t {
                Token::Word(w) => Some(fold_identifier(&w.value, w.quote_style.is_some())),
                _ => None,
            })
            .collect(),
    )
}

/// Whether `column` of `t` is one of the statistics' sample values ([`table_column_style`]).
fn holds_sampled_values(t: &Table, column: &str) -> bool {
    t.schema == "pg_catalog"
        && match t.name.as_str() {
            "pg_statistic" => column.starts_with("stavalues"),
            "pg_statistic_ext_data" => matches!(column, "stxdmcv" | "stxdexpr"),
            _ => false,
        }
}

impl Tracker {
    /// The kin of the tables `objects` names (`schema.table` or `table`, as the classifier
    /// gives them): what the target's catalog says they inherit from and what inherits from
    /// them, as `schema.table`, less `objects` themselves. Names the catalog lacks (a CTE's,
    /// a table not made yet) have none.
    pub async fn kin(
        &self,
        catalogs: &Catalogs,
        objects: &BTreeSet<String>,
    ) -> Result<BTreeSet<String>, CatalogError> {
        let names: Vec<(Option<String>, String)> = objects
            .iter()
            .map(|o| match o.split_once('.') {
                Some((schema, table)) => (Some(schema.to_string()), table.to_string()),
                None => (None, o.clone()),
            })
            .collect();
        let tables = catalogs.relations_by_names(&self.login, &names).await?;
        Ok(tables
            .iter()
            .flat_map(|t| &t.kin)
            .map(|(schema, table)| format!("{schema}.{table}"))
            .filter(|k| !objects.contains(k))
            .collect())
    }
}
