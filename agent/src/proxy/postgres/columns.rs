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
//! Fail closed: under a column rule, a field whose column cannot be identified (the side
//! connection failed, the table is gone, the session did not follow Describes because the
//! rule arrived with a policy reload) is masked with the strongest column style, as is every
//! field of a COPY whose columns cannot be attributed (`COPY (query) TO` touching a table a
//! column rule could name).
//!
//! Representation: a text-format value is replaced by the style's text. A binary-format value
//! is replaced by the style's text only for types whose binary form is their text (text,
//! varchar, char(n), name, unknown); any other binary value under a column rule, or one the
//! detectors find something in whose type is not text-like, is sent as NULL: the client gets
//! a well-formed row without the value.

use std::{
    collections::{HashMap, VecDeque},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex, PoisonError,
    },
};

use bytes::{BufMut as _, Bytes, BytesMut};
use tracing::warn;

use super::{
    catalog::{self, Catalogs, Table},
    codec::{self, CodecError, FieldDescription, Replacement},
    copy_out::{CopyRows, FieldMask},
    state::{Front, Masks},
};
use crate::proxy::Gateway;
use crate::{
    policy::{
        mask::Detectors,
        sql_copy::{contains_copy, copy_specs, CopyFormat, CopySpec},
        Classification, MaskStyle, Masker, PolicySet, SqlClass,
    },
    record::{EventKind, SessionId},
};

/// How a binary COPY stream starts.
const BINARY_COPY_SIGNATURE: &[u8] = b"PGCOPY\n\xff\r\n\0";
/// Type OIDs whose binary form is their text.
const TEXT_TYPES: [u32; 5] = [25, 1043, 1042, 19, 705];
/// Type OIDs whose binary form is text-like enough to edit in place (json, jsonb's version
/// byte then text, xml).
const TEXT_LIKE_TYPES: [u32; 3] = [114, 3802, 142];

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

/// An answer the target owes, in order.
#[derive(Debug)]
enum Expect {
    /// A simple query (or the stand-in for a denied one), with its COPY statements if it has
    /// column rules (`None`: not known).
    Query {
        copies: Option<VecDeque<CopySpec>>,
    },
    Parse {
        name: String,
        copy: Option<Arc<CopySpec>>,
    },
    Bind {
        portal: String,
        statement: String,
        formats: Option<Vec<i16>>,
    },
    Describe {
        statement: bool,
        name: String,
    },
    Execute {
        portal: String,
    },
    Close {
        statement: bool,
        name: String,
    },
    Sync,
}

/// Per session, shared by both directions: the answers the target owes.
pub struct Tracker {
    enabled: bool,
    queue: Mutex<VecDeque<Expect>>,
    /// A DDL statement went through: the catalog cache is dropped again when the target is
    /// next idle (its transaction over).
    ddl: AtomicBool,
    login: catalog::Login,
}

impl Tracker {
    pub fn new(enabled: bool, login: catalog::Login) -> Self {
        Self {
            enabled,
            queue: Mutex::new(VecDeque::new()),
            ddl: AtomicBool::new(false),
            login,
        }
    }

    fn push(&self, e: Expect) {
        self.queue
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push_back(e);
    }

    /// A decided statement: DDL makes the database's column names suspect.
    pub fn decided(&self, catalogs: &Catalogs, classification: &Classification) {
        if classification.classes.contains(&SqlClass::Ddl) {
            self.ddl.store(true, Ordering::Relaxed);
            catalogs.invalidate(self.login.addr, &self.login.database);
        }
    }

    /// A simple Query forwarded (the client's or a stand-in), with its masks.
    pub fn query(&self, gw: &Gateway, sql: &str, masks: &Masks) {
        if !self.enabled {
            return;
        }
        let copies = if has_column_rules(masks) && contains_copy(sql) {
            let masker = Masker::new(masks.iter().map(AsRef::as_ref));
            let touched = gw.policy.current().cache().classify(sql, None);
            copy_specs(sql, &masker, &touched).map(VecDeque::from)
        } else {
            Some(VecDeque::new())
        };
        self.push(Expect::Query { copies });
    }

    /// A Parse forwarded as statement `name`.
    pub fn parse(&self, gw: &Gateway, name: &str, sql: &str, masks: &Masks) {
        if !self.enabled {
            return;
        }
        let copy = if has_column_rules(masks) && contains_copy(sql) {
            let masker = Masker::new(masks.iter().map(AsRef::as_ref));
            let touched = gw.policy.current().cache().classify(sql, None);
            match copy_specs(sql, &masker, &touched) {
                Some(mut specs) if specs.len() == 1 => specs.pop().map(Arc::new),
                _ => None,
            }
        } else {
            None
        };
        self.push(Expect::Parse {
            name: name.to_string(),
            copy,
        });
    }

    /// Any other frontend message forwarded (Bind, Describe, Execute, Close, Sync).
    pub fn frontend(&self, tag: u8, body: &[u8]) {
        if !self.enabled {
            return;
        }
        let expect = match tag {
            b'B' => match codec::bind_names(body) {
                Ok((portal, statement)) => Expect::Bind {
                    portal: portal.to_string(),
                    statement: statement.to_string(),
                    formats: codec::bind_result_formats(body).ok(),
                },
                Err(_) => return,
            },
            b'D' | b'C' => match codec::close_target(body) {
                Ok((kind, name)) if tag == b'D' => Expect::Describe {
                    statement: kind == b'S',
                    name: name.to_string(),
                },
                Ok((kind, name)) => Expect::Close {
                    statement: kind == b'S',
                    name: name.to_string(),
                },
                Err(_) => return,
            },
            b'E' => match codec::execute_portal(body) {
                Ok(portal) => Expect::Execute {
                    portal: portal.to_string(),
                },
                Err(_) => return,
            },
            b'S' => Expect::Sync,
            _ => return,
        };
        self.push(expect);
    }
}

/// What a statement or portal is known to return.
#[derive(Debug, Clone, Default)]
struct Described {
    fields: Option<Arc<[FieldDescription]>>,
    copy: Option<Arc<CopySpec>>,
}

/// One field's treatment in a result.
#[derive(Debug, Clone)]
enum FieldAction {
    Detect {
        format: i16,
        type_oid: u32,
    },
    Column {
        style: MaskStyle,
        format: i16,
        type_oid: u32,
    },
}

/// How one result's rows are masked: worked out once, at its first row.
#[derive(Debug)]
struct RowPlan {
    detectors: Detectors,
    /// `None`: the fields are not described (every value gets `unknown`, or the detectors).
    fields: Option<Vec<FieldAction>>,
    unknown: Option<MaskStyle>,
    /// Undescribed values are binary (a binary COPY): a detector match cannot be edited in
    /// place, the value is withheld.
    binary: bool,
}

/// A COPY OUT in progress.
#[derive(Debug)]
struct CopyOut {
    binary: bool,
    /// What its statement says; `None`: not known (not attributable).
    spec: Option<Arc<CopySpec>>,
    rows: Option<CopyRows>,
    binary_plan: Option<RowPlan>,
    binary_started: bool,
}

impl CopyOut {
    fn new(response: &[u8], spec: Option<Arc<CopySpec>>) -> Self {
        Self {
            binary: codec::copy_out_response(response).is_ok_and(|(f, _)| f == 1),
            spec,
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

    /// A backend message on its way to the client. `masked` says whether the request at the
    /// front has masks (asked only for a RowDescription, when the session does not follow
    /// Describes).
    pub fn observe(&mut self, tag: u8, body: &[u8], masked: impl FnOnce() -> bool) {
        match tag {
            b'T' | b'n' | b'1' | b'2' | b'3' | b'C' | b's' | b'I' | b'E' | b'Z' | b'H' => {}
            _ => return,
        }
        if matches!(tag, b'T' | b'C' | b's' | b'I' | b'E' | b'Z' | b'H') {
            self.plan = None;
            self.copy = None;
        }
        if tag == b'Z'
            && self.tracker.ddl.load(Ordering::Relaxed)
            && codec::ready_status(body) == b'I'
        {
            self.tracker.ddl.store(false, Ordering::Relaxed);
            self.catalogs
                .invalidate(self.tracker.login.addr, &self.tracker.login.database);
        }
        if !self.tracker.enabled {
            match tag {
                b'T' => {
                    self.query_fields = if masked() {
                        codec::row_description(body).ok().map(Arc::from)
                    } else {
                        None
                    };
                }
                b'C' | b'I' | b'E' | b'Z' => self.query_fields = None,
                // No COPY statement was looked at: under a column rule, not attributable.
                b'H' => self.copy = Some(CopyOut::new(body, None)),
                _ => {}
            }
            return;
        }
        self.follow(tag, body, masked);
    }

    /// The answer's place in the extended protocol, for a session that follows Describes.
    fn follow(&mut self, tag: u8, body: &[u8], masked: impl FnOnce() -> bool) {
        let tracker = self.tracker;
        let mut queue = tracker.queue.lock().unwrap_or_else(PoisonError::into_inner);
        match tag {
            b'1' => match pop_if(&mut queue, |e| matches!(e, Expect::Parse { .. })) {
                Ok(Expect::Parse { name, copy }) => {
                    self.statements
                        .insert(name, Described { fields: None, copy });
                }
                _ => self.lost(),
            },
            b'2' => match pop_if(&mut queue, |e| matches!(e, Expect::Bind { .. })) {
                Ok(Expect::Bind {
                    portal,
                    statement,
                    formats,
                }) => {
                    let from = self.statements.get(&statement).cloned().unwrap_or_default();
                    let fields = match (from.fields, formats) {
                        (Some(f), Some(formats)) => with_formats(&f, &formats),
                        _ => None,
                    };
                    self.portals.insert(
                        portal,
                        Described {
                            fields,
                            copy: from.copy,
                        },
                    );
                }
                _ => self.lost(),
            },
            b'3' => match pop_if(&mut queue, |e| matches!(e, Expect::Close { .. })) {
                Ok(Expect::Close { statement, name }) => {
                    if statement {
                        self.statements.remove(&name);
                    } else {
                        self.portals.remove(&name);
                    }
                }
                _ => self.lost(),
            },
            b'T' | b'n' => {
                if matches!(queue.front(), Some(Expect::Describe { .. })) {
                    if let Some(Expect::Describe { statement, name }) = queue.pop_front() {
                        let fields: Option<Arc<[FieldDescription]>> = if tag == b'T' {
                            codec::row_description(body).ok().map(Arc::from)
                        } else {
                            Some(Arc::from([]))
                        };
                        let map = if statement {
                            &mut self.statements
                        } else {
                            &mut self.portals
                        };
                        map.entry(name).or_default().fields = fields;
                    }
                } else if tag == b'T' {
                    self.query_fields = if masked() {
                        codec::row_description(body).ok().map(Arc::from)
                    } else {
                        None
                    };
                }
            }
            b'C' | b's' | b'I' => match queue.front() {
                Some(Expect::Query { .. }) => self.query_fields = None,
                Some(Expect::Execute { .. }) => {
                    queue.pop_front();
                }
                _ => {}
            },
            b'E' => {
                self.query_fields = None;
                if !matches!(queue.front(), Some(Expect::Query { .. })) {
                    // An extended-protocol error: the target skips to the next Sync.
                    while matches!(
                        queue.front(),
                        Some(e) if !matches!(e, Expect::Sync | Expect::Query { .. })
                    ) {
                        queue.pop_front();
                    }
                }
            }
            b'Z' => {
                self.query_fields = None;
                if matches!(queue.front(), Some(Expect::Query { .. })) {
                    queue.pop_front();
                } else {
                    while let Some(e) = queue.pop_front() {
                        if matches!(e, Expect::Sync) {
                            break;
                        }
                    }
                }
            }
            b'H' => {
                let spec = match queue.front_mut() {
                    Some(Expect::Query {
                        copies: Some(copies),
                    }) => copies.pop_front().map(Arc::new),
                    Some(Expect::Execute { portal }) => self
                        .portals
                        .get(portal.as_str())
                        .and_then(|d| d.copy.clone()),
                    _ => None,
                };
                self.copy = Some(CopyOut::new(body, spec));
            }
            _ => {}
        }
    }

    /// The answers no longer line up with what was asked: forget every description (what
    /// depends on one is then masked as unknown).
    fn lost(&mut self) {
        warn!("column masking lost track of the extended protocol; descriptions dropped");
        self.statements.clear();
        self.portals.clear();
    }

    /// The fields of the result in progress, if known.
    fn current_fields(&self, front: Front) -> Option<Arc<[FieldDescription]>> {
        match front {
            Front::Query => self.query_fields.clone(),
            Front::Execute => {
                if !self.tracker.enabled {
                    return None;
                }
                let queue = self
                    .tracker
                    .queue
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner);
                match queue.front() {
                    Some(Expect::Execute { portal }) => self
                        .portals
                        .get(portal.as_str())
                        .and_then(|d| d.fields.clone()),
                    _ => None,
                }
            }
        }
    }

    /// A DataRow ('D') or CopyData ('d') with masked values, or `None` if nothing changed.
    pub async fn mask(
        &mut self,
        front: Front,
        masks: &Masks,
        tag: u8,
        body: &[u8],
    ) -> Result<Option<Bytes>, CodecError> {
        if tag == b'D' {
            if self.plan.is_none() {
                let fields = self.current_fields(front);
                self.plan = Some(self.row_plan(masks, fields.as_deref()).await);
            }
            let Some(plan) = &self.plan else {
                return Ok(None);
            };
            return Ok(plan.apply(body)?.map(|b| codec::data_row(&b)));
        }
        self.mask_copy(masks, body).await
    }

    async fn row_plan(&self, masks: &Masks, fields: Option<&[FieldDescription]>) -> RowPlan {
        let masker = Masker::new(masks.iter().map(AsRef::as_ref));
        let detectors = masker.detectors().clone();
        let unknown = masker.strongest_column_style().cloned();
        let Some(fields) = fields else {
            if unknown.is_some() {
                self.note(
                    "a result's columns are not known; every value under a column rule is withheld"
                        .into(),
                );
            }
            return RowPlan {
                detectors,
                fields: None,
                unknown,
                binary: false,
            };
        };
        let identified = |f: &FieldDescription| f.table_oid != 0 && f.column > 0;
        let mut tables = HashMap::new();
        if masker.has_column_rules() {
            let wanted: Vec<(u32, i16)> = fields
                .iter()
                .filter(|f| identified(f))
                .map(|f| (f.table_oid, f.column))
                .collect();
            if !wanted.is_empty() {
                match self
                    .catalogs
                    .tables_by_oid(&self.tracker.login, &wanted)
                    .await
                {
                    Ok(t) => tables = t,
                    Err(e) => self.note(format!(
                        "{e}; values of table columns in this result are masked"
                    )),
                }
            }
        }
        let actions = fields
            .iter()
            .map(|f| {
                let style = if unknown.is_some() && identified(f) {
                    match tables
                        .get(&f.table_oid)
                        .and_then(|t: &Arc<Table>| t.column(f.column).map(|c| (t, c)))
                    {
                        Some((t, c)) => masker.column_style(&t.schema, &t.name, &c.name).cloned(),
                        None => unknown.clone(),
                    }
                } else {
                    None
                };
                match style {
                    Some(style) => FieldAction::Column {
                        style,
                        format: f.format,
                        type_oid: f.type_oid,
                    },
                    None => FieldAction::Detect {
                        format: f.format,
                        type_oid: f.type_oid,
                    },
                }
            })
            .collect();
        RowPlan {
            detectors,
            fields: Some(actions),
            unknown,
            binary: false,
        }
    }

    async fn mask_copy(&mut self, masks: &Masks, data: &[u8]) -> Result<Option<Bytes>, CodecError> {
        let Some(copy) = &self.copy else {
            // COPY data outside a known COPY OUT: the detectors, over the whole message.
            let masker = Masker::new(masks.iter().map(AsRef::as_ref));
            return Ok(mask_whole(masker.detectors(), data));
        };
        if copy.binary {
            return self.mask_binary_copy(masks, data).await;
        }
        if copy.rows.is_none() {
            let rows = self.copy_rows(masks).await;
            if let Some(c) = self.copy.as_mut() {
                c.rows = Some(rows);
            }
        }
        let Some(rows) = self.copy.as_mut().and_then(|c| c.rows.as_mut()) else {
            return Ok(None);
        };
        if rows.fields.is_none() && rows.all.is_none() {
            // Nothing to attribute: the detectors over the whole line, as for any text.
            return Ok(mask_whole(&rows.detectors, data));
        }
        Ok(rows.mask(data).map(|m| codec::copy_data(&m)))
    }

    /// How a text or CSV COPY's fields are masked.
    async fn copy_rows(&self, masks: &Masks) -> CopyRows {
        let masker = Masker::new(masks.iter().map(AsRef::as_ref));
        let detectors = masker.detectors().clone();
        let all = masker.strongest_column_style().cloned();
        let spec = self.copy.as_ref().and_then(|c| c.spec.clone());
        let mut rows = CopyRows {
            format: CopyFormat::text(),
            fields: None,
            all: None,
            detectors,
            header: false,
            misaligned: false,
        };
        if all.is_none() {
            return rows;
        }
        let Some(spec) = spec else {
            // Under a column rule with no idea of the columns or even the format: each whole
            // row is one field, masked.
            self.note("a COPY's columns are not known; its rows are masked whole".into());
            rows.format = CopyFormat::Text {
                delimiter: b'\n',
                null: Vec::new(),
            };
            rows.all = all;
            return rows;
        };
        match spec.as_ref() {
            CopySpec::Query {
                touches,
                format,
                header,
            } => {
                rows.format = format.clone();
                rows.header = *header;
                if *touches {
                    self.note(
                        "COPY (query) reads a table a column rule names; every field is masked"
                            .into(),
                    );
                    rows.all = all;
                }
            }
            CopySpec::Table {
                schema,
                table,
                columns,
                format,
                header,
            } => {
                rows.format = format.clone();
                rows.header = *header;
                rows.all = all;
                match self.table_columns(schema.as_deref(), table, columns).await {
                    Ok(Some((t, cols))) => {
                        rows.fields = Some(
                            cols.iter()
                                .map(|c| match masker.column_style(&t.schema, &t.name, c) {
                                    Some(s) => FieldMask::Column(s.clone()),
                                    None => FieldMask::Detect,
                                })
                                .collect(),
                        );
                    }
                    Ok(None) => {
                        if !masker.may_mask_table(schema.as_deref(), table) {
                            rows.all = None;
                        }
                    }
                    Err(e) => self.note(format!("{e}; every field of this COPY is masked")),
                }
            }
        }
        rows
    }

    /// The table a COPY names and the columns it writes, in order; `Ok(None)` when the name is
    /// ambiguous (several schemas) or unknown.
    async fn table_columns(
        &self,
        schema: Option<&str>,
        table: &str,
        columns: &[String],
    ) -> Result<Option<(Arc<Table>, Vec<String>)>, catalog::CatalogError> {
        let found = self
            .catalogs
            .tables_by_name(&self.tracker.login, schema, table)
            .await?;
        let [t] = found.as_slice() else {
            return Ok(None);
        };
        let cols = if columns.is_empty() {
            t.columns
                .iter()
                .filter(|c| !c.generated)
                .map(|c| c.name.clone())
                .collect()
        } else {
            columns.to_vec()
        };
        Ok(Some((Arc::clone(t), cols)))
    }

    /// Binary COPY: each message is a tuple (the first one after the file header), laid out
    /// like a DataRow.
    async fn mask_binary_copy(
        &mut self,
        masks: &Masks,
        data: &[u8],
    ) -> Result<Option<Bytes>, CodecError> {
        let needs_plan = self.copy.as_ref().is_some_and(|c| c.binary_plan.is_none());
        if needs_plan {
            let plan = self.binary_copy_plan(masks).await;
            if let Some(c) = self.copy.as_mut() {
                c.binary_plan = Some(plan);
            }
        }
        let Some(copy) = self.copy.as_mut() else {
            return Ok(None);
        };
        let Some(plan) = &copy.binary_plan else {
            return Ok(None);
        };
        let mut header_len = 0;
        if !copy.binary_started {
            copy.binary_started = true;
            if !data.starts_with(BINARY_COPY_SIGNATURE) || data.len() < 19 {
                return Err(CodecError::Malformed {
                    what: "binary COPY header",
                });
            }
            let ext = u32::from_be_bytes([data[15], data[16], data[17], data[18]]);
            header_len = 19usize
                .checked_add(usize::try_from(ext).unwrap_or(usize::MAX))
                .filter(|l| *l <= data.len())
                .ok_or(CodecError::Malformed {
                    what: "binary COPY header",
                })?;
        }
        let tuple = &data[header_len..];
        if tuple.is_empty() || tuple == b"\xff\xff" {
            return Ok(None);
        }
        match plan.apply(tuple)? {
            None => Ok(None),
            Some(masked) => {
                let mut out = BytesMut::with_capacity(header_len + masked.len());
                out.put_slice(&data[..header_len]);
                out.put_slice(&masked);
                Ok(Some(codec::copy_data(&out)))
            }
        }
    }

    async fn binary_copy_plan(&self, masks: &Masks) -> RowPlan {
        let masker = Masker::new(masks.iter().map(AsRef::as_ref));
        let detectors = masker.detectors().clone();
        let unknown = masker.strongest_column_style().cloned();
        let spec = self.copy.as_ref().and_then(|c| c.spec.clone());
        let mut plan = RowPlan {
            detectors,
            fields: None,
            unknown: unknown.clone(),
            binary: true,
        };
        if unknown.is_none() {
            return plan;
        }
        match spec.as_deref() {
            Some(CopySpec::Query { touches: false, .. }) => plan.unknown = None,
            Some(CopySpec::Table {
                schema,
                table,
                columns,
                ..
            }) => match self.table_columns(schema.as_deref(), table, columns).await {
                Ok(Some((t, cols))) => {
                    plan.fields = Some(
                        cols.iter()
                            .map(|name| {
                                let type_oid = t
                                    .columns
                                    .iter()
                                    .find(|c| &c.name == name)
                                    .map_or(0, |c| c.type_oid);
                                match masker.column_style(&t.schema, &t.name, name) {
                                    Some(s) => FieldAction::Column {
                                        style: s.clone(),
                                        format: 1,
                                        type_oid,
                                    },
                                    None => FieldAction::Detect {
                                        format: 1,
                                        type_oid,
                                    },
                                }
                            })
                            .collect(),
                    );
                }
                Ok(None) if !masker.may_mask_table(schema.as_deref(), table) => plan.unknown = None,
                Ok(None) => {}
                Err(e) => self.note(format!("{e}; every field of this COPY is withheld")),
            },
            _ => self.note("a binary COPY's columns are not known; every field is withheld".into()),
        }
        plan
    }
}

/// The front answer if it is the one wanted; `Err` when out of step (after dropping what
/// was expected before the wanted one, if it is there at all).
fn pop_if(queue: &mut VecDeque<Expect>, want: impl Fn(&Expect) -> bool) -> Result<Expect, ()> {
    if queue.front().is_some_and(&want) {
        return queue.pop_front().ok_or(());
    }
    if let Some(at) = queue.iter().position(&want) {
        queue.drain(..=at);
    }
    Err(())
}

/// A statement's fields with the formats a Bind asked for (none: text; one: all alike).
fn with_formats(fields: &[FieldDescription], formats: &[i16]) -> Option<Arc<[FieldDescription]>> {
    let format_of = |i: usize| match formats {
        [] => Some(0),
        [one] => Some(*one),
        many => many.get(i).copied(),
    };
    if formats.len() > 1 && formats.len() != fields.len() {
        return None;
    }
    fields
        .iter()
        .enumerate()
        .map(|(i, f)| {
            Some(FieldDescription {
                format: format_of(i)?,
                ..f.clone()
            })
        })
        .collect::<Option<Vec<_>>>()
        .map(Arc::from)
}

/// The detectors over a whole message, if it is text.
fn mask_whole(detectors: &Detectors, data: &[u8]) -> Option<Bytes> {
    let text = std::str::from_utf8(data).ok()?;
    match detectors.mask_text(text) {
        std::borrow::Cow::Borrowed(_) => None,
        std::borrow::Cow::Owned(m) => Some(codec::copy_data(m.as_bytes())),
    }
}

impl RowPlan {
    /// A row body (DataRow or binary COPY tuple) with masked values, if any changed.
    fn apply(&self, body: &[u8]) -> Result<Option<BytesMut>, CodecError> {
        codec::rewrite_row_body(body, |i, value| match self.fields.as_ref() {
            Some(fields) => match fields.get(i) {
                Some(action) => self.field(action, value),
                // More values than described: not attributable.
                None => self.unattributed(value),
            },
            None => self.unattributed(value),
        })
    }

    fn unattributed(&self, value: &[u8]) -> Option<Replacement> {
        if self.unknown.is_some() {
            return Some(Replacement::Null);
        }
        let text = std::str::from_utf8(value).ok()?;
        match self.detectors.mask_text(text) {
            std::borrow::Cow::Borrowed(_) => None,
            std::borrow::Cow::Owned(_) if self.binary => Some(Replacement::Null),
            std::borrow::Cow::Owned(m) => Some(Replacement::Value(m.into_bytes())),
        }
    }

    fn field(&self, action: &FieldAction, value: &[u8]) -> Option<Replacement> {
        match action {
            FieldAction::Column {
                style,
                format,
                type_oid,
            } => Some(
                if *format == 0 || (*format == 1 && TEXT_TYPES.contains(type_oid)) {
                    Replacement::Value(style.apply(&String::from_utf8_lossy(value)).into_bytes())
                } else {
                    Replacement::Null
                },
            ),
            FieldAction::Detect { format, type_oid } => {
                if self.detectors.is_empty() {
                    return None;
                }
                let text = std::str::from_utf8(value).ok()?;
                match self.detectors.mask_text(text) {
                    std::borrow::Cow::Borrowed(_) => None,
                    std::borrow::Cow::Owned(m) => Some(
                        if *format == 0
                            || TEXT_TYPES.contains(type_oid)
                            || TEXT_LIKE_TYPES.contains(type_oid)
                        {
                            Replacement::Value(m.into_bytes())
                        } else {
                            Replacement::Null
                        },
                    ),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use super::*;
    use crate::{
        config::PostgresTarget,
        net::OrigDstAddr,
        policy::{
            mask::{ColumnPattern, Detector},
            MaskRule,
        },
        record::SledStore,
    };

    fn rule(columns: &[&str], detectors: &[Detector], style: MaskStyle) -> Arc<MaskRule> {
        Arc::new(MaskRule {
            rule: "r".into(),
            columns: columns
                .iter()
                .map(|c| ColumnPattern::new(c).unwrap())
                .collect(),
            detectors: detectors.to_vec(),
            style,
        })
    }

    fn masks() -> Masks {
        Arc::from([
            rule(&["public.users.ssn"], &[], MaskStyle::Redact),
            rule(&[], &[Detector::Email], MaskStyle::Redact),
        ])
    }

    fn field(table_oid: u32, column: i16, type_oid: u32, format: i16) -> FieldDescription {
        FieldDescription {
            name: "alias".into(),
            table_oid,
            column,
            type_oid,
            type_len: -1,
            type_mod: -1,
            format,
        }
    }

    fn row(values: &[Option<&[u8]>]) -> Vec<u8> {
        codec::data_row_body(values).to_vec()
    }

    fn values(body: &[u8]) -> Vec<Option<Vec<u8>>> {
        codec::data_row_values(body)
            .unwrap()
            .into_iter()
            .map(|v| v.map(<[u8]>::to_vec))
            .collect()
    }

    fn masker_of(m: &Masks) -> Masker<'_> {
        Masker::new(m.iter().map(AsRef::as_ref))
    }

    #[test]
    fn plans_mask_named_columns_whole_and_the_rest_by_detectors() {
        let m = masks();
        let masker = masker_of(&m);
        let plan = RowPlan {
            detectors: masker.detectors().clone(),
            fields: Some(vec![
                FieldAction::Column {
                    style: MaskStyle::Redact,
                    format: 0,
                    type_oid: 25,
                },
                FieldAction::Detect {
                    format: 0,
                    type_oid: 25,
                },
                FieldAction::Column {
                    style: MaskStyle::Redact,
                    format: 1,
                    type_oid: 25,
                },
                FieldAction::Column {
                    style: MaskStyle::Redact,
                    format: 1,
                    type_oid: 23,
                },
                FieldAction::Detect {
                    format: 1,
                    type_oid: 1009,
                },
                FieldAction::Detect {
                    format: 1,
                    type_oid: 25,
                },
            ]),
            unknown: Some(MaskStyle::Redact),
            binary: false,
        };
        let body = row(&[
            Some(b"123-45-6789"),
            Some(b"mail bob@example.com"),
            Some(b"123-45-6789"),
            Some(&[0, 0, 0, 7]),
            Some(b"\x00\x00\x00\x01bob@example.com"),
            Some(b"bob@example.com"),
        ]);
        let out = plan.apply(&body).unwrap().unwrap();
        assert_eq!(
            values(&out),
            vec![
                Some(b"[redacted]".to_vec()),
                Some(b"mail [redacted]".to_vec()),
                Some(b"[redacted]".to_vec()),
                None,
                None,
                Some(b"[redacted]".to_vec()),
            ],
            "binary text gets the text; other binary values become NULL"
        );
        let clean = row(&[None, Some(b"plain"), None, None, None, Some(b"x")]);
        assert!(
            plan.apply(&clean).unwrap().is_none(),
            "unchanged rows pass as they are"
        );
        // More values than described: not attributable, withheld.
        let extra = row(&[None, None, None, None, None, None, Some(b"?")]);
        assert_eq!(values(&plan.apply(&extra).unwrap().unwrap())[6], None);
    }

    #[test]
    fn bind_formats_apply_to_a_statement_description() {
        let fields = [field(1, 1, 25, 0), field(0, 0, 23, 0)];
        let all_binary = with_formats(&fields, &[1]).unwrap();
        assert!(all_binary.iter().all(|f| f.format == 1));
        let each = with_formats(&fields, &[0, 1]).unwrap();
        assert_eq!((each[0].format, each[1].format), (0, 1));
        assert!(with_formats(&fields, &[])
            .unwrap()
            .iter()
            .all(|f| f.format == 0));
        assert!(with_formats(&fields, &[0, 1, 1]).is_none());
    }

    fn tracker(enabled: bool) -> Tracker {
        // Port 1 on loopback: nothing listens, so a catalog lookup fails at once.
        let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
        Tracker::new(
            enabled,
            catalog::Login {
                addr: OrigDstAddr(addr),
                pg: PostgresTarget::default(),
                user: "u".into(),
                database: "d".into(),
                password: None,
            },
        )
    }

    fn description(fields: &[FieldDescription]) -> Vec<u8> {
        let mut b = BytesMut::new();
        b.put_i16(i16::try_from(fields.len()).unwrap());
        for f in fields {
            b.put_slice(f.name.as_bytes());
            b.put_u8(0);
            b.put_u32(f.table_oid);
            b.put_i16(f.column);
            b.put_u32(f.type_oid);
            b.put_i16(f.type_len);
            b.put_i32(f.type_mod);
            b.put_i16(f.format);
        }
        b.to_vec()
    }

    fn frontend(t: &Tracker, tag: u8, parts: &[&[u8]]) {
        t.frontend(tag, &parts.concat());
    }

    #[tokio::test]
    async fn an_execute_uses_the_description_of_its_statement_with_its_bind_formats() {
        let t = tracker(true);
        let catalogs = Catalogs::default();
        let store = SledStore::temporary().unwrap();
        let mut r = Results::new(&t, &catalogs, &store, SessionId(1));
        let m = masks();
        let fields = [field(0, 0, 25, 0), field(0, 0, 23, 0)];

        // Prepare: Parse s1, Describe S s1, Sync (tokio-postgres' prepare).
        t.push(Expect::Parse {
            name: "s1".into(),
            copy: None,
        });
        frontend(&t, b'D', &[b"S", b"s1\0"]);
        frontend(&t, b'S', &[]);
        for (tag, body) in [
            (b'1', vec![]),
            (b't', vec![0, 0]),
            (b'T', description(&fields)),
            (b'Z', vec![b'I']),
        ] {
            r.observe(tag, &body, || true);
        }
        assert!(t.queue.lock().unwrap().is_empty());

        // Later, in another round trip: Bind (binary results), Execute, Sync.
        let mut bind = BytesMut::new();
        bind.put_slice(b"\0s1\0");
        bind.put_i16(0);
        bind.put_i16(0);
        bind.put_i16(1);
        bind.put_i16(1);
        t.frontend(b'B', &bind);
        frontend(&t, b'E', &[b"\0", &[0, 0, 0, 0]]);
        frontend(&t, b'S', &[]);
        r.observe(b'2', &[], || true);
        let got = r.current_fields(Front::Execute).unwrap();
        assert_eq!(got.len(), 2);
        assert!(got.iter().all(|f| f.format == 1), "formats from the Bind");
        let body = row(&[Some(b"bob@example.com"), Some(&[0, 0, 0, 1])]);
        let out = r
            .mask(Front::Execute, &m, b'D', &body)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(values(&out[5..])[0], Some(b"[redacted]".to_vec()));
        assert_eq!(values(&out[5..])[1], Some(vec![0, 0, 0, 1]));
        r.observe(b'C', b"SELECT 1\0", || true);
        r.observe(b'Z', b"I", || true);
        assert!(t.queue.lock().unwrap().is_empty());

        // An error skips to the Sync: what was queued after it is dropped with it.
        t.push(Expect::Parse {
            name: String::new(),
            copy: None,
        });
        t.frontend(b'B', b"\0\0\0\0\0\0\0\0");
        frontend(&t, b'E', &[b"\0", &[0, 0, 0, 0]]);
        frontend(&t, b'S', &[]);
        r.observe(b'E', b"\0", || true);
        assert_eq!(t.queue.lock().unwrap().len(), 1);
        r.observe(b'Z', b"I", || true);
        assert!(t.queue.lock().unwrap().is_empty());
        assert!(
            r.current_fields(Front::Execute).is_none(),
            "no Execute in flight"
        );
    }

    #[tokio::test]
    async fn unknown_columns_under_a_column_rule_are_withheld() {
        let t = tracker(false);
        let catalogs = Catalogs::default();
        let store = SledStore::temporary().unwrap();
        let mut r = Results::new(&t, &catalogs, &store, SessionId(1));
        let m = masks();
        // An Execute whose description the session did not follow: every value withheld.
        let body = row(&[Some(b"x"), None]);
        let out = r
            .mask(Front::Execute, &m, b'D', &body)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(values(&out[5..]), vec![None, None]);

        // A simple query whose table column cannot be looked up (the side connection fails):
        // that column is masked, the expression is only scanned.
        r.observe(b'C', b"SELECT 1\0", || true);
        r.observe(
            b'T',
            &description(&[field(16384, 2, 25, 0), field(0, 0, 25, 0)]),
            || true,
        );
        let body = row(&[Some(b"123-45-6789"), Some(b"plain")]);
        let out = r
            .mask(Front::Query, &m, b'D', &body)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            values(&out[5..]),
            vec![Some(b"[redacted]".to_vec()), Some(b"plain".to_vec())]
        );
        // Detector-only masks never ask the catalog: the table column is only scanned.
        let detectors_only: Masks = Arc::from([rule(&[], &[Detector::Email], MaskStyle::Redact)]);
        r.observe(b'T', &description(&[field(16384, 2, 25, 0)]), || true);
        let body = row(&[Some(b"123-45-6789")]);
        assert!(r
            .mask(Front::Query, &detectors_only, b'D', &body)
            .await
            .unwrap()
            .is_none());
    }
}
