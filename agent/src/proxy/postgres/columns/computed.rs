//! The masks of result fields a RowDescription cannot place (computed: table OID 0) and of
//! view columns: from what the statement's [`Lineage`] says they read, and what the catalog
//! says those relations are. A view's columns read what its definition's do (read again from
//! `pg_get_viewdef`, through views of views up to [`MAX_VIEW_DEPTH`]).
//!
//! Fail closed: a relation the catalog could not be asked about, a view nested deeper than
//! the limit or whose definition cannot be read, and an `opaque` read in a statement whose
//! relations are not all known get the strongest column style.

use std::{
    collections::{BTreeSet, HashMap},
    sync::Arc,
};

use super::{
    lineage::{self, Deps, Lineage, RelName},
    Results,
};
use crate::{
    policy::{MaskStyle, Masker},
    proxy::postgres::catalog::Table,
};

/// Views of views followed; deeper ones are masked whole.
const MAX_VIEW_DEPTH: usize = 4;

/// What the catalog says of the relations some lineages name.
pub(super) struct Sources<'m> {
    masker: &'m Masker<'m>,
    strongest: MaskStyle,
    /// By the name a statement or view definition used; `None`: not looked up (the catalog
    /// failed, or too deep).
    by_name: HashMap<RelName, Option<Vec<Arc<Table>>>>,
    /// The lineage of each view's definition, by OID.
    views: HashMap<u32, Lineage>,
}

fn stronger(a: Option<MaskStyle>, b: Option<MaskStyle>) -> Option<MaskStyle> {
    match (a, b) {
        (Some(a), Some(b)) => Some(if b.strength() > a.strength() { b } else { a }),
        (a, b) => a.or(b),
    }
}

impl Sources<'_> {
    /// What a field reads, as a mask style (`None`: not masked by a column rule).
    pub(super) fn deps_style(&self, deps: &Deps, of: &Lineage) -> Option<MaskStyle> {
        self.deps_style_at(deps, of, 0)
    }

    fn deps_style_at(&self, deps: &Deps, of: &Lineage, depth: usize) -> Option<MaskStyle> {
        if depth > MAX_VIEW_DEPTH {
            return Some(self.strongest.clone());
        }
        let mut style = None;
        for (rel, column) in &deps.columns {
            style = stronger(style, self.column_style(rel, column, depth));
        }
        for rel in &deps.rows {
            style = stronger(style, self.row_style(rel, depth));
        }
        if deps.opaque {
            if !of.complete {
                return Some(self.strongest.clone());
            }
            for rel in &of.relations {
                style = stronger(style, self.row_style(rel, depth));
            }
        }
        style
    }

    fn column_style(&self, rel: &RelName, column: &str, depth: usize) -> Option<MaskStyle> {
        match self.by_name.get(rel) {
            Some(Some(tables)) if tables.is_empty() => self
                .masker
                .column_style_maybe(rel.schema.as_deref(), &rel.name, column)
                .cloned(),
            Some(Some(tables)) => tables.iter().fold(None, |s, t| {
                stronger(s, self.table_column_style(t, column, depth))
            }),
            _ => Some(self.strongest.clone()),
        }
    }

    fn row_style(&self, rel: &RelName, depth: usize) -> Option<MaskStyle> {
        match self.by_name.get(rel) {
            Some(Some(tables)) if tables.is_empty() => self
                .masker
                .may_mask_table(rel.schema.as_deref(), &rel.name)
                .then(|| self.strongest.clone()),
            Some(Some(tables)) => tables.iter().fold(None, |s, t| {
                t.columns.iter().fold(s, |s, c| {
                    stronger(s, self.table_column_style(t, &c.name, depth))
                })
            }),
            _ => Some(self.strongest.clone()),
        }
    }

    fn table_column_style(&self, t: &Table, column: &str, depth: usize) -> Option<MaskStyle> {
        if t.definition.is_none() {
            return super::style::table_column_style(self.masker, t, column).cloned();
        }
        match t.column_named(column) {
            Some(c) => self.view_column_style(t, c.number, depth),
            // Not a column of the view (a composite's field?): whatever the view reads.
            None => t.columns.iter().fold(None, |s, c| {
                stronger(s, self.view_column_style(t, c.number, depth))
            }),
        }
    }

    /// The style of column `number` of a view, from its definition.
    pub(super) fn view_column_style(
        &self,
        view: &Table,
        number: i16,
        depth: usize,
    ) -> Option<MaskStyle> {
        let Some(of) = self.views.get(&view.oid) else {
            return Some(self.strongest.clone());
        };
        let at = view.columns.iter().position(|c| c.number == number);
        let deps = match (of.fields(view.columns.len()), at) {
            (Some(fields), Some(at)) => fields.into_iter().nth(at),
            _ => None,
        };
        match deps {
            Some(d) => self.deps_style_at(&d, of, depth + 1),
            None => self.deps_style_at(&of.all, of, depth + 1),
        }
    }
}

/// What a view's columns read, from its definition. A function in it that is not a vetted
/// built-in may read any table (its body is not looked into): then every column of the view
/// is masked under a column rule.
fn view_lineage(definition: &str) -> Lineage {
    let mut of = lineage::analyze(definition);
    let classified = crate::policy::sql::classify(definition, None);
    if !classified.unknown_functions.is_empty() || !classified.objects_complete {
        of.mark_incomplete();
    }
    of
}

impl Results<'_> {
    /// Looks up the relations `lineages` name and the views `views` are (and, through view
    /// definitions, what they read). Never fails: what could not be looked up is masked.
    pub(super) async fn sources<'m>(
        &self,
        masker: &'m Masker<'m>,
        lineages: &[&Lineage],
        views: &[Arc<Table>],
    ) -> Sources<'m> {
        let mut sources = Sources {
            masker,
            strongest: masker
                .strongest_column_style()
                .cloned()
                .unwrap_or(MaskStyle::Redact),
            by_name: HashMap::new(),
            views: HashMap::new(),
        };
        let mut wanted: BTreeSet<RelName> = lineages.iter().flat_map(|l| l.names()).collect();
        let mut new_views: Vec<Arc<Table>> = views.to_vec();
        for _ in 0..=MAX_VIEW_DEPTH {
            for v in new_views.drain(..) {
                if sources.views.contains_key(&v.oid) {
                    continue;
                }
                let of = v
                    .definition
                    .as_deref()
                    .map_or_else(Lineage::unknown, view_lineage);
                wanted.extend(of.names());
                sources.views.insert(v.oid, of);
            }
            wanted.retain(|n| !sources.by_name.contains_key(n));
            if wanted.is_empty() {
                break;
            }
            let names: Vec<(Option<String>, String)> = wanted
                .iter()
                .map(|n| (n.schema.clone(), n.name.clone()))
                .collect();
            match self
                .catalogs
                .relations_by_names(&self.tracker.login, &names)
                .await
            {
                Ok(found) => {
                    for n in std::mem::take(&mut wanted) {
                        let tables: Vec<Arc<Table>> = found
                            .iter()
                            .filter(|t| {
                                t.name == n.name && n.schema.as_ref().is_none_or(|s| *s == t.schema)
                            })
                            .cloned()
                            .collect();
                        new_views.extend(tables.iter().filter(|t| t.definition.is_some()).cloned());
                        sources.by_name.insert(n, Some(tables));
                    }
                }
                Err(e) => {
                    self.note(format!(
                        "{e}; computed values in this result that read tables are masked"
                    ));
                    for n in std::mem::take(&mut wanted) {
                        sources.by_name.insert(n, None);
                    }
                    break;
                }
            }
        }
        sources
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{policy::MaskRule, proxy::postgres::catalog::Column};

    fn table(oid: u32, name: &str, columns: &[&str], definition: Option<&str>) -> Arc<Table> {
        Arc::new(Table {
            oid,
            schema: "public".into(),
            name: name.into(),
            columns: columns
                .iter()
                .zip(1..)
                .map(|(c, number)| Column {
                    number,
                    name: (*c).into(),
                    type_oid: 25,
                    generated: false,
                    generation: None,
                })
                .collect(),
            definition: definition.map(str::to_string),
            kin: Vec::new(),
        })
    }

    fn rel(name: &str) -> RelName {
        RelName {
            schema: None,
            name: name.into(),
        }
    }

    /// Sources as the catalog would fill them: users(id, name, ssn), other(id, ssn), a view
    /// over users, a view over that view, a view over `other`.
    fn sources<'m>(masker: &'m Masker<'m>) -> Sources<'m> {
        let users = table(1, "users", &["id", "name", "ssn"], None);
        let other = table(2, "other", &["id", "ssn"], None);
        let v = table(
            3,
            "v",
            &["id", "s", "n"],
            Some(" SELECT users.id, upper(users.ssn) AS s, users.name AS n FROM users;"),
        );
        let vv = table(4, "vv", &["s"], Some(" SELECT v.s FROM v;"));
        let vo = table(5, "vo", &["ssn"], Some(" SELECT other.ssn FROM other;"));
        let mut s = Sources {
            masker,
            strongest: MaskStyle::Redact,
            by_name: HashMap::new(),
            views: HashMap::new(),
        };
        for t in [&users, &other, &v, &vv, &vo] {
            s.by_name.insert(rel(&t.name), Some(vec![Arc::clone(t)]));
            if let Some(d) = &t.definition {
                s.views.insert(t.oid, lineage::analyze(d));
            }
        }
        s.by_name.insert(rel("ghost"), Some(Vec::new()));
        s.by_name.insert(rel("unasked"), None);
        s
    }

    fn style_of(s: &Sources<'_>, sql: &str) -> Vec<Option<MaskStyle>> {
        let l = lineage::analyze(sql);
        let fields = l.columns().expect("aligned");
        fields.iter().map(|d| s.deps_style(d, &l)).collect()
    }

    #[test]
    fn a_view_that_calls_a_function_the_gateway_does_not_know_reads_anything() {
        let plain = view_lineage(" SELECT users.id, upper(users.name) AS n FROM users;");
        assert!(plain.complete);
        let opaque = view_lineage(" SELECT leak() AS x, 1 AS one;");
        assert!(!opaque.complete && opaque.fields(2).unwrap().iter().all(|d| d.opaque));
    }

    #[test]
    fn computed_fields_get_the_style_of_what_they_read() {
        let rule = MaskRule::for_test(&["public.users.ssn"], &[], MaskStyle::KeepLast(2));
        let masker = Masker::new([&rule]);
        let s = sources(&masker);
        let keep = Some(MaskStyle::KeepLast(2));
        assert_eq!(
            style_of(&s, "SELECT upper(ssn), upper(name), 1 FROM users"),
            [keep.clone(), None, None]
        );
        assert_eq!(
            style_of(&s, "SELECT upper(ssn) FROM other"),
            [None],
            "another table's column of the same name"
        );
        assert_eq!(
            style_of(&s, "SELECT row_to_json(u) FROM users u"),
            vec![keep.clone()]
        );
        assert_eq!(style_of(&s, "SELECT row_to_json(o) FROM other o"), [None]);
        // Views, and a view of a view, by what their definitions read.
        assert_eq!(
            style_of(&s, "SELECT s || '', n || '', id + 1 FROM v"),
            [keep.clone(), None, None]
        );
        assert_eq!(style_of(&s, "SELECT lower(s) FROM vv"), vec![keep.clone()]);
        assert_eq!(style_of(&s, "SELECT lower(ssn) FROM vo"), [None]);
        let v = s.by_name[&rel("v")].as_ref().unwrap()[0].clone();
        assert_eq!(s.view_column_style(&v, 2, 0), keep);
        assert_eq!(s.view_column_style(&v, 3, 0), None);
        // A name the catalog lacks: by the rule's patterns; one not looked up: masked.
        assert_eq!(style_of(&s, "SELECT upper(ssn) FROM ghost"), [None]);
        assert_eq!(
            style_of(&s, "SELECT upper(x) FROM unasked"),
            [Some(MaskStyle::Redact)]
        );
        // Opaque reads: by the statement's relations; unknown ones mask.
        let l = lineage::analyze("SELECT upper(name) FROM users");
        assert_eq!(s.deps_style(&Deps::opaque_reads(), &l), keep);
        let l = lineage::analyze("SELECT upper(ssn) FROM other");
        assert_eq!(s.deps_style(&Deps::opaque_reads(), &l), None);
        let mut l = lineage::analyze("SELECT upper(ssn) FROM other");
        l.mark_incomplete();
        assert_eq!(
            s.deps_style(&l.columns().unwrap()[0], &l),
            Some(MaskStyle::Redact)
        );
    }
}
