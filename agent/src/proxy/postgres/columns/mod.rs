//! Masking result data by the real column: which table and column each result field comes
//! from, whatever the query called it.
//!
//! A RowDescription names each field's table OID and attribute number; [`catalog`] turns those
//! into schema, table and column on a side connection. A simple query's rows follow their
//! RowDescription; an Execute's rows follow none, so the description comes from an earlier
//! Describe of the portal or of its statement. To know which Describe an answer belongs to, the
//! [`Tracker`] follows the extended-protocol messages in the order the target answers them
//! (Parse, Bind, Describe, Execute, Close, Sync, Query). That costs a lock per message, so it is
//! on only for sessions that start under a policy with column mask rules; the rest pay one
//! `bool` test.
//!
//! A field the RowDescription cannot place (table OID 0: an expression, aggregate, subquery)
//! gets the mask of the table columns its expression reads, from the statement's text
//! ([`lineage`]) and the catalog ([`computed`]); so does a view's column, from the view's
//! definition. An error message that could quote a value is withheld ([`withheld_error`]).
//!
//! Fail closed: under a column rule, a field whose column cannot be identified (the side
//! connection failed, the table is gone, the session did not follow Describes because the
//! rule arrived with a policy reload), or whose expression's reads cannot be told, is masked
//! with the strongest column style, as is every field of a COPY whose columns cannot be
//! attributed (`COPY (query) TO` whose width the text does not fix, reading a table with
//! masked columns).
//!
//! Representation: a text-format value is replaced by the style's text. A binary-format value
//! is replaced by the style's text only for types whose binary form is their text (text,
//! varchar, char(n), name, unknown); any other binary value under a column rule, or one the
//! detectors find something in whose type is not text-like, is sent as NULL: the client gets
//! a well-formed row without the value.
//!
//! - [`track`]: which description describes which rows (the [`Tracker`] of the answers the
//!   target owes, and the descriptions of statements and portals).
//! - [`plan`]: how a result's or a COPY's values are masked, worked out once per result.
//! - [`lineage`]: which table columns each output column of a statement reads (its text,
//!   parsed), for fields the RowDescription cannot place (computed: table OID 0).
//! - [`computed`]: what those reads, and view columns, call for, with the catalog's help.
//! - [`style`]: what a rule gives a table's column: rules on its kin (partitions, `INHERITS`
//!   children and parents), the statistics' sample values, generated columns.

use std::collections::HashMap;
use std::sync::Arc;

use crate::conn_log::warn;
use bytes::Bytes;

pub use self::track::Tracker;
use self::{lineage::Lineage, plan::RowPlan};
use super::{
    catalog::Catalogs,
    codec::{self, FieldDescription},
    copy_out::CopyRows,
    state::Masks,
};
use crate::{
    policy::{sql_copy::CopySpec, PolicySet},
    record::{EventKind, SessionId},
};

mod computed;
mod lineage;
mod plan;
mod style;
#[cfg(test)]
mod tests;
mod track;

/// Whether any rule of the policy masks by column: sessions started under such a policy
/// follow Describes.
pub fn policy_has_column_rules(policy: &PolicySet) -> bool {
    policy.rules.iter().any(|r| match &r.effect {
        crate::policy::Effect::Mask(m) => !m.columns.is_empty(),
        crate::policy::Effect::Verdict(_) => false,
    })
}

fn has_column_rules(masks: &Masks) -> bool {
    masks.iter().any(|m| !m.columns.is_empty())
}

/// SQLSTATE classes whose messages quote neither a value nor a name: connection, transaction
/// state, rollback, resources, program limits, operator intervention.
const ERRORS_WITHOUT_NAMES: [&str; 6] = ["08", "25", "40", "53", "54", "57"];

/// SQLSTATE classes whose messages quote names but no value of their own: feature, statement,
/// authorization, cursor, catalog and schema names, syntax and access, object state. A name can
/// be a value, though: `SELECT ssn::regclass FROM users` fails with `relation "123-45-6789"
/// does not exist` (42P01), and `::regnamespace`, `::regrole`, `::regoper`,
/// `current_setting(ssn)` and `has_table_privilege(ssn, ...)` likewise. So one of these is
/// forwarded only when the statement's own text is what it quotes: it points at a position of
/// the statement (`P`, set only by the parser and the analyser, which read the text and the
/// catalog, never a table's rows) and has no context (`W`: raised within a function, or while
/// parsing a string, as `ssn::regtype` is).
const ERRORS_WITH_NAMES: [&str; 8] = ["0A", "26", "28", "34", "3D", "3F", "42", "55"];

/// An ErrorResponse to a statement under a column rule, with its message withheld when it
/// could quote a value: a failed cast quotes its input (`SELECT ssn::int` would print the
/// masked value), a constraint violation its key, a name looked up at run time the name
/// ([`ERRORS_WITH_NAMES`]). The SQLSTATE is kept; the store keeps the server's own message.
/// `None`: forwarded as it is.
pub fn withheld_error(masks: &Masks, body: &[u8]) -> Option<Bytes> {
    if !has_column_rules(masks) {
        return None;
    }
    let fields = codec::error_fields(body);
    let field = |code: u8| {
        fields
            .iter()
            .find(|(c, _)| *c == code)
            .map(|(_, v)| v.as_str())
    };
    let severity = field(b'V').or_else(|| field(b'S')).unwrap_or("ERROR");
    if severity != "ERROR" {
        return None;
    }
    let code = field(b'C')
        .filter(|c| c.len() == 5 && c.bytes().all(|b| b.is_ascii_alphanumeric()))
        .unwrap_or("XX000");
    let class = |classes: &[&str]| classes.iter().any(|class| code.starts_with(class));
    let from_the_text = field(b'P').is_some() && field(b'W').is_none();
    if class(&ERRORS_WITHOUT_NAMES) || (class(&ERRORS_WITH_NAMES) && from_the_text) {
        return None;
    }
    Some(codec::error_response(
        code,
        &format!(
            "bulkhead: the server's error message is withheld (SQLSTATE {code}): the statement \
             runs under a column mask rule, and the message could quote a masked value"
        ),
    ))
}

/// What a statement or portal is known to return.
#[derive(Debug, Clone, Default)]
struct Described {
    fields: Option<Arc<[FieldDescription]>>,
    copy: Option<Arc<CopySpec>>,
    /// What its output columns read (`None`: not analysed, no column rule applied).
    lineage: Option<Arc<Lineage>>,
}

/// A COPY OUT in progress.
#[derive(Debug)]
struct CopyOut {
    binary: bool,
    /// What its statement says; `None`: not known (not attributable).
    spec: Option<Arc<CopySpec>>,
    /// What its statement's columns read.
    lineage: Option<Arc<Lineage>>,
    rows: Option<CopyRows>,
    binary_plan: Option<RowPlan>,
    binary_started: bool,
}

impl CopyOut {
    fn new(response: &[u8], spec: Option<Arc<CopySpec>>, lineage: Option<Arc<Lineage>>) -> Self {
        Self {
            binary: codec::copy_out_response(response).is_ok_and(|(f, _)| f == 1),
            spec,
            lineage,
            rows: None,
            binary_plan: None,
            binary_started: false,
        }
    }
}

/// The target-to-client side: descriptions and the masking of the result in progress.
pub struct Results<'a> {
    tracker: &'a Tracker,
    catalogs: &'a Catalogs,
    store: &'a dyn crate::record::SessionStore,
    session: SessionId,
    statements: HashMap<String, Described>,
    portals: HashMap<String, Described>,
    /// The latest RowDescription outside a Describe: a simple query's current result.
    query_fields: Option<Arc<[FieldDescription]>>,
    /// What the current simple query's output columns read.
    query_lineage: Option<Arc<Lineage>>,
    plan: Option<RowPlan>,
    copy: Option<CopyOut>,
}

impl<'a> Results<'a> {
    pub fn new(
        tracker: &'a Tracker,
        catalogs: &'a Catalogs,
        store: &'a dyn crate::record::SessionStore,
        session: SessionId,
    ) -> Self {
        Self {
            tracker,
            catalogs,
            store,
            session,
            statements: HashMap::new(),
            portals: HashMap::new(),
            query_fields: None,
            query_lineage: None,
            plan: None,
            copy: None,
        }
    }

    fn note(&self, message: String) {
        warn!(%message, "column masking");
        if let Err(e) = self
            .store
            .append(self.session, EventKind::Error { message })
        {
            warn!(error = %e, "cannot record an event");
        }
    }
}
