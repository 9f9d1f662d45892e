//! How a result's rows, or a COPY's, are masked: a [`RowPlan`] per result, worked out at its
//! first row from the masks, the fields' real columns (from the catalog) or the COPY
//! statement, and applied to every row.

use std::{collections::HashMap, sync::Arc};

use bytes::{BufMut as _, Bytes, BytesMut};

use super::lineage::Deps;
use super::{computed::Sources, lineage::Lineage, Results};
use crate::{
    policy::{
        mask::Detectors,
        sql_copy::{CopyFormat, CopySpec},
        MaskStyle, Masker,
    },
    proxy::postgres::{
        catalog::{self, Table},
        codec::{self, CodecError, FieldDescription, Replacement},
        copy_out::{CopyRows, FieldMask},
        state::{Front, Masks},
    },
};

/// How a binary COPY stream starts.
const BINARY_COPY_SIGNATURE: &[u8] = b"PGCOPY\n\xff\r\n\0";
/// Type OIDs whose binary form is their text.
const TEXT_TYPES: [u32; 5] = [25, 1043, 1042, 19, 705];
/// Type OIDs whose binary form is text-like enough to edit in place (json, jsonb's version
/// byte then text, xml).
const TEXT_LIKE_TYPES: [u32; 3] = [114, 3802, 142];

/// One field's treatment in a result.
#[derive(Debug, Clone)]
pub(super) enum FieldAction {
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
pub(super) struct RowPlan {
    pub(super) detectors: Detectors,
    /// `None`: the fields are not described (every value gets `unknown`, or the detectors).
    pub(super) fields: Option<Vec<FieldAction>>,
    pub(super) unknown: Option<MaskStyle>,
    /// Undescribed values are binary (a binary COPY): a detector match cannot be edited in
    /// place, the value is withheld.
    pub(super) binary: bool,
}

impl Results<'_> {
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
                let lineage = self.current_lineage(front);
                self.plan = Some(
                    self.row_plan(masks, fields.as_deref(), lineage.as_deref())
                        .await,
                );
            }
            let Some(plan) = &self.plan else {
                return Ok(None);
            };
            return Ok(plan.apply(body)?.map(|b| codec::data_row(&b)));
        }
        self.mask_copy(masks, body).await
    }

    /// How a result's rows are masked. A field the RowDescription places (table OID and
    /// column) gets its column's rule, or, for a view's column, what the view's definition
    /// reads calls for; a computed field (OID 0) gets what its expression reads calls for
    /// (`lineage`; not analysed: the strongest column style).
    async fn row_plan(
        &self,
        masks: &Masks,
        fields: Option<&[FieldDescription]>,
        lineage: Option<&Lineage>,
    ) -> RowPlan {
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
        let sources = if unknown.is_some() {
            self.sources_for(&masker, fields, lineage, &tables).await
        } else {
            None
        };
        let reads = lineage.and_then(|l| l.fields(fields.len()));
        let reads_of = |i: usize| -> Option<&Deps> {
            let l = lineage?;
            Some(reads.as_ref().and_then(|r| r.get(i)).unwrap_or(&l.all))
        };
        let actions = fields
            .iter()
            .enumerate()
            .map(|(i, f)| {
                let style = if unknown.is_none() {
                    None
                } else if identified(f) {
                    match tables
                        .get(&f.table_oid)
                        .and_then(|t: &Arc<Table>| t.column(f.column).map(|c| (t, c)))
                    {
                        Some((t, c)) if t.definition.is_some() => match &sources {
                            Some(s) => s.view_column_style(t, c.number, 0),
                            None => unknown.clone(),
                        },
                        Some((t, c)) => {
                            super::style::table_column_style(&masker, t, &c.name).cloned()
                        }
                        None => unknown.clone(),
                    }
                } else {
                    match (lineage, reads_of(i)) {
                        (Some(_), Some(d)) if d.is_empty() => None,
                        (Some(l), Some(d)) => match &sources {
                            Some(s) => s.deps_style(d, l),
                            None => unknown.clone(),
                        },
                        _ => unknown.clone(),
                    }
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

    /// What the catalog says of the relations a result's computed fields read and of the
    /// views its fields come from; `None` when no field needs it.
    async fn sources_for<'m>(
        &self,
        masker: &'m Masker<'m>,
        fields: &[FieldDescription],
        lineage: Option<&Lineage>,
        tables: &HashMap<u32, Arc<Table>>,
    ) -> Option<Sources<'m>> {
        let reads = lineage.and_then(|l| l.fields(fields.len()));
        let views: Vec<Arc<Table>> = tables
            .values()
            .filter(|t| t.definition.is_some())
            .cloned()
            .collect();
        let computed_reads = lineage.is_some_and(|l| {
            fields.iter().enumerate().any(|(i, f)| {
                (f.table_oid == 0 || f.column <= 0)
                    && !reads
                        .as_ref()
                        .and_then(|r| r.get(i))
                        .unwrap_or(&l.all)
                        .is_empty()
            })
        });
        if computed_reads || !views.is_empty() {
            Some(self.sources(masker, lineage.as_slice(), &views).await)
        } else {
            None
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
                let lineage = self.copy.as_ref().and_then(|c| c.lineage.clone());
                let Some(lineage) = lineage else {
                    if *touches {
                        self.note(
                            "COPY (query) reads a table a column rule names; every field is masked"
                                .into(),
                        );
                        rows.all = all;
                    }
                    return rows;
                };
                let sources = self.sources(&masker, &[&lineage], &[]).await;
                if let Some(columns) = lineage.columns() {
                    // Each field by what its expression reads; a row of another width is
                    // masked whole.
                    rows.fields = Some(
                        columns
                            .iter()
                            .map(|d| match sources.deps_style(d, &lineage) {
                                Some(s) => FieldMask::Column(s),
                                None => FieldMask::Detect,
                            })
                            .collect(),
                    );
                    rows.all = all;
                } else if *touches
                    || sources
                        .deps_style(&Deps::opaque_reads(), &lineage)
                        .is_some()
                {
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
                                .map(|c| match super::style::table_column_style(&masker, &t, c) {
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
            Some(CopySpec::Query { touches: false, .. }) => {
                // Unless what it reads (a view over a masked table) calls for a mask.
                let lineage = self.copy.as_ref().and_then(|c| c.lineage.clone());
                let sensitive = match &lineage {
                    Some(l) => self
                        .sources(&masker, &[l], &[])
                        .await
                        .deps_style(&Deps::opaque_reads(), l)
                        .is_some(),
                    None => false,
                };
                if !sensitive {
                    plan.unknown = None;
                }
            }
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
                                match super::style::table_column_style(&masker, &t, name) {
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
    pub(super) fn apply(&self, body: &[u8]) -> Result<Option<BytesMut>, CodecError> {
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
