//! Which RowDescription describes which rows. A simple query's rows follow their own; an
//! Execute's follow none, so its description comes from an earlier Describe of its portal, or
//! of its statement with the Bind's result formats. The [`Tracker`] queues what the client
//! asked for (Parse, Bind, Describe, Execute, Close, Sync, Query) and [`Results`] matches
//! each answer to its request in the order the target gives them (skipping to the Sync after
//! an error); an answer out of step drops every description (what needs one is then masked
//! as unknown).

use std::{
    collections::{HashMap, VecDeque},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex, PoisonError,
    },
};

use crate::conn_log::warn;

use super::{
    has_column_rules,
    lineage::{self, Lineage},
    CopyOut, Described, Results,
};
use crate::{
    policy::{
        sql_copy::{contains_copy, copy_specs, CopySpec},
        Classification, Masker, SqlClass,
    },
    proxy::{
        postgres::{
            catalog::{self, Catalogs},
            codec::{self, FieldDescription},
            state::{Front, Masks},
        },
        session::Gateway,
    },
};

/// An answer the target owes, in order.
#[derive(Debug)]
pub(super) enum Expect {
    /// A simple query (or the stand-in for a denied one), with its COPY statements if it has
    /// column rules (`None`: not known).
    Query {
        copies: Option<VecDeque<CopySpec>>,
        lineage: Option<Arc<Lineage>>,
    },
    Parse {
        name: String,
        copy: Option<Arc<CopySpec>>,
        lineage: Option<Arc<Lineage>>,
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
    pub(super) queue: Mutex<VecDeque<Expect>>,
    /// A DDL statement went through: the catalog cache is dropped again when the target is
    /// next idle (its transaction over).
    ddl: AtomicBool,
    pub(super) login: catalog::Login,
    /// Lineages of this session's recent statements, by their exact text (a statement run
    /// again is not parsed again). Bounded: short statements only, cleared when full.
    lineages: Mutex<HashMap<String, Arc<Lineage>>>,
}

/// Statements longer than this are analysed every time.
const CACHED_SQL_LEN: usize = 4096;
/// Lineages kept per session.
const CACHED_LINEAGES: usize = 256;

impl Tracker {
    pub fn new(enabled: bool, login: catalog::Login) -> Self {
        Self {
            enabled,
            queue: Mutex::new(VecDeque::new()),
            ddl: AtomicBool::new(false),
            login,
            lineages: Mutex::new(HashMap::new()),
        }
    }

    /// What a statement's output columns read, when a column rule applies to it. A call to
    /// a function that is not a vetted built-in, or a part the classifier could not see into,
    /// may read any table: then every computed column is masked.
    fn lineage_of(&self, gw: &Gateway, sql: &str, masks: &Masks) -> Option<Arc<Lineage>> {
        if !has_column_rules(masks) {
            return None;
        }
        let cacheable = sql.len() <= CACHED_SQL_LEN;
        if cacheable {
            let cache = self.lineages.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(l) = cache.get(sql) {
                return Some(Arc::clone(l));
            }
        }
        let mut lineage = lineage::analyze(sql);
        let classified = gw.policy.current().cache().classify(sql, None);
        if !classified.unknown_functions.is_empty() || !classified.objects_complete {
            lineage.mark_incomplete();
        }
        let lineage = Arc::new(lineage);
        if cacheable {
            let mut cache = self.lineages.lock().unwrap_or_else(PoisonError::into_inner);
            if cache.len() >= CACHED_LINEAGES {
                cache.clear();
            }
            cache.insert(sql.to_string(), Arc::clone(&lineage));
        }
        Some(lineage)
    }

    pub(super) fn push(&self, e: Expect) {
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
        let lineage = self.lineage_of(gw, sql, masks);
        self.push(Expect::Query { copies, lineage });
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
            lineage: self.lineage_of(gw, sql, masks),
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

#[cfg(any(test, feature = "fuzzing"))]
impl Tracker {
    /// A simple Query or a Parse forwarded, as [`Tracker::query`] and [`Tracker::parse`]
    /// record them when there is no COPY to look at (for tests without a gateway).
    pub fn forwarded_without_copy(&self, tag: u8, name: &str) {
        self.push(if tag == b'Q' {
            Expect::Query {
                copies: Some(VecDeque::new()),
                lineage: None,
            }
        } else {
            Expect::Parse {
                name: name.to_string(),
                copy: None,
                lineage: None,
            }
        });
    }

    /// The answers expected, in order, by their frontend tags.
    pub fn expects(&self) -> Vec<u8> {
        let queue = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
        queue
            .iter()
            .map(|e| match e {
                Expect::Query { .. } => b'Q',
                Expect::Parse { .. } => b'P',
                Expect::Bind { .. } => b'B',
                Expect::Describe { .. } => b'D',
                Expect::Execute { .. } => b'E',
                Expect::Close { .. } => b'C',
                Expect::Sync => b'S',
            })
            .collect()
    }
}

impl Results<'_> {
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
                b'T' => self.query_description(body, masked),
                b'C' | b'I' | b'E' | b'Z' => self.query_fields = None,
                // No COPY statement was looked at: under a column rule, not attributable.
                b'H' => self.copy = Some(CopyOut::new(body, None, None)),
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
                Ok(Expect::Parse {
                    name,
                    copy,
                    lineage,
                }) => {
                    self.statements.insert(
                        name,
                        Described {
                            fields: None,
                            copy,
                            lineage,
                        },
                    );
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
                            lineage: from.lineage,
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
                        self.described(statement, name, tag, body);
                    }
                } else if tag == b'T' {
                    self.query_lineage = match queue.front() {
                        Some(Expect::Query { lineage, .. }) => lineage.clone(),
                        _ => None,
                    };
                    self.query_description(body, masked);
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
            b'H' => self.copy_started(&mut queue, body),
            _ => {}
        }
    }

    /// A CopyOutResponse: the COPY statement of the request at the front, if known.
    fn copy_started(&mut self, queue: &mut VecDeque<Expect>, body: &[u8]) {
        let (spec, lineage) = match queue.front_mut() {
            Some(Expect::Query { copies, lineage }) => (
                copies.as_mut().and_then(VecDeque::pop_front).map(Arc::new),
                lineage.clone(),
            ),
            Some(Expect::Execute { portal }) => self
                .portals
                .get(portal.as_str())
                .map_or((None, None), |d| (d.copy.clone(), d.lineage.clone())),
            _ => (None, None),
        };
        self.copy = Some(CopyOut::new(body, spec, lineage));
    }

    /// A RowDescription ('T') or NoData ('n') answering a Describe of a statement or portal.
    fn described(&mut self, statement: bool, name: String, tag: u8, body: &[u8]) {
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

    /// A RowDescription outside a Describe: a simple query's next result (kept only when the
    /// request has masks).
    fn query_description(&mut self, body: &[u8], masked: impl FnOnce() -> bool) {
        self.query_fields = if masked() {
            codec::row_description(body).ok().map(Arc::from)
        } else {
            None
        };
    }

    /// The answers no longer line up with what was asked: forget every description (what
    /// depends on one is then masked as unknown).
    fn lost(&mut self) {
        warn!("column masking lost track of the extended protocol; descriptions dropped");
        self.statements.clear();
        self.portals.clear();
    }

    /// What the output columns of the result in progress read, if analysed.
    pub(super) fn current_lineage(&self, front: Front) -> Option<Arc<Lineage>> {
        match front {
            Front::Query => self.query_lineage.clone(),
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
                        .and_then(|d| d.lineage.clone()),
                    _ => None,
                }
            }
        }
    }

    /// The fields of the result in progress, if known.
    pub(super) fn current_fields(&self, front: Front) -> Option<Arc<[FieldDescription]>> {
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
pub(super) fn with_formats(
    fields: &[FieldDescription],
    formats: &[i16],
) -> Option<Arc<[FieldDescription]>> {
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
